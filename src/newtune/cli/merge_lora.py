"""`newtune merge-lora cfg.yml [--lora_model_dir=DIR]`: write `{output_dir}/merged`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fire

from newtune.cli.common import command, load, log


def _merge(config: str, overrides: dict[str, Any]) -> None:
    from newtune.config.resolve import resolve
    from newtune.models.merge import merge_lora
    from newtune.models.tokenizer import load_tokenizer

    loaded = load(config, overrides)
    cfg = loaded.config
    adapter_dir = cfg.lora_model_dir or cfg.output_dir
    tok_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else None
    tokenizer, _ = load_tokenizer(cfg, tok_source)
    out = merge_lora(
        cfg.base_model,
        adapter_dir,
        Path(cfg.output_dir) / "merged",
        resolve(cfg).dtype,
        tokenizer,
        config=cfg,
    )
    log.info("merged model written to %s", out)
    print(out)


merge_lora_command = command(
    _merge, "Merge the LoRA adapter (lora_model_dir, default output_dir) into the base model."
)


def main() -> None:
    """Entry point for `python -m newtune.cli.merge_lora`."""
    fire.Fire(merge_lora_command)


if __name__ == "__main__":
    main()
