"""Load the base model a config names: local folder, hub id, or .gguf file."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from newtune.config.resolve import RunPlan
from newtune.config.schema import NewtuneConfig
from newtune.models.location import ModelLocation, hub_error, locate

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    value: str, dtype: str = "float32", key: str = "base_model", attn: str = "sdpa"
) -> Any:
    """A causal LM from a folder, hub id or .gguf file, in `dtype`, with attention `attn`."""
    loc = locate(value, key)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            loc.name_or_path, dtype=DTYPES[dtype], attn_implementation=attn, **loc.kwargs()
        )
    except (OSError, ValueError) as exc:
        raise hub_error(key, value, exc) from exc
    if loc.gguf_file:
        model = _plain_from_gguf(model, loc, DTYPES[dtype], attn)
    return model


def build_model(config: NewtuneConfig, plan: RunPlan, tokenizer: Any) -> Any:
    """The model to train: loaded as the config says, with its adapter attached."""
    from newtune.models.adapters import attach_lora, describe_parameters

    model = load_model(config.base_model, plan.dtype, attn=config.attn_implementation or "sdpa")
    model.config.use_cache = False  # packed rows are isolated only without a KV cache
    if plan.train_mode in ("lora", "qlora"):
        model = attach_lora(model, config)
    log.info(describe_parameters(model))
    return model


def _plain_from_gguf(model: Any, loc: ModelLocation, dtype: torch.dtype, attn: str) -> Any:
    """Rebuild a dequantized GGUF model as a plain (non-quantized) model of the same class.

    transformers marks GGUF-loaded models as quantized, which stops Trainer and peft from
    treating them as ordinary weights; the weights themselves are already dequantized.
    """
    config = AutoConfig.from_pretrained(loc.name_or_path, gguf_file=loc.gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = f"{loc.name_or_path}/{loc.gguf_file}"
    plain = type(model)._from_config(config, dtype=dtype, attn_implementation=attn)
    result = plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    unexpected = [k for k in result.missing_keys if "lm_head" not in k]
    if unexpected or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF conversion mismatch: missing {unexpected[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}"
        )
    plain.generation_config = model.generation_config
    return plain.eval()
