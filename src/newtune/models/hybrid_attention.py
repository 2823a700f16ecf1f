"""`gemma4_hybrid_attn_impl`: Gemma 4's global (full-attention) layers run sdpa, the others the
configured attn_implementation.

Gemma 4's full-attention layers have head_dim 512, which flash-attention cannot run; its
sliding-window layers (head_dim 256) can. The model is loaded with the configured
implementation (flash_attention_2 in Axolotl's configs); then each full-attention layer's
attention module gets a copy of the config with `_attn_implementation = "sdpa"`
(transformers' attention modules look their kernel up there), and a forward pre-hook that
hands it the mask sdpa needs: transformers' `create_causal_mask` under that sdpa config, from
the layer's padding mask and position_ids. Under flash-attention the model builds the
full-attention mask in flash's format (no mask, or the 2D padding mask; packed rows are told
apart by their restarting position_ids), which sdpa would read as one causal sequence; rebuilt
under sdpa it is the padding-aware, block-diagonal causal mask of the packed rows. A 4D mask
(eager/sdpa format) already serves sdpa and passes unchanged.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from transformers.masking_utils import create_causal_mask

from newtune.errors import ModelError

log = logging.getLogger(__name__)

GLOBAL_ATTENTION = "sdpa"  # what the full-attention layers run
GEMMA4_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
SLIDING = "sliding_attention"


def text_model(model: Any) -> Any:
    """The decoder stack (a module with `layers` and a config naming each layer's type)."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        types = getattr(getattr(module, "config", None), "layer_types", None)
        if isinstance(layers, torch.nn.ModuleList) and types and len(types) >= len(layers):
            return module
    return None


class GlobalMasks:
    """Forward pre-hook of the full-attention layers' attention: their mask, built for sdpa.

    Built once per forward (at the first full-attention layer, before it updates its KV cache)
    and reused by the others; `reset`, a pre-hook of the decoder stack, starts each forward.
    """

    def __init__(self, config: Any) -> None:
        self.config = config  # the full-attention layers' config copy: `_attn_implementation` sdpa
        self._last: tuple[Any, ...] | None = None  # (mask, position_ids, shape, built)

    def reset(self, module: Any, args: tuple) -> None:
        """A new forward of the decoder stack: forget the last mask."""
        self._last = None

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Replace `attention_mask` by the sdpa mask of the same rows (4D masks pass as they are)."""
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            return None  # eager/sdpa format: sdpa reads it as it is
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise ModelError(
                f"gemma4_hybrid_attn_impl: the full-attention layers run sdpa and were given a "
                f"{type(mask).__name__} mask (flex_attention's format), which sdpa cannot read; "
                "use `attn_implementation: flash_attention_2` (or eager)"
            )
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        position_ids = kwargs.get("position_ids")
        shape = (tuple(hidden.shape[:2]), hidden.dtype, hidden.device)
        last = self._last
        if last is not None and last[0] is mask and last[1] is position_ids and last[2] == shape:
            built = last[3]  # another full-attention layer of the same forward
        else:
            built = create_causal_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=mask,
                cache=kwargs.get("cache", kwargs.get("past_key_values")),
                position_ids=position_ids,
                layer_idx=getattr(module, "layer_idx", None),  # its cache, not yet updated
            )
            self._last = (mask, position_ids, shape, built)
        return args, {**kwargs, "attention_mask": built}


def apply_hybrid_attention(model: Any) -> int:
    """Put the full-attention layers of a Gemma 4 model on sdpa; how many layers were moved.

    ModelError when the model is not Gemma 4 (model_type gemma4 / gemma4_unified and their
    text models), or has no full-attention layer to move.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    stack = text_model(base)
    if model_type not in GEMMA4_TYPES or stack is None:
        raise ModelError(
            f"`gemma4_hybrid_attn_impl: true` runs Gemma 4's full-attention layers (head_dim "
            f"512) on sdpa and the sliding-window layers on the configured attention; the "
            f"model is of type `{model_type}`, not Gemma 4 ({', '.join(GEMMA4_TYPES)}), so "
            "remove the key (the whole model then runs `attn_implementation`)"
        )
    main = stack.config._attn_implementation
    config = copy.copy(stack.config)
    config._attn_implementation = GLOBAL_ATTENTION
    masks = GlobalMasks(config)
    moved = 0
    for layer, layer_type in zip(stack.layers, stack.config.layer_types, strict=False):
        attn = getattr(layer, "self_attn", None)
        if layer_type == SLIDING or attn is None or not hasattr(attn, "config"):
            continue
        attn.config = config
        attn.register_forward_pre_hook(masks, with_kwargs=True)
        moved += 1
    if not moved:
        raise ModelError(
            f"`gemma4_hybrid_attn_impl: true`: this `{model_type}` model has no full-attention "
            "layer (its config's layer_types are all sliding_attention), so there is nothing to "
            "run on sdpa; remove the key"
        )
    stack.register_forward_pre_hook(masks.reset)
    log.info(
        "gemma4_hybrid_attn_impl: %d full-attention layers run %s, %d sliding layers %s",
        moved,
        GLOBAL_ATTENTION,
        len(stack.layers) - moved,
        main,
    )
    return moved
