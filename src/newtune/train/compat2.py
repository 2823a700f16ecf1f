"""The Axolotl plugin/kernel/parallelism keys applied to a run (config/schema/compat2.py):
Cut Cross Entropy, hub kernels, experts implementation, unfrozen_parameters, activation
offloading, trackers and accelerate's ParallelismConfig."""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch
from transformers import TrainerCallback

from newtune.config.compat2 import (
    cce_enabled,
    parallelism_config,
    swanlab_enabled,
    trackio_enabled,
    unfreeze_pattern,
)
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


def _base(model: Any) -> Any:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# -- unfrozen_parameters ---------------------------------------------------------------------


def _zero_rows_hook(keep: list[tuple[int, int]]) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
        for start, end in keep:
            mask[start:end] = True
        return grad * mask.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype)

    return hook


def freeze_except(model: Any, patterns: list[str]) -> list[str]:
    """Axolotl's freeze_layers_except: requires_grad only on parameters whose name a pattern
    matches (re.match); a row range `[a:b]` trains those rows only (the other rows' gradient is
    zeroed). Returns the trained names; no match at all is a ConfigError."""
    parsed = [(p, *unfreeze_pattern(p)) for p in patterns]
    trained = []
    for name, param in model.named_parameters():
        hits = [(p, rows) for p, regex, rows in parsed if regex.match(name)]
        param.requires_grad = bool(hits)
        if not hits:
            continue
        trained.append(name)
        ranges = [rows for _, rows in hits]
        if any(r is None for r in ranges):
            continue
        size = param.shape[0]
        keep = [(start, size if end is None else min(end, size)) for start, end in ranges]
        param.register_hook(_zero_rows_hook(keep))
    if not trained:
        raise ConfigError(
            f"`unfrozen_parameters` {patterns} matches none of the model's parameters, so "
            "nothing would train; patterns are matched at the start of names such as "
            f"{next(iter(n for n, _ in model.named_parameters()))!r}"
        )
    if any(k in p for p in patterns for k in ("embed_tokens", "lm_head")):
        model.enable_input_require_grads()
    return trained


# -- Cut Cross Entropy -----------------------------------------------------------------------


def _cce_module() -> Any:
    try:
        return importlib.import_module("cut_cross_entropy")
    except ImportError as exc:
        raise ConfigError(
            "Cut Cross Entropy (`cut_cross_entropy` / CutCrossEntropyPlugin) needs the "
            f"cut-cross-entropy package, which cannot be imported here ({exc}); run `pip install "
            "cut-cross-entropy` on a CUDA machine, or set `cut_cross_entropy: false`"
        ) from exc


