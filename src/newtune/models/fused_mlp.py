"""`flash_attn_fuse_mlp`: each gated MLP runs its gate and up projections as one packed GEMM.

A gated MLP (Llama's layout) computes `down(act(gate(x)) * up(x))`: two GEMMs over the same
input. `FusedGatedMLP` holds `gate_up_proj`, the gate and up weights stacked into one matrix
(gate rows first), so one GEMM gives both halves; then `act(gate) * up` (liger-kernel's fused
SiLU-mul on CUDA when it is installed and the activation is SiLU, torch otherwise) and
`down_proj`. This is Axolotl's fused MLP (xformers' packed SwiGLU) written with torch.

The packed weight is an implementation detail: the module's state dict shows and takes the
model's own `gate_proj.weight` / `up_proj.weight` keys (state-dict hooks split and join them),
so `save_pretrained`, Trainer checkpoints and resume keep the model's original layout and the
output loads in transformers unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

import torch
from torch import nn

from newtune.errors import ModelError

log = logging.getLogger(__name__)

# model_type -> (transformers.models module, MLP class): dense decoder MLPs whose forward is
# exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))` (tests/test_fused_mlp.py checks each)
SUPPORTED: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaMLP"),
    "mistral": ("mistral", "MistralMLP"),
    "ministral": ("ministral", "MinistralMLP"),
    "qwen2": ("qwen2", "Qwen2MLP"),
    "qwen3": ("qwen3", "Qwen3MLP"),
    "gemma": ("gemma", "GemmaMLP"),
    "gemma2": ("gemma2", "Gemma2MLP"),
    "gemma3_text": ("gemma3", "Gemma3MLP"),
    "olmo": ("olmo", "OlmoMLP"),
    "olmo2": ("olmo2", "Olmo2MLP"),
    "olmo3": ("olmo3", "Olmo3MLP"),
    "granite": ("granite", "GraniteMLP"),
    "cohere": ("cohere", "CohereMLP"),
    "cohere2": ("cohere2", "Cohere2MLP"),
    "stablelm": ("stablelm", "StableLmMLP"),
    "helium": ("helium", "HeliumMLP"),
    "smollm3": ("smollm3", "SmolLM3MLP"),
    "exaone4": ("exaone4", "Exaone4MLP"),
    "ernie4_5": ("ernie4_5", "Ernie4_5MLP"),
    "hunyuan_v1_dense": ("hunyuan_v1_dense", "HunYuanDenseV1MLP"),
}


def mlp_class(model_type: str) -> type[nn.Module]:
    """The transformers MLP class of a supported model type."""
    module, name = SUPPORTED[model_type]
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """liger-kernel's fused `silu(gate) * up` on CUDA tensors, or None where it cannot run."""
    if not gate.is_cuda or importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up)


class FusedGatedMLP(nn.Module):
    """A gated MLP with its gate and up projections packed into one `gate_up_proj` Linear."""

    def __init__(self, mlp: nn.Module) -> None:
        """Pack `mlp`'s gate_proj/up_proj weights (and biases) and keep its down_proj and act_fn."""
        super().__init__()
        gate, up = mlp.gate_proj, mlp.up_proj
        self.intermediate_size = gate.out_features
        self.gate_up_proj = nn.Linear(
            gate.in_features,
            2 * gate.out_features,
            bias=gate.bias is not None,
            device=gate.weight.device,
            dtype=gate.weight.dtype,
        )
        with torch.no_grad():
            self.gate_up_proj.weight.copy_(torch.cat([gate.weight, up.weight]))
            if gate.bias is not None:
                self.gate_up_proj.bias.copy_(torch.cat([gate.bias, up.bias]))
        self.gate_up_proj.requires_grad_(gate.weight.requires_grad)
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        if hasattr(mlp, "config"):
            self.config = mlp.config
        self._silu = (
            isinstance(mlp.act_fn, nn.SiLU) or type(mlp.act_fn).__name__ == "SiLUActivation"
        )
        self.register_state_dict_post_hook(_split_state)
        self.register_load_state_dict_pre_hook(_join_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`down(act(gate) * up)` with gate and up from one GEMM."""
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        hidden = _silu_mul(gate, up) if self._silu else None
        if hidden is None:
            hidden = self.act_fn(gate) * up
        return self.down_proj(hidden)


def _split_state(module: FusedGatedMLP, state: dict, prefix: str, _meta: Any) -> None:
    """State-dict post-hook: `gate_up_proj.*` shown as the model's gate_proj/up_proj keys."""
    for kind in ("weight", "bias"):
        packed = state.pop(f"{prefix}gate_up_proj.{kind}", None)
        if packed is None:
            continue
        gate, up = packed.split(module.intermediate_size, dim=0)
        state[f"{prefix}gate_proj.{kind}"], state[f"{prefix}up_proj.{kind}"] = gate, up


def _join_state(module: FusedGatedMLP, state: dict, prefix: str, *_args: Any) -> None:
    """Load pre-hook: a checkpoint's gate_proj/up_proj keys joined into `gate_up_proj.*`."""
    for kind in ("weight", "bias"):
        gate, up = f"{prefix}gate_proj.{kind}", f"{prefix}up_proj.{kind}"
        if gate in state and up in state:
            state[f"{prefix}gate_up_proj.{kind}"] = torch.cat([state.pop(gate), state.pop(up)])


def _model_type(model: Any) -> str | None:
    """The decoder's model type (a multimodal model's text_config when it has one)."""
    config = model.config
    text = getattr(config, "text_config", None)
    if text is not None and getattr(config, "model_type", None) not in SUPPORTED:
        return getattr(text, "model_type", None)
    return getattr(config, "model_type", None)


def check_engine(config: Any) -> None:
    """ModelError under DeepSpeed ZeRO-3, which saves parameters by their own names."""
    if config.deepspeed is None:
        return
    from newtune.train.distributed import load_deepspeed_config

    zero = load_deepspeed_config(config.deepspeed).get("zero_optimization") or {}
    if zero.get("stage") == 3:
        raise ModelError(
            f"`flash_attn_fuse_mlp: true` with `deepspeed: {config.deepspeed}` (ZeRO stage 3): "
            "ZeRO-3 gathers the weights it saves by parameter name, so the checkpoint would "
            "hold the packed `gate_up_proj` instead of the model's gate_proj/up_proj and not "
            "load in transformers; use ZeRO stage 1 or 2, or remove `flash_attn_fuse_mlp`."
        )


def fuse_gated_mlps(model: nn.Module) -> int:
    """Replace every gated MLP of `model` by a FusedGatedMLP; ModelError where unsupported."""
    kind = _model_type(model)
    if kind not in SUPPORTED:
        raise ModelError(
            f"`flash_attn_fuse_mlp: true` packs the gate and up projections of a gated MLP "
            f"(gate_proj/up_proj/down_proj + act_fn) and this model's type is `{kind}`, which "
            f"newtune does not fuse; supported model types: {', '.join(sorted(SUPPORTED))}. "
            "Remove `flash_attn_fuse_mlp` for this model."
        )
    cls = mlp_class(kind)
    targets = [name for name, module in model.named_modules() if type(module) is cls]
    if not targets:
        raise ModelError(
            f"`flash_attn_fuse_mlp: true`: the `{kind}` model has no {cls.__name__} module to "
            "fuse (its modules were replaced by another patch?); remove `flash_attn_fuse_mlp`."
        )
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FusedGatedMLP(getattr(parent, child)))
    log.info("flash_attn_fuse_mlp: %d %s modules fused (gate_up_proj)", len(targets), cls.__name__)
    return len(targets)
