"""`newtune validate cfg.yml [--json]`: check the config and print the resolved config and plan."""

from __future__ import annotations

import json
from typing import Any

import fire
import yaml

from newtune.cli.common import emit, fail, load, run_command


def _validate(config: str, overrides: dict[str, Any], as_json: bool = False) -> None:
    from newtune.config.resolve import resolve
    from newtune.config.secrets import redact

    loaded = load(config, overrides)
    plan = resolve(loaded.config)
    if as_json:
        resolved = redact(loaded.config.model_dump(mode="json"))
        emit(json.dumps({"config": resolved, "plan": plan.as_dict()}, indent=2))
        return
    shown = redact(loaded.config.model_dump(mode="json", exclude_none=True))
    emit(
        f"# {loaded.source}: valid (keys left null are not shown)\n"
        + yaml.safe_dump(shown, sort_keys=False)
        + "# resolved plan\n"
        + yaml.safe_dump(plan.as_dict(), sort_keys=False).rstrip()
    )


def validate_command(
    config: str, json: bool = False, debug: bool = False, **overrides: Any
) -> None:
    """Validate a config; print the resolved config and run plan (exit 0 when valid).

    By default the report is YAML with `#` comments; --json prints one JSON object
    {"config": ..., "plan": ...} and nothing else on stdout. Put the flags after the path.
    --allow_plugins (every command takes it) lets a config from a URL import code: plugin
    formats in `datasets[].type` and `trust_remote_code: true`.
    """
    if not isinstance(json, bool):
        fail(f"--json is a flag and takes no value (got {json!r}).", 2)
    run_command(_validate, debug, config, overrides, as_json=json)


def main() -> None:
    """Entry point for `python -m newtune.cli.validate`."""
    fire.Fire(validate_command)


if __name__ == "__main__":
    main()