def apply_cut_cross_entropy(model: Any, impl: str = "cce") -> None:
    """Replace the causal LM's training loss with cut_cross_entropy.linear_cross_entropy on
    the hidden states and the output head's weight (the logits are never materialised).

    Eval and calls without labels run the model's own forward (they need logits). The loss is
    summed and divided by `num_items_in_batch` when the Trainer passes it, else averaged over
    the trained tokens, as transformers' ForCausalLMLoss does.
    """
    cce = _cce_module()
    lm = _base(model)
    if not type(lm).__name__.endswith("ForCausalLM"):
        raise ModelError(
            f"Cut Cross Entropy replaces the loss of a text causal LM's forward; "
            f"{type(lm).__name__} is not one: set `cut_cross_entropy: false`"
        )
    head = lm.get_output_embeddings()
    config = lm.config
    if head is None or getattr(head, "bias", None) is not None:
        raise ModelError(
            f"Cut Cross Entropy needs a bias-free output head; {type(lm).__name__} has "
            f"{'none' if head is None else 'a bias'}: set `cut_cross_entropy: false`"
        )
    if getattr(config, "output_router_logits", False):
        raise ModelError(
            "Cut Cross Entropy computes the language-model loss only, and this MoE config adds "
            "the router's auxiliary loss (`output_router_logits: true`); set it false in "
            "`overrides_of_model_config`, or `cut_cross_entropy: false`"
        )
    # logits = scale * (h @ W.T) is (scale * h) @ W.T: Granite divides, Cohere multiplies
    scale = 1.0 / getattr(config, "logits_scaling", 1.0) * getattr(config, "logit_scale", 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    original = lm.forward
    decoder = lm.get_decoder()

    def forward(
        *args: Any, labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any
    ) -> Any:
        if labels is None or not lm.training:
            kwargs.pop("shift_labels", None)
            return original(*args, labels=labels, **kwargs)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("shift_labels", None)
        out = decoder(*args, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if scale != 1.0:
            hidden = hidden * scale
        summed = num_items_in_batch is not None
        loss = cce.linear_cross_entropy(
            hidden,
            head.weight,
            labels,
            ignore_index=IGNORE_INDEX,
            softcap=softcap,
            reduction="sum" if summed else "mean",
            shift=True,
            impl=impl,
        )
        if summed:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=loss, logits=None)

    forward.__doc__ = original.__doc__  # no __wrapped__: newtune must not pass logits_to_keep
    lm.forward = forward
    log.info("Cut Cross Entropy (%s) computes the training loss of %s", impl, type(lm).__name__)


# -- quantization-aware training (torchao) ---------------------------------------------------


def _torchao(what: str) -> Any:
    try:
        return importlib.import_module(what)
    except ImportError as exc:
        raise ConfigError(
            f"`qat` needs the torchao package, which cannot be imported here ({exc}); run "
            "`pip install torchao`, or remove `qat`"
        ) from exc


def qat_config(qat: Any, step: str = "prepare", embedding: bool = False) -> Any:
    """torchao's QATConfig for Axolotl's `qat:` layout (weights, and activations unless
    `embedding`: torchao fake-quantizes embedding weights only)."""
    tq = _torchao("torchao.quantization.qat")
    if step == "convert":
        return tq.QATConfig(step="convert")
    weight, act = qat.weight_dtype, None if embedding else qat.activation_dtype
    if weight in ("int4", "int8"):
        bits = torch.int4 if weight == "int4" else torch.int8
        weight_fq = tq.IntxFakeQuantizeConfig(bits, group_size=qat.group_size, is_symmetric=True)
    elif weight == "float8_e4m3fn":
        weight_fq = tq.Float8FakeQuantizeConfig(dtype=torch.float8_e4m3fn)
    else:  # nvfp4 / mxfp4: torchao's prototype formats (CUDA)
        return _mx_qat_config(weight, qat.group_size)
    act_fq = None
    if act == "int8":
        act_fq = tq.IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    elif act == "float8_e4m3fn":
        act_fq = tq.Float8FakeQuantizeConfig(dtype=torch.float8_e4m3fn)
    return tq.QATConfig(activation_config=act_fq, weight_config=weight_fq, step="prepare")


def _mx_qat_config(weight: str, group_size: int | None) -> Any:
    tq = _torchao("torchao.quantization.qat")
    if weight == "nvfp4":
        proto = _torchao("torchao.prototype.mx_formats")
        return tq.QATConfig(proto.NVFP4WeightOnlyConfig(), step="prepare")
    proto = _torchao("torchao.prototype.qat")
    fq = proto.MXFakeQuantizeConfig(dtype=torch.float4_e2m1fn_x2, block_size=group_size or 32)
    return tq.QATConfig(activation_config=fq, weight_config=fq)


def prepare_qat(model: Any, qat: Any) -> None:
    """Swap the linear layers (and embeddings with quantize_embedding) for torchao's
    fake-quantized ones, as Axolotl's prepare_model_for_qat does."""
    quantize_ = _torchao("torchao.quantization").quantize_
    quantize_(model, qat_config(qat))
    if qat.quantize_embedding:
        quantize_(
            model,
            qat_config(qat, embedding=True),
            filter_fn=lambda m, _: isinstance(m, torch.nn.Embedding),
        )


def _fake_quant_modules(model: Any) -> list[Any]:
    tq = _torchao("torchao.quantization.qat")
    kinds = (tq.FakeQuantizedLinear, tq.FakeQuantizedEmbedding)
    return [m for m in model.modules() if isinstance(m, kinds)]


def set_fake_quant(model: Any, enabled: bool) -> int:
    """Turn the fake quantizers of every fake-quantized layer on or off; how many layers."""
    layers = _fake_quant_modules(model)
    for layer in layers:
        for name in ("weight_fake_quantizer", "activation_fake_quantizer"):
            quantizer = getattr(layer, name, None)
            if quantizer is not None and hasattr(quantizer, "enabled"):
                quantizer.enabled = enabled
    return len(layers)


def convert_qat(model: Any, qat: Any) -> None:
    """Fake-quantized layers back to plain nn.Linear / nn.Embedding (the trained weights)."""
    quantize_ = _torchao("torchao.quantization").quantize_
    quantize_(model, qat_config(qat, "convert"))
    if qat.quantize_embedding:
        quantize_(
            model,
            qat_config(qat, "convert"),
            filter_fn=lambda m, _: isinstance(m, torch.nn.Embedding),
        )


class QATCallback(TrainerCallback):
    """`qat.fake_quant_after_n_steps`: fake quantization off until that step; at the end of
    training the layers are converted back to plain ones, so the saved model is a normal
    transformers model (quantize it afterwards, e.g. with torchao)."""

    def __init__(self, qat: Any) -> None:
        self.qat = qat

    def on_step_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **_: Any
    ) -> None:
        """Switch fake quantization at step 0 (off) and at fake_quant_after_n_steps (on)."""
        after = self.qat.fake_quant_after_n_steps
        if after and model is not None and state.global_step in (0, after):
            set_fake_quant(model, state.global_step == after)

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **_: Any
    ) -> None:
        """Convert the fake-quantized layers back before the final save."""
        if model is not None:
            convert_qat(model, self.qat)


