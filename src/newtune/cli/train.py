"""`newtune train cfg.yml [--key=value ...]`; also `accelerate launch -m newtune.cli.train cfg.yml`."""

from __future__ import annotations

from typing import Any

import fire

from newtune.cli.common import command, load, log


def _train(config: str, overrides: dict[str, Any]) -> None:
    from newtune.train.run import train

    out = train(load(config, overrides))
    log.info("training done; outputs in %s", out)


train_command = command(
    _train, "Fine-tune the model the config describes and save it to `output_dir`."
)


def main() -> None:
    """Entry point for `python -m newtune.cli.train`."""
    fire.Fire(train_command)


if __name__ == "__main__":
    main()
