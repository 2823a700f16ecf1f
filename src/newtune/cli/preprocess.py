"""`newtune preprocess cfg.yml [--force] [--debug]`: tokenize the datasets into the cache."""

from __future__ import annotations

import sys
from typing import Any

import fire

from newtune.cli.common import emit, load, log, run_command

DEBUG_EXAMPLES = 3


def _preprocess(config: str, overrides: dict[str, Any], force: bool, debug: bool) -> None:
    from newtune.data.prepare import prepare_data  # the data layer only: no Trainer stack
    from newtune.data.report import mark_trained, report_table

    loaded = load(config, overrides)
    _refuse_online(loaded.config)
    tokenizer, prepared = prepare_data(loaded, force=force)
    log.info("%s prepared data: %s", "reused" if prepared.reused else "wrote", prepared.path)
    print(report_table(prepared.stats), file=sys.stderr)
    if debug:
        color = sys.stderr.isatty()
        train = prepared.data["train"]
        for i in range(min(DEBUG_EXAMPLES, len(train))):
            row = train[i]
            text = mark_trained(tokenizer, row["input_ids"], row["labels"], color)
            print(f"--- example {i} (trained spans marked) ---\n{text}", file=sys.stderr)
    emit(str(prepared.path))


def _refuse_online(cfg: Any) -> None:
    """Structured `rl: ebft`, grpo and gdpo train on raw rows (TRL tokenizes the prompts)."""
    from newtune.config.schema.online import ebft_mode
    from newtune.errors import ConfigError

    rl = getattr(cfg, "rl", None)
    if rl == "ebft" and ebft_mode(cfg) == "strided":
        raise ConfigError(
            "`rl: ebft` (strided) has nothing to preprocess: its transform functions return the "
            "tokens, and `newtune train` reads the datasets through them itself."
        )
    if rl in ("grpo", "gdpo") or (rl == "ebft" and ebft_mode(cfg) == "structured"):
        label = "`rl: ebft` (structured)" if rl == "ebft" else f"`rl: {rl}`"
        raise ConfigError(
            f"{label} has nothing to preprocess: TRL's GRPOTrainer renders and "
            "tokenizes the prompts of the raw rows as it generates, and "
            "`newtune train` reads the datasets through their transforms itself."
        )


def preprocess_command(
    config: str, force: bool = False, debug: bool = False, **overrides: Any
) -> None:
    """Tokenize the config's datasets and print the prepared dataset's path.

    --force rebuilds the cache; --debug also prints decoded examples with trained spans marked.
    """
    run_command(_preprocess, debug, config, overrides, force, debug)


def main() -> None:
    """Entry point for `python -m newtune.cli.preprocess`."""
    fire.Fire(preprocess_command)


if __name__ == "__main__":
    main()
