"""LoRA adapters through peft."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model

from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def lora_config(config: NewtuneConfig) -> LoraConfig:
    """peft's LoraConfig for this config's `lora_*` keys."""
    if config.lora_target_linear:
        targets: Any = "all-linear"
    else:
        targets = config.lora_target_modules
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: Any, config: NewtuneConfig) -> Any:
    """Wrap the model with a new LoRA adapter, or continue the one in `lora_model_dir`."""
    if config.lora_model_dir:
        return load_adapter(model, config.lora_model_dir, trainable=True)
    try:
        peft_model = get_peft_model(model, lora_config(config))
    except ValueError as exc:
        raise ConfigError(
            f"Could not attach LoRA: {exc}. Check `lora_target_modules` against the model's "
            "module names, or set `lora_target_linear: true`."
        ) from exc
    return peft_model


def load_adapter(model: Any, adapter_dir: str, trainable: bool = False) -> Any:
    """Attach a saved adapter folder to a base model."""
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ModelError(
            f"`lora_model_dir: {adapter_dir}` has no adapter_config.json. Point it at a folder "
            "written by `newtune train` with `adapter: lora`."
        )
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


def describe_parameters(model: Any) -> str:
    """`trainable / total` parameter counts, for the log."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)"
