"""`fused_attn_kernel`: the q/k RMSNorm + rotary embedding of the attention forward, fused by
torch.compile.

In the Qwen3 and Gemma 4 families every attention layer normalises each query and key head
(`q_norm` / `k_norm`, an RMSNorm over head_dim) and then rotates it (RoPE): several small
elementwise passes over q and k between the projections and the attention kernel. Axolotl
replaces them with its own Triton kernel; newtune compiles exactly that region with
torch.compile: Inductor generates one fused kernel per call on a GPU (Triton) and one fused C++
loop on a CPU, and the same for its backward. The region calls the model's own norm modules
(so each family's RMSNorm variant, a LoRA `modules_to_save` copy of a norm, and its dtype rules
stay as they are) and the rotary formula transformers uses (`x*cos + rotate_half(x)*sin` over
the first `cos.shape[-1]` dims, the rest passed through, as Qwen3.5's partial rotary).

Each attention module of a supported model gets, on the instance, a forward that is the
transformers forward of its class with that region replaced; projections (plain or peft LoRA
layers), the KV cache, Gemma 4's shared KV layers, the attention kernel and the output
projection run as before. The forwards are written against the signatures of transformers' own
forwards; `apply_fused_attention` checks them and refuses a class whose forward differs.

Under `torch_compile: true` the whole model is compiled and Dynamo traces through the nested
compiled region, so the rewritten forward is compiled into the model's graph (the region is
fused there as well). Gradient checkpointing recomputes the region like any other code.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

import torch

from newtune.config.fused_attention import (  # noqa: F401 - re-exported
    SUPPORTED_TYPES,
    config_model_type,
    unsupported_message,
    validate_problem,
)
from newtune.errors import ModelError

log = logging.getLogger(__name__)

# the attention classes whose forward is rewritten, and the model types (Axolotl's set)
QWEN3 = ("Qwen3Attention", "Qwen3MoeAttention", "Qwen3VLTextAttention")
QWEN3_GATED = ("Qwen3_5Attention", "Qwen3_5MoeAttention")  # q_proj also yields an output gate
GEMMA4 = ("Gemma4TextAttention", "Gemma4UnifiedTextAttention")
BACKEND = "inductor"  # torch.compile backend of the fused region (tests may use aot_eager)
_COMPILED: dict[tuple[Callable[..., Any], str], Callable[..., Any]] = {}


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [batch, seq, heads, head_dim]: the first cos.shape[-1] dims rotated, as
    transformers' apply_rotary_pos_emb (cos/sin are [batch, seq, rotary_dim])."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    dim = cos.shape[-1]
    part, rest = (x, None) if dim == x.shape[-1] else (x[..., :dim], x[..., dim:])
    half = part.shape[-1] // 2
    turned = torch.cat((-part[..., half:], part[..., :half]), dim=-1)
    out = part * cos + turned * sin
    return out if rest is None else torch.cat([out, rest], dim=-1)


def norm_rope_qk(
    q_norm: Any, k_norm: Any, q: torch.Tensor, k: torch.Tensor, cos: Any, sin: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused region of the Qwen3 families: q and k ([b, s, h, d]) normed, rotated and
    transposed to [b, h, s, d]."""
    return rotate(q_norm(q), cos, sin).transpose(1, 2), rotate(k_norm(k), cos, sin).transpose(1, 2)


def norm_rope_q(q_norm: Any, q: torch.Tensor, cos: Any, sin: Any) -> torch.Tensor:
    """Gemma 4's query region: normed, rotated, transposed."""
    return rotate(q_norm(q), cos, sin).transpose(1, 2)


