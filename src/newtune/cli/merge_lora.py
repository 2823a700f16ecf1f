"""`newtune merge-lora cfg.yml [--lora_model_dir=DIR]`: write `{output_dir}/merged`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fire

from newtune.cli.common import command, load, log


def _merge(config: str, overrides: dict[str, Any]) -> None:
    loaded = load(config, overrides)
    cfg = loaded.config
    adapter_dir = cfg.lora_model_dir or cfg.output_dir
    _check_adapter(adapter_dir, "lora_model_dir" if cfg.lora_model_dir else "output_dir")
    from newtune.config.resolve import resolve  # heavy imports only once there is work to do
    from newtune.models.merge import merge_lora
    from newtune.models.tokenizer import load_tokenizer

    if cfg.processor_type:  # a VLM: peft's merge in memory, model + processor written
        from newtune.models.processor import load_processor, merge_vlm

        own = (Path(adapter_dir) / "processor_config.json").is_file()
        processor = load_processor(cfg, adapter_dir if own else None).processor
        out = merge_vlm(
            cfg, adapter_dir, Path(cfg.output_dir) / "merged", resolve(cfg).dtype, processor
        )
        log.info("merged model written to %s", out)
        print(out)
        return
    tok_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else None
    tokenizer, _ = load_tokenizer(cfg, tok_source)
    from newtune.train.relora import base_for

    out = merge_lora(
        base_for(adapter_dir, cfg.base_model),  # a ReLoRA run's merged-so-far base
        adapter_dir,
        Path(cfg.output_dir) / "merged",
        resolve(cfg).dtype,
        tokenizer,
        config=cfg,
    )
    log.info("merged model written to %s", out)
    print(out)


def _check_adapter(folder: str, key: str) -> None:
    """Refuse a folder without a LoRA adapter before anything is loaded, naming the way out."""
    path = Path(folder)
    if (path / "adapter_config.json").is_file():
        return
    from newtune.errors import ModelError

    if not path.exists():
        state = "does not exist"
    elif not path.is_dir():
        state = "is a file, not a folder"
    elif (path / "config.json").is_file():
        state = "holds a full model (config.json), which needs no merge, and no LoRA adapter"
    else:
        state = "holds no LoRA adapter (no adapter_config.json)"
    if key == "lora_model_dir":
        fix = (
            "Point `--lora_model_dir=DIR` at a folder written by `newtune train` with "
            "`adapter: lora` (or `qlora`)."
        )
    else:
        fix = (
            "Train the adapter first (`newtune train` with `adapter: lora` writes it to "
            "`output_dir`), or pass `--lora_model_dir=DIR` with an adapter folder."
        )
    raise ModelError(f"merge-lora: `{key}: {folder}` {state}. {fix}")


merge_lora_command = command(
    _merge, "Merge the LoRA adapter (lora_model_dir, default output_dir) into the base model."
)


def main() -> None:
    """Entry point for `python -m newtune.cli.merge_lora`."""
    fire.Fire(merge_lora_command)


if __name__ == "__main__":
    main()
