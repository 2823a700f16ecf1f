"""validate's side of `fused_attn_kernel` (models/fused_attention.py applies it): the model
types it covers, read from a config.json already on disk, without importing torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUPPORTED_TYPES = (
    "qwen3",
    "qwen3_moe",
    "qwen3_vl",
    "qwen3_vl_text",
    "qwen3_5",
    "qwen3_5_text",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "gemma4",
    "gemma4_text",
    "gemma4_unified",
    "gemma4_unified_text",
)


def unsupported_message(model_type: str | None, where: str) -> str:
    """The one-paragraph refusal of `fused_attn_kernel` for a model type it does not cover."""
    return (
        f"`fused_attn_kernel: true` fuses the q_norm/k_norm RMSNorm and the rotary embedding "
        f"of the attention of the Qwen3 and Gemma 4 families, and {where} is of type "
        f"`{model_type}`, which has no such norms to fuse (Axolotl leaves the key a silent "
        f"no-op there). Supported model types: {', '.join(SUPPORTED_TYPES)}. Remove the key, "
        "or use a model of one of these types."
    )


def config_model_type(value: str, revision: str | None = None) -> str | None:
    """`model_type` of a model's config.json when it is on disk (a local folder, or a hub id
    already in the Hugging Face cache; nothing is downloaded), else None."""
    path = Path(value).expanduser()
    if path.is_dir():
        found: Any = path / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(value, "config.json", revision=revision)
        except (ValueError, OSError):  # not a hub id: `locate` reports it when the model loads
            return None
    if not isinstance(found, (str, Path)) or not Path(found).is_file():
        return None
    try:
        data = json.loads(Path(found).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # load_model names the broken file
    model_type = data.get("model_type") if isinstance(data, dict) else None
    return model_type if isinstance(model_type, str) else None


def validate_problem(value: str | None, revision: str | None = None) -> str | None:
    """validate's refusal of `fused_attn_kernel` for a model whose config.json is on disk and
    names an unsupported type; None when supported or not known before loading."""
    if not value:
        return None
    model_type = config_model_type(value, revision)
    if model_type is None or model_type in SUPPORTED_TYPES:
        return None
    return unsupported_message(model_type, f"the model `{value}`")