def norm_rope_kv(
    k_norm: Any, v_norm: Any, k: torch.Tensor, v: torch.Tensor, cos: Any, sin: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma 4's key/value region: k normed and rotated, v normed (no scale), both transposed."""
    return rotate(k_norm(k), cos, sin).transpose(1, 2), v_norm(v).transpose(1, 2)


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` compiled with torch.compile under BACKEND (built once per function and backend).

    Inductor keeps bf16/fp16 intermediates in fp32 unless told otherwise; with
    `emulate_precision_casts` it rounds where the eager code casts (the norm's output before
    the weight, the rotation's operands), so the fused region gives the unfused model's values
    in half precision too, not merely close ones.
    """
    key = (fn, BACKEND)
    if key not in _COMPILED:
        options = {"emulate_precision_casts": True} if BACKEND == "inductor" else None
        _COMPILED[key] = torch.compile(fn, backend=BACKEND, dynamic=None, options=options)
    return _COMPILED[key]


def _attention(self: Any, q: Any, k: Any, v: Any, mask: Any, kwargs: dict, **extra: Any) -> Any:
    """The model's attention kernel (config._attn_implementation), as transformers calls it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = inspect.getmodule(type(self)).eager_attention_forward  # type: ignore[union-attr]
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    return interface(self, q, k, v, mask, scaling=self.scaling, **extra, **kwargs)


def _cache(cache: Any, past_key_values: Any) -> Any:
    """The KV cache, under its new name or the old one transformers still accepts."""
    return cache if cache is not None else past_key_values


def qwen3_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache: Any = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Qwen3 / Qwen3-MoE / Qwen3-VL (text) attention with the fused q/k norm + RoPE; Qwen3.5's
    full-attention layers (q_proj yields the query and a sigmoid output gate) too."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    gate = None
    if type(self).__name__ in QWEN3_GATED:
        q_and_gate = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim * 2)
        query, gate = torch.chunk(q_and_gate, 2, dim=-1)
        gate = gate.reshape(*input_shape, -1)
        query = query.reshape(hidden_shape)
    else:
        query = self.q_proj(hidden_states).view(hidden_shape)
    key = self.k_proj(hidden_states).view(hidden_shape)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = compiled(norm_rope_qk)(self.q_norm, self.k_norm, query, key, cos, sin)
    cache = _cache(cache, past_key_values)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    extra = {"sliding_window": self.sliding_window} if hasattr(self, "sliding_window") else {}
    dropout = 0.0 if not self.training else self.attention_dropout
    out, weights = _attention(
        self, query, key, value, attention_mask, kwargs, dropout=dropout, **extra
    )
    out = out.reshape(*input_shape, -1).contiguous()
    if gate is not None:
        out = out * torch.sigmoid(gate)
    return self.o_proj(out), weights


def gemma4_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    shared_kv_states: dict,
    cache: Any = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gemma 4 (and Gemma 4 unified) text attention with the fused q/k norm + RoPE and v norm;
    shared-KV layers read the keys/values of the layer that stored them, as transformers."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    cos, sin = position_embeddings
    query = compiled(norm_rope_q)(
        self.q_norm, self.q_proj(hidden_states).view(hidden_shape), cos, sin
    )
    cache = _cache(cache, past_key_values)
    if self.is_kv_shared_layer:
        key, value = shared_kv_states[self.layer_type]
    else:
        key = self.k_proj(hidden_states).view(hidden_shape)
        value = self.v_proj(hidden_states).view(hidden_shape) if self.v_proj is not None else key
        key, value = compiled(norm_rope_kv)(self.k_norm, self.v_norm, key, value, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    if self.store_full_length_kv:
        shared_kv_states[self.layer_type] = key, value
    dropout = self.attention_dropout if self.training else 0.0
    out, weights = _attention(
        self,
        query,
        key,
        value,
        attention_mask,
        kwargs,
        dropout=dropout,
        sliding_window=self.sliding_window,
    )
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


FORWARDS: dict[str, Callable[..., Any]] = {
    **{name: qwen3_forward for name in QWEN3 + QWEN3_GATED},
    **{name: gemma4_forward for name in GEMMA4},
}
# the leading parameters of transformers' forward each rewrite is written against
SIGNATURES = {
    qwen3_forward: ["hidden_states", "position_embeddings", "attention_mask", "cache"],
    gemma4_forward: [
        "hidden_states",
        "position_embeddings",
        "attention_mask",
        "shared_kv_states",
        "cache",
    ],
}


def _known_forward(cls: type, forward: Callable[..., Any]) -> bool:
    """Whether transformers' forward of `cls` has the parameters `forward` was written for."""
    params = [
        p.name
        for p in inspect.signature(inspect.unwrap(cls.forward)).parameters.values()
        if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    return params == SIGNATURES[forward]


def is_fused(module: Any) -> bool:
    """Whether `module`'s forward is the fused one."""
    func = getattr(getattr(module, "forward", None), "__func__", None)
    return func in SIGNATURES


def fuse(module: Any) -> bool:
    """Give `module` the fused forward if it is an attention module of a known class."""
    cls = type(module)
    forward = FORWARDS.get(cls.__name__)
    if forward is None or not cls.__module__.startswith("transformers."):
        return False
    if not _known_forward(cls, forward):
        import transformers

        raise ModelError(
            f"`fused_attn_kernel: true`: transformers {transformers.__version__}'s "
            f"{cls.__name__}.forward takes other arguments than newtune's fused rewrite of it "
            "was written for, so it cannot be replaced safely; remove the key, or use the "
            "transformers version newtune is tested with"
        )
    module.forward = types.MethodType(forward, module)
    return True


def apply_fused_attention(model: Any) -> int:
    """Give every attention module of a supported model the fused forward; how many.

    ModelError when the model's type is not in SUPPORTED_TYPES, when it has no attention module
    of the known classes, or when transformers' forward of one has another signature.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        raise ModelError(unsupported_message(model_type, "the loaded model"))
    patched = sum(fuse(module) for module in base.modules())
    if not patched:
        raise ModelError(
            f"`fused_attn_kernel: true`: this `{model_type}` model has no attention module of "
            f"the classes newtune fuses ({', '.join(FORWARDS)}), so there is nothing to fuse; "
            "remove the key"
        )
    log.info("fused_attn_kernel: %d attention modules run the fused q/k norm + RoPE", patched)
    return patched
