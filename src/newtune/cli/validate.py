"""`newtune validate cfg.yml`: check the config and print the resolved config and plan."""

from __future__ import annotations

from typing import Any

import fire
import yaml

from newtune.cli.common import command, load


def _validate(config: str, overrides: dict[str, Any]) -> None:
    from newtune.config.resolve import resolve

    loaded = load(config, overrides)
    plan = resolve(loaded.config)
    print(f"# {loaded.source}: valid")
    print(yaml.safe_dump(loaded.config.model_dump(mode="json"), sort_keys=False).rstrip())
    print("# resolved plan")
    print(yaml.safe_dump(plan.as_dict(), sort_keys=False).rstrip())


validate_command = command(
    _validate, "Validate a config; print the resolved config and run plan (exit 0 when valid)."
)


def main() -> None:
    """Entry point for `python -m newtune.cli.validate`."""
    fire.Fire(validate_command)


if __name__ == "__main__":
    main()