def callbacks2(config: NewtuneConfig) -> list[TrainerCallback]:
    """The callbacks these keys need (QAT; SwanLab: NewtuneSwanLabCallback)."""
    callbacks: list[TrainerCallback] = []
    if config.qat is not None:
        callbacks.append(QATCallback(config.qat))
    if swanlab_enabled(config):
        callbacks.append(swanlab_callback(config))
    from newtune.train.compat4 import callbacks4

    return callbacks + callbacks4(config)  # use_otel_metrics


# -- the model -------------------------------------------------------------------------------


def apply_model_keys(model: Any, config: NewtuneConfig) -> None:
    """Apply unfrozen_parameters, experts_implementation, use_kernels, activation_offloading
    and Cut Cross Entropy to the built model (adapter attached)."""
    from newtune.train.compat4 import apply_model_keys4, apply_onebitllms

    base = _base(model)
    if config.use_onebitllms:
        apply_onebitllms(model)  # new layers first: unfrozen_parameters then sees them
    trained = None
    if config.unfrozen_parameters:
        trained = freeze_except(model, config.unfrozen_parameters)
        log.info("unfrozen_parameters: training %s of the model's parameters", len(trained))
    apply_model_keys4(model, config, trained)  # flex_attn_compile_kwargs, adapter check
    if config.experts_implementation:
        try:
            base.set_experts_implementation(config.experts_implementation)
        except (ValueError, ImportError) as exc:
            raise ModelError(
                f"`experts_implementation: {config.experts_implementation}`: transformers "
                f"refused it for {type(base).__name__} ({exc}); remove the key"
            ) from exc
    if config.use_kernels:
        try:
            base.set_use_kernels(True)
        except (ValueError, ImportError, OSError) as exc:
            raise ModelError(
                f"`use_kernels: true`: transformers could not kernelize {type(base).__name__} "
                f"({exc}); the kernels come from the Hugging Face hub (`pip install kernels`, "
                "online or in the hub cache), or remove `use_kernels`"
            ) from exc
    offload = config.activation_offloading
    if offload in (True, "legacy") and config.gradient_checkpointing not in ("offload", "unsloth"):
        from newtune.models.load import _offload_activations

        _offload_activations(model)
    if config.qat is not None:
        prepare_qat(model, config.qat)
    if cce_enabled(config):
        apply_cut_cross_entropy(model)


