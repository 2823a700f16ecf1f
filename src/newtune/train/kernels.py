"""liger-kernel: the `liger_*` keys patch the built model's modules with fused Triton kernels."""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any

from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

LIGER_PIP = "pip install 'newtune[liger]' (or pip install liger-kernel; it needs a CUDA GPU)"
# config key -> keyword of liger_kernel's apply_liger_kernel_to_<model> functions
LIGER_KEYS = {
    "liger_rope": ("rope",),
    "liger_rms_norm": ("rms_norm",),
    "liger_layer_norm": ("layer_norm",),
    "liger_glu_activation": ("swiglu", "geglu"),  # whichever the model's MLP has
    "liger_cross_entropy": ("cross_entropy",),
    "liger_fused_linear_cross_entropy": ("fused_linear_cross_entropy",),
    "liger_rms_norm_gated": ("rms_norm_gated",),  # Qwen3-Next-like gated RMSNorm
}


def liger_flags(config: NewtuneConfig) -> dict[str, bool]:
    """Every liger kernel switch, on or off (liger's own defaults turn most of them on)."""
    return {
        kwarg: bool(getattr(config, key)) for key, kwargs in LIGER_KEYS.items() for kwarg in kwargs
    }


def liger_requested(config: NewtuneConfig) -> list[str]:
    """The `liger_*` keys set to true."""
    return [key for key in LIGER_KEYS if getattr(config, key)]


def fused_head(config: NewtuneConfig) -> bool:
    """Whether liger's fused head+loss replaces the model's forward (newtune then leaves the
    output head to it: NewtuneTrainer's `fused_head`)."""
    return bool(config.liger_fused_linear_cross_entropy)


def check_switches(apply_fn: Any, model_type: str, keys: list[str]) -> None:
    """ModelError when liger's function for the model type has no gated-RMSNorm switch
    (liger drops keywords its function does not take, so the key would do nothing)."""
    if "liger_rms_norm_gated" not in keys:
        return
    if "rms_norm_gated" not in inspect.signature(apply_fn).parameters:
        raise ModelError(
            f"`liger_rms_norm_gated`: liger-kernel's {apply_fn.__name__} for model type "
            f"`{model_type}` has no gated RMSNorm (`rms_norm_gated`); it exists for models with "
            "gated RMSNorm layers (Qwen3-Next-like) in liger-kernel versions that ship it: "
            "upgrade liger-kernel, or remove the key"
        )


def apply_liger(model: Any, config: NewtuneConfig) -> None:
    """Patch `model` (or the base model under its adapter) with the requested liger kernels."""
    keys = liger_requested(config)
    if not keys:
        return
    try:
        liger = importlib.import_module("liger_kernel.transformers")
    except ImportError as exc:
        raise ConfigError(
            f"{', '.join(f'`{k}`' for k in keys)} need liger-kernel, which is not installed: "
            f"{LIGER_PIP}; or remove the liger_* keys"
        ) from exc
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    supported = getattr(liger, "MODEL_TYPE_TO_APPLY_LIGER_FN", None)
    if supported is None:
        supported = importlib.import_module(
            "liger_kernel.transformers.monkey_patch"
        ).MODEL_TYPE_TO_APPLY_LIGER_FN
    if model_type not in supported:
        raise ModelError(
            f"{', '.join(f'`{k}`' for k in keys)}: liger-kernel has no kernels for model type "
            f"`{model_type}` (it supports {', '.join(sorted(supported))}); remove the liger_* keys"
        )
    check_switches(supported[model_type], model_type, keys)
    liger._apply_liger_kernel_to_instance(model=base, **liger_flags(config))
    log.info("liger-kernel applied to %s: %s", model_type, ", ".join(keys))
