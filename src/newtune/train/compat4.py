"""Issue 16, part 4, applied to a run: flex attention compiled with flex_attn_compile_kwargs,
and unfrozen_parameters under an adapter (only adapter weights may train)."""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError

log = logging.getLogger(__name__)
_TRANSFORMERS_WRAPPER: Any = None  # transformers' own WrappedFlexAttention, before any patch


def _flex_module() -> Any:
    from transformers.integrations import flex_attention

    return flex_attention


def compile_flex_attention_with(kwargs: dict[str, Any] | None) -> None:
    """Make transformers compile flex attention with these torch.compile kwargs (None: its own
    default). transformers builds the compiled function once per train/eval switch in the
    singleton `WrappedFlexAttention`, looked up by `compile_friendly_flex_attention` at each
    call; this swaps in a subclass whose __init__ passes `kwargs` to torch.compile."""
    global _TRANSFORMERS_WRAPPER
    module = _flex_module()
    if _TRANSFORMERS_WRAPPER is None:
        _TRANSFORMERS_WRAPPER = module.WrappedFlexAttention
    if kwargs is None:
        module.WrappedFlexAttention = _TRANSFORMERS_WRAPPER
        return
    options = dict(kwargs)
    try:  # torch.compile checks mode/options/backend when it builds the wrapper (lazily compiled)
        torch.compile(module.flex_attention, **options)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"`flex_attn_compile_kwargs: {options}`: torch.compile refused them ({exc}); fix "
            "the options (e.g. {dynamic: false, mode: max-autotune-no-cudagraphs}) or remove "
            "the key"
        ) from exc

    class WrappedFlexAttention(_TRANSFORMERS_WRAPPER):  # type: ignore[misc, valid-type]
        """transformers' singleton, compiling flex_attention with flex_attn_compile_kwargs."""

        _instance = None
        _is_flex_compiled = False
        _compiled_flex_attention = None
        compile_kwargs = options

        @torch.compiler.disable(recursive=False)
        def __init__(self, training: bool) -> None:
            """Compile on first use and when training flips, as transformers does."""
            if not self._is_flex_compiled or training != self.training:
                self.training = training
                log.info("compiling flex attention with %s", options)
                self._compiled_flex_attention = torch.compile(module.flex_attention, **options)
                self._is_flex_compiled = True

    module.WrappedFlexAttention = WrappedFlexAttention


def _adapter_name(model: Any) -> str | None:
    """The active peft adapter's name, or None when the model has no adapter."""
    if not hasattr(model, "peft_config"):
        return None
    active = getattr(model, "active_adapter", "default")
    return active if isinstance(active, str) else active[0]


def check_unfrozen_under_adapter(model: Any, trained: list[str], patterns: list[str]) -> None:
    """With an adapter, peft saves only the adapter's weights: a trained base weight would be
    lost at save, so it is refused."""
    adapter = _adapter_name(model)
    if adapter is None:
        return
    mark = f".{adapter}."
    base = [n for n in trained if mark not in n]
    if base:
        shown = ", ".join(base[:3]) + (f" and {len(base) - 3} more" if len(base) > 3 else "")
        raise ConfigError(
            f"`unfrozen_parameters` {patterns} trains base weights ({shown}) under the adapter, "
            "and peft saves only the adapter's weights, so that training would be lost; "
            "match adapter weights only (e.g. `base_model.+lora_`), train whole modules with "
            "`lora_modules_to_save`, or remove `adapter` for a partial full fine-tune"
        )


def apply_onebitllms(model: Any) -> None:
    """onebitllms' BitNetLinear in place of every linear layer but lm_head (in place). The
    library sets torch's default dtype to the model's and leaves it; it is put back here."""
    onebit = importlib.import_module("onebitllms")  # check_machine made sure it is there
    default = torch.get_default_dtype()
    try:
        onebit.replace_linear_with_bitnet_linear(model)
    finally:
        torch.set_default_dtype(default)
    log.info("use_onebitllms: linear layers replaced by onebitllms' BitNetLinear")


def apply_model_keys4(model: Any, config: NewtuneConfig, trained: list[str] | None) -> None:
    """flex_attn_compile_kwargs, and the adapter check of unfrozen_parameters."""
    if config.attn_implementation == "flex_attention":
        compile_flex_attention_with(config.flex_attn_compile_kwargs)
    if config.unfrozen_parameters and trained is not None:
        check_unfrozen_under_adapter(model, trained, config.unfrozen_parameters)
