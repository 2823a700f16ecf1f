"""`newtune preprocess cfg.yml`: tokenize the datasets into the prepared-data cache."""

from __future__ import annotations

import json
from typing import Any

import fire

from newtune.cli.common import command, load, log


def _preprocess(config: str, overrides: dict[str, Any]) -> None:
    from newtune.train.run import prepare_data

    _, prepared = prepare_data(load(config, overrides))
    log.info("%s prepared data: %s", "reused" if prepared.reused else "wrote", prepared.path)
    log.info("report: %s", json.dumps(prepared.stats["splits"]))
    print(prepared.path)


preprocess_command = command(
    _preprocess, "Tokenize the config's datasets and print the prepared dataset's path."
)


def main() -> None:
    """Entry point for `python -m newtune.cli.preprocess`."""
    fire.Fire(preprocess_command)


if __name__ == "__main__":
    main()