# -- TrainingArguments -----------------------------------------------------------------------


def _swanlab_init_extras(config: NewtuneConfig) -> dict[str, str]:
    """swanlab.init arguments transformers' SwanLabCallback does not pass; the project too:
    swanlab >= 0.10 reads SWANLAB_PROJECT as its settings' `project` section (JSON), so the
    variable transformers takes the project from cannot be set."""
    extras = {
        "project": config.swanlab_project,
        "description": config.swanlab_description,
        "workspace": config.swanlab_workspace,
    }
    return {k: v for k, v in extras.items() if v is not None}


def report_targets2(config: NewtuneConfig) -> list[str]:
    """The trackers these keys add to `report_to` (SwanLab reports through
    NewtuneSwanLabCallback instead: callbacks2)."""
    return ["trackio"] if trackio_enabled(config) else []


class _InitWith:
    """The swanlab module, with extra keyword arguments added to its `init`."""

    def __init__(self, module: Any, extras: dict[str, str]) -> None:
        self._module, self._extras = module, extras

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def init(self, **kwargs: Any) -> Any:
        """swanlab.init with the config's project/description/workspace (over what
        transformers passes: its `project` comes from SWANLAB_PROJECT, unset)."""
        return self._module.init(**{**kwargs, **self._extras})

    def get_run(self) -> Any:
        """The active run, or None: transformers tests for None, and swanlab >= 0.10's
        get_run raises without a run (its has_run answers)."""
        has_run = getattr(self._module, "has_run", None)
        if has_run is not None and not has_run():
            return None
        return self._module.get_run()


def swanlab_callback(config: NewtuneConfig) -> TrainerCallback:
    """transformers' SwanLabCallback whose swanlab.init also gets swanlab_description and
    swanlab_workspace, and whose setup works with swanlab >= 0.10 (get_run raises there)."""
    from transformers.integrations import SwanLabCallback

    extras = _swanlab_init_extras(config)

    class NewtuneSwanLabCallback(SwanLabCallback):
        def setup(self, args: Any, state: Any, model: Any, **kwargs: Any) -> None:
            real = self._swanlab
            self._swanlab = _InitWith(real, extras)
            try:
                super().setup(args, state, model, **kwargs)
            finally:
                self._swanlab = real

    return NewtuneSwanLabCallback()


def tracker_env2(config: NewtuneConfig) -> dict[str, str]:
    """SWANLAB_* variables transformers' SwanLabCallback (and swanlab) read."""
    if not swanlab_enabled(config):
        return {}
    values = {
        "SWANLAB_MODE": config.swanlab_mode,
        "SWANLAB_LOG_MODEL": None
        if config.swanlab_log_model is None
        else str(config.swanlab_log_model).lower(),
        "SWANLAB_API_KEY": config.swanlab_api_key,
        "SWANLAB_WEB_HOST": config.swanlab_web_host,
        "SWANLAB_API_HOST": config.swanlab_api_host,
    }
    return {k: str(v) for k, v in values.items() if v is not None}


def training_kwargs2(config: NewtuneConfig, world_size: int = 1) -> dict[str, Any]:
    """TrainingArguments entries of these keys (trackio project/space, run names, parallelism)."""
    kwargs: dict[str, Any] = {}
    if trackio_enabled(config):
        kwargs["project"] = config.trackio_project_name
        if config.trackio_space_id:
            kwargs["trackio_space_id"] = config.trackio_space_id
    name = config.trackio_run_name if trackio_enabled(config) else None
    if swanlab_enabled(config) and config.swanlab_experiment_name:
        name = name or config.swanlab_experiment_name
    if name and not config.wandb_name:
        kwargs["run_name"] = name
    try:
        parallel = parallelism_config(config, world_size)
    except ValueError:  # `train` refuses this launch at start (parallel_problem)
        parallel = None
    if parallel is not None:
        kwargs["parallelism_config"] = parallel
    from newtune.train.expert_parallel import training_kwargs as ep_training_kwargs

    kwargs.update(ep_training_kwargs(config))  # expert_parallel_size: save_only_model
    return kwargs
