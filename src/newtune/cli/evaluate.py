"""`newtune evaluate cfg.yml [--split=test] [--base] [--lora_model_dir=DIR] [--key=value ...]`."""

from __future__ import annotations

import json
from typing import Any

import fire

from newtune.cli.common import emit, load, run_command


def _evaluate(config: str, split: str, base: bool, overrides: dict[str, Any]) -> None:
    from newtune.train.evaluate import evaluate

    metrics = evaluate(
        load(config, overrides),
        split=split,
        base_only=base,
        base_overridden="base_model" in overrides,
    )
    emit(json.dumps(metrics, indent=2))


def evaluate_command(
    config: str, split: str = "test", base: bool = False, debug: bool = False, **overrides: Any
) -> None:
    """Print eval metrics (JSON) of the trained model, --base, or --lora_model_dir=DIR."""
    run_command(_evaluate, debug, config, str(split), bool(base), overrides)


def main() -> None:
    """Entry point for `python -m newtune.cli.evaluate`."""
    fire.Fire(evaluate_command)


if __name__ == "__main__":
    main()
