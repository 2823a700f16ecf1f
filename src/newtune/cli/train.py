"""`newtune train cfg.yml [--key=value ...]`; also `accelerate launch -m newtune.cli.train cfg.yml`."""

from __future__ import annotations

from typing import Any

import fire

from newtune.cli.common import load, log, run_command


def _train(config: str, overrides: dict[str, Any]) -> None:
    from newtune.train.run import train

    out = train(load(config, overrides))
    log.info("training done; outputs in %s", out)


def train_command(config: str, debug: bool = False, **overrides: Any) -> None:
    """Fine-tune the model the config describes and save it to `output_dir`."""
    run_command(_train, debug, config, overrides)


def main() -> None:
    """Entry point for `python -m newtune.cli.train`."""
    fire.Fire(train_command)


if __name__ == "__main__":
    main()
