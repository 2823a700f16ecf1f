"""`newtune config-schema`: print the JSON schema of the config, e.g. for editor completion."""

from __future__ import annotations

import json

import fire

from newtune.cli.common import emit, run_command


def _config_schema() -> None:
    from newtune.config.schema import NewtuneConfig

    emit(json.dumps(NewtuneConfig.model_json_schema(), indent=2))


def config_schema_command(debug: bool = False) -> None:
    """Print the JSON schema of the newtune config (for editors and other tools)."""
    run_command(_config_schema, debug)


def main() -> None:
    """Entry point for `python -m newtune.cli.config_schema`."""
    fire.Fire(config_schema_command)


if __name__ == "__main__":
    main()
