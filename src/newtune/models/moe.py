"""MoE experts stored as 3-D parameters: bitsandbytes quantization on load
(`quantize_moe_experts`), LoRA on the quantized experts (`lora_target_parameters`), and the
ScatterMoE hub kernel as a transformers experts implementation (`use_scattermoe`)."""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.utils.parametrize as parametrize
from peft.tuners.lora import layer as lora_layer
from torch import nn

from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

SCATTERMOE_REPO = "kernels-community/scattermoe"  # Triton ScatterMoE (parallel_linear)
SCATTERMOE = "scattermoe"  # its name in transformers' ExpertsInterface


# -- quantize_moe_experts --------------------------------------------------------------------

# modules that carry the dequantization cache hooks (a registry here, not an attribute set on
# torch's objects)
_CACHED_MODULES: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class Int8Dequant(nn.Module):
    """Parametrization: row-wise int8 data (bitsandbytes) read back as `dtype` weights."""

    def __init__(self, row_stats: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("row_stats", row_stats)
        self.dtype = dtype

    @torch.no_grad()
    def forward(self, data: torch.Tensor) -> torch.Tensor:
        """Dequantize (bitsandbytes works on 2-D rows: flatten the leading dims)."""
        import bitsandbytes.functional as bnb_f

        rows = bnb_f.int8_vectorwise_dequant(data.reshape(-1, data.shape[-1]), self.row_stats)
        return rows.reshape(data.shape).to(self.dtype)


def _cache_on(module: nn.Module, args: Any) -> None:
    parametrize._cache_enabled += 1


def _cache_off(module: nn.Module, args: Any, output: Any) -> None:
    # always_call: also runs when a checkpointed recompute stops the forward early
    parametrize._cache_enabled = max(0, parametrize._cache_enabled - 1)
    if not parametrize._cache_enabled:
        parametrize._cache = {}


def _quantize_8bit(module: nn.Module, name: str) -> None:
    """Replace `module.<name>` with int8 rows dequantized on access (as bitsandbytes' 4-bit
    `replace_parameter_4bit` does), each access cached for the module's forward."""
    import bitsandbytes.functional as bnb_f

    param = getattr(module, name)
    rows = param.data.reshape(-1, param.shape[-1]).to(torch.float16)
    data, row_stats, _ = bnb_f.int8_vectorwise_quant(rows)
    setattr(module, name, nn.Parameter(data.reshape(param.shape), requires_grad=False))
    parametrize.register_parametrization(
        module, name, Int8Dequant(row_stats, param.dtype), unsafe=True
    )
    if module not in _CACHED_MODULES:  # one pair of cache hooks per module
        module.register_forward_pre_hook(_cache_on)
        module.register_forward_hook(_cache_off, always_call=True)
        _CACHED_MODULES.add(module)


def quantize_expert_parameters(
    model: nn.Module, bits: int, quant_type: str = "nf4", double_quant: bool = True
) -> list[str]:
    """Quantize every 3-D (or more) parameter whose name contains `expert` with bitsandbytes
    (4-bit NF4/FP4 blocks, or 8-bit rows), dequantized on access through a torch
    parametrization, as Axolotl's quantize_moe_experts. Returns the quantized names."""
    import bitsandbytes as bnb
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    done = []
    for module_name, module in list(model.named_modules()):
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            if param.ndim < 3 or "expert" not in full.lower():
                continue
            if bits == 4:
                replace_parameter_4bit(
                    module, name, compress_statistics=double_quant, quant_type=quant_type
                )
            else:
                _quantize_8bit(module, name)
            done.append(full)
    return done


def _quantizations() -> tuple[type, ...]:
    """The parametrizations of an expert quantized here (bitsandbytes' 4-bit one only when it
    is installed: without bitsandbytes, which is optional, no expert is ever quantized)."""
    try:
        from bitsandbytes.nn.parametrize import Bnb4bitParametrization
    except ImportError:
        return (Int8Dequant,)
    return (Bnb4bitParametrization, Int8Dequant)


def quantized_experts(model: nn.Module) -> dict[str, nn.Module]:
    """`module.param` name -> the module of each expert parameter quantized here."""
    kinds = _quantizations()
    found = {}
    for module_name, module in model.named_modules():
        for name, chain in getattr(module, "parametrizations", {}).items():
            if any(isinstance(p, kinds) for p in chain):
                found[f"{module_name}.{name}"] = module
    return found


def expand_target_parameters(model: nn.Module, targets: str | list[str] | None) -> list[str]:
    """`lora_target_parameters` with the full name of each quantized expert parameter a target
    names (peft matches an already-parametrized parameter by its full name only, while the
    configs give suffixes such as `mlp.experts.gate_up_proj`)."""
    given = [targets] if isinstance(targets, str) else list(targets or [])
    expanded = list(given)
    for full in quantized_experts(model):
        unwrapped = full.replace(".base_layer", "")
        if full not in expanded and any(
            unwrapped == t or unwrapped.endswith(f".{t}") for t in given
        ):
            expanded.append(full)
    return expanded


def quantize_experts(model: nn.Module, config: NewtuneConfig) -> NewtuneConfig:
    """`quantize_moe_experts`: quantize the loaded model's expert parameters with the bits
    `load_in_4bit` / `load_in_8bit` ask for (bnb_config_kwargs' bnb_4bit_quant_type and
    bnb_4bit_use_double_quant apply). Returns the config with `lora_target_parameters` naming
    the quantized parameters in full."""
    if not config.quantize_moe_experts:
        return config
    bits = 4 if config.load_in_4bit else (8 if config.load_in_8bit else None)
    if bits is None:
        raise ConfigError(
            "`quantize_moe_experts: true` quantizes with the bits of `load_in_4bit` or "
            "`load_in_8bit`; set one of them (Axolotl requires it too)."
        )
    kwargs = config.bnb_config_kwargs or {}
    quant_type = str(kwargs.get("bnb_4bit_quant_type", "nf4"))
    double_quant = bool(kwargs.get("bnb_4bit_use_double_quant", True))
    names = quantize_expert_parameters(model, bits, quant_type, double_quant)
    if not names:
        raise ModelError(
            f"`quantize_moe_experts: true`: {type(model).__name__} ({config.base_model}) has "
            "no 3-D expert parameters (names containing `expert`) to quantize; its experts, if "
            "any, are nn.Linear layers that `load_in_4bit`/`load_in_8bit` already quantize. "
            "Remove `quantize_moe_experts`."
        )
    log.info(
        "quantize_moe_experts: %s expert parameters stored in %s-bit (%s)",
        len(names),
        bits,
        quant_type if bits == 4 else "int8 rows",
    )
    if not config.lora_target_parameters:
        return config
    targets = expand_target_parameters(model, config.lora_target_parameters)
    return config.model_copy(update={"lora_target_parameters": targets})


class QuantizedParamWrapper(lora_layer.ParamWrapper):
    """peft's ParamWrapper on an expert parameter that is already a parametrization (the
    quantized storage), with the two fixes that case needs in peft 0.21: the parameter read
    while an outer wrapper's `parametrize.cached()` is active is dropped from the cache before
    the forward (it lacks this wrapper's LoRA term), and the LoRA factors proxy is removed
    after the forward (peft looks for its plain-delta proxy only and leaves it stacked)."""

    @contextlib.contextmanager
    def _activate_lora(self, active_adapters: list[str]) -> Iterator[None]:
        with super()._activate_lora(active_adapters):
            parametrize._cache.pop((id(self.get_base_layer()), self.parameter_name), None)
            yield

    def _remove_parametrizations(self) -> None:
        chain = self.get_base_layer().parametrizations[self.parameter_name]
        proxies = (lora_layer._LoraParameterProxy, getattr(lora_layer, "_LoraFactorsProxy", ()))
        for i in reversed(range(len(chain))):
            if isinstance(chain[i], proxies):
                del chain[i]
                return
        super()._remove_parametrizations()


def guard_expert_lora(model: nn.Module) -> int:
    """Give each peft ParamWrapper over a quantized expert parameter the QuantizedParamWrapper
    behaviour, nested in the order peft nests them over plain parameters (the parameters'
    definition order; peft takes already-parametrized ones alphabetically), so the saved
    adapter loads onto the unquantized model (merge). Returns how many."""
    count = 0
    for parent in list(model.modules()):
        for child_name, top in list(parent.named_children()):
            if type(parent) is lora_layer.ParamWrapper or type(top) is not lora_layer.ParamWrapper:
                continue
            wrappers, base = [], top
            while type(base) is lora_layer.ParamWrapper:
                wrappers.append(base)
                base = base.base_layer
            chains = getattr(base, "parametrizations", {})
            if not any(
                w.parameter_name in chains and quantized_chain(chains[w.parameter_name])
                for w in wrappers
            ):
                continue
            # definition order (peft nests plain parameters' wrappers in it), which is the
            # order the parameters were quantized, so the order of their parametrizations
            order = list(chains)
            wrappers.sort(key=lambda w: order.index(w.parameter_name)
                          if w.parameter_name in order else len(order))  # fmt: skip
            inner = base
            for wrapper in wrappers:  # innermost first
                wrapper.__class__ = QuantizedParamWrapper
                wrapper.base_layer = inner
                inner = wrapper
            setattr(parent, child_name, inner)
            count += len(wrappers)
    return count


@contextlib.contextmanager
def expert_lora(model: nn.Module) -> Iterator[None]:
    """While LoRA is attached to (get_peft_model) or loaded onto (PeftModel.from_pretrained,
    `lora_model_dir`) a model with quantized experts: peft's parameter targets are expanded to
    the quantized parameters' full names (expand_target_parameters) and its wrappers fixed and
    nested as over plain parameters (guard_expert_lora) before any saved weights load into
    them. Does nothing on other models."""
    if not quantized_experts(model):
        yield
        return
    from peft.tuners.tuners_utils import BaseTuner

    original = BaseTuner._inject_parameters

    def inject(self: Any, peft_config: Any, model: nn.Module, **kwargs: Any) -> list[str]:
        peft_config.target_parameters = expand_target_parameters(
            model, peft_config.target_parameters
        )
        names = original(self, peft_config=peft_config, model=model, **kwargs)
        guard_expert_lora(model)
        return names

    BaseTuner._inject_parameters = inject
    try:
        yield
    finally:
        BaseTuner._inject_parameters = original


def quantized_chain(chain: Any) -> bool:
    """The parametrization chain starts with a quantization made here."""
    return isinstance(chain[0], _quantizations())


# -- ScatterMoE (use_scattermoe / experts_implementation: scattermoe) -------------------------


def load_scattermoe() -> Any:
    """The ScatterMoE kernel from the Hugging Face hub (the `kernels` package); ModelError
    when it cannot run here."""
    what = f"`experts_implementation: {SCATTERMOE}` (`use_scattermoe`)"
    if not torch.cuda.is_available():
        raise ModelError(
            f"{what} runs the Triton ScatterMoE kernel ({SCATTERMOE_REPO}), which needs a CUDA "
            "GPU; none is visible here. Train on a GPU machine, or set `use_scattermoe: false` "
            "/ `experts_implementation: grouped_mm`."
        )
    try:
        from kernels import get_kernel
    except ImportError as exc:
        raise ModelError(
            f"{what} loads {SCATTERMOE_REPO} through the `kernels` package, which is not "
            "installed; run `pip install kernels`, or use `experts_implementation: grouped_mm`."
        ) from exc
    try:
        return get_kernel(SCATTERMOE_REPO)
    except Exception as exc:  # hub, network and build errors all end the run here
        raise ModelError(
            f"{what}: the kernel {SCATTERMOE_REPO} could not be loaded from the Hugging Face "
            f"hub ({type(exc).__name__}: {exc}); go online once (or fill the hub cache), or "
            "use `experts_implementation: grouped_mm`."
        ) from exc


def scattermoe_experts_forward(
    kernel: Any,
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' experts forward (tokens, their top-k experts and routing weights) on the
    ScatterMoE kernel: one grouped gate/up projection, the gate, one grouped down projection
    summed with the routing weights."""
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise ModelError(
            f"`experts_implementation: {SCATTERMOE}`: {type(experts).__name__} has "
            f"{'biases' if getattr(experts, 'has_bias', False) else 'no gate'}, which the "
            "ScatterMoE forward does not handle; use `experts_implementation: grouped_mm`."
        )
    if not getattr(experts, "is_concatenated", True):
        raise ModelError(
            f"`experts_implementation: {SCATTERMOE}`: {type(experts).__name__} interleaves "
            "its gate and up rows; use `experts_implementation: grouped_mm`."
        )
    transposed = getattr(experts, "is_transposed", False)
    # the kernel takes (experts, in, out); transformers stores (experts, out, in) unless transposed
    gate_up = experts.gate_up_proj if transposed else experts.gate_up_proj.transpose(1, 2)
    down = experts.down_proj if transposed else experts.down_proj.transpose(1, 2)
    top_k = top_k_index.size(-1)
    order = kernel.flatten_sort_count(top_k_index, num_experts=experts.num_experts)
    hidden = kernel.parallel_linear(
        hidden_states, gate_up, top_k, *order, grouped_in=False, grouped_out=True
    )
    hidden = experts._apply_gate(hidden)
    out = kernel.parallel_linear(
        hidden,
        down,
        1,
        *order,
        gates=top_k_weights.to(hidden.dtype),
        grouped_in=True,
        grouped_out=False,
    )
    return out.to(hidden_states.dtype)


def register_scattermoe(loader: Callable[[], Any] | None = None) -> None:
    """Register `scattermoe` in transformers' ExpertsInterface, on the hub kernel `loader`
    (default: load_scattermoe) returns."""
    from transformers.integrations.moe import ExpertsInterface

    kernel = (loader or load_scattermoe)()
    ExpertsInterface.register(SCATTERMOE, functools.partial(scattermoe_experts_forward, kernel))
    log.info("experts_implementation: %s registered from %s", SCATTERMOE, SCATTERMOE_REPO)


def prepare_experts(model: nn.Module, config: NewtuneConfig) -> NewtuneConfig:
    """The MoE keys on the loaded model: ScatterMoE registered and set
    (`use_scattermoe` / `experts_implementation: scattermoe`), the experts quantized
    (`quantize_moe_experts`). Returns the config the adapter is built from."""
    if config.experts_implementation == SCATTERMOE:
        register_scattermoe()
        try:
            model.set_experts_implementation(SCATTERMOE)
        except (ValueError, KeyError) as exc:
            raise ModelError(
                f"`experts_implementation: {SCATTERMOE}`: transformers refused it for "
                f"{type(model).__name__} ({exc}); the model has no MoE experts module, remove "
                "the key"
            ) from exc
    return quantize_experts(model, config)


# -- llama4_linearized_experts ----------------------------------------------------------------

_LINEARIZED_BUILT: list[nn.Module] = []  # instances built inside linearized_llama4()


class LinearizedLlama4Experts(nn.Module):
    """Llama 4's routed experts with one nn.Linear per expert and projection (`gate_projs`,
    `up_projs`, `down_projs`: the layout of Axolotl's linearized checkpoints), so LoRA and
    bitsandbytes reach them as modules; same inputs and outputs as transformers'
    Llama4TextExperts (tokens already scaled and grouped by expert)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.num_experts = config.num_local_experts
        self.hidden_size = config.hidden_size
        self.expert_dim = config.intermediate_size

        def linears(inp: int, out: int) -> nn.ModuleList:
            return nn.ModuleList(nn.Linear(inp, out, bias=False) for _ in range(self.num_experts))

        self.gate_projs = linears(self.hidden_size, self.expert_dim)
        self.up_projs = linears(self.hidden_size, self.expert_dim)
        self.down_projs = linears(self.expert_dim, self.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]
        _LINEARIZED_BUILT.append(self)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(experts * tokens, hidden) grouped by expert -> the same shape."""
        grouped = hidden_states.view(self.num_experts, -1, self.hidden_size)
        outs = [
            down(up(x) * self.act_fn(gate(x)))
            for x, gate, up, down in zip(
                grouped, self.gate_projs, self.up_projs, self.down_projs, strict=True
            )
        ]
        return torch.stack(outs).view(-1, self.hidden_size)

    @property
    def gate_up_proj(self) -> torch.Tensor:
        """Empty: transformers' Llama 4 `_init_weights` initialises the fused parameters of
        every module of this (patched) class by name; the per-expert layers are nn.Linear."""
        return torch.empty(0)

    @property
    def down_proj(self) -> torch.Tensor:
        """Empty, as gate_up_proj."""
        return torch.empty(0)

    @classmethod
    @torch.no_grad()
    def from_fused(cls, fused: nn.Module, config: Any) -> LinearizedLlama4Experts:
        """The same experts as transformers' fused module (gate_up_proj (E, H, 2I), down_proj
        (E, I, H)), split into per-expert layers."""
        new = cls(config)
        _LINEARIZED_BUILT.remove(new)
        dim = new.expert_dim
        for e in range(new.num_experts):
            new.gate_projs[e].weight.copy_(fused.gate_up_proj[e, :, :dim].T)
            new.up_projs[e].weight.copy_(fused.gate_up_proj[e, :, dim:].T)
            new.down_projs[e].weight.copy_(fused.down_proj[e].T)
        return new.to(fused.gate_up_proj.dtype)


@contextlib.contextmanager
def linearized_llama4(source: str) -> Iterator[None]:
    """`llama4_linearized_experts`: while the model is built and loaded, transformers' Llama 4
    experts class is LinearizedLlama4Experts (as Axolotl patches it), so a linearized
    checkpoint's `experts.gate_projs.N` weights load; ModelError when the model has no Llama 4
    experts or its checkpoint holds the fused ones (they would stay randomly initialised)."""
    from transformers.models.llama4 import modeling_llama4

    fused = modeling_llama4.Llama4TextExperts
    _LINEARIZED_BUILT.clear()
    modeling_llama4.Llama4TextExperts = LinearizedLlama4Experts
    try:
        yield
    finally:
        modeling_llama4.Llama4TextExperts = fused
    built, _LINEARIZED_BUILT[:] = list(_LINEARIZED_BUILT), []
    if not built:
        raise ModelError(
            f"`llama4_linearized_experts: true`: {source} is not a Llama 4 model (no "
            "Llama4TextExperts to linearize); remove the key."
        )
    missing = [
        p for m in built for p in m.parameters() if not getattr(p, "_is_hf_initialized", False)
    ]
    if missing:
        raise ModelError(
            f"`llama4_linearized_experts: true`: {source} stores Llama 4's fused experts "
            "(`experts.gate_up_proj`), not per-expert `experts.gate_projs.N` / `up_projs.N` / "
            "`down_projs.N` weights, so the linearized experts would start untrained. Use a "
            "linearized checkpoint (Axolotl's axolotl-quants/*-Linearized-*), or remove the key "
            "and reach the fused experts with `lora_target_parameters: [feed_forward.experts."
            "gate_up_proj, feed_forward.experts.down_proj]`."
        )
