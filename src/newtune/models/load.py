"""Load the base model a config names: local folder, hub id, or .gguf file."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from newtune.config.compat import attention
from newtune.config.compat2 import tensor_parallel_kwargs
from newtune.config.compat3 import model_quantization
from newtune.config.resolve import RunPlan
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError, ModelError
from newtune.models.location import (
    ModelLocation,
    check_json_files,
    load_error,
    locate,
    transformers_class,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelOptions:
    """How to load a model, from the config's model keys (everything but the location)."""

    attn: str = "sdpa"
    model_type: str | None = None
    config_source: str | None = None  # base_model_config
    revision: str | None = None
    trust_remote_code: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    quantize: str | None = None  # "4bit" | "8bit"
    bnb_kwargs: dict[str, Any] = field(default_factory=dict)
    device_map: Any = None
    max_memory: dict[Any, Any] | None = None
    num_labels: int | None = None  # a sequence classifier (reward model) with this many outputs
    token_classification: bool = False  # with num_labels: a token classifier (process reward model)
    tensor_parallel: dict[str, Any] = field(default_factory=dict)  # tp_plan/tp_size (train.compat2)
    config_class: str | None = None  # cls_model_config: a transformers config class
    reinit: bool = False  # reinit_weights: built from the config, freshly initialised
    quantization: Any = None  # model_quantization_config's transformers object (config.compat3)
    linearized_llama4: bool = False  # llama4_linearized_experts (models/moe.py)
    hybrid_attention: bool = False  # gemma4_hybrid_attn_impl (models/hybrid_attention.py)

    @classmethod
    def from_config(
        cls, config: NewtuneConfig, plan: RunPlan | None = None, quantize: bool = True
    ) -> ModelOptions:
        """The options a config asks for; `quantize=False` loads full weights (merging)."""
        bits = "4bit" if config.load_in_4bit else ("8bit" if config.load_in_8bit else None)
        return cls(
            attn=attention(config),  # xformers is read as sdpa
            model_type=config.model_type,
            config_source=config.base_model_config,
            revision=config.revision_of_model,
            trust_remote_code=bool(config.trust_remote_code),
            overrides=dict(config.overrides_of_model_config or {}),
            quantize=bits if quantize else None,
            bnb_kwargs=dict(config.bnb_config_kwargs or {}),
            device_map=_device_map(config, plan, bits if quantize else None),
            max_memory=_max_memory(config),
            num_labels=1 if getattr(config, "reward_model", None) else _prm_labels(config),
            token_classification=bool(getattr(config, "process_reward_model", None)),
            tensor_parallel=tensor_parallel_kwargs(config),  # tensor_parallel_size
            reinit=bool(config.reinit_weights),
            config_class=config.cls_model_config,
            quantization=model_quantization(config) if quantize else None,
            linearized_llama4=bool(config.llama4_linearized_experts),
            hybrid_attention=bool(config.gemma4_hybrid_attn_impl),
        )


def _prm_labels(config: NewtuneConfig) -> int | None:
    """A process reward model's classes (`num_labels`, 2 by default); None for other methods."""
    if not getattr(config, "process_reward_model", None):
        return None
    return getattr(config, "num_labels", None) or 2


def _device_map(config: NewtuneConfig, plan: RunPlan | None, bits: str | None) -> Any:
    """`device_map` from the config; quantized models need one, one device per rank."""
    if config.device_map is not None:
        return config.device_map
    if bits is None:
        return None  # Trainer places the model
    device = plan.device if plan is not None else "cpu"
    if device == "cuda":
        return {"": plan.local_rank if plan is not None else 0}
    return {"": device}


def _max_memory(config: NewtuneConfig) -> dict[Any, Any] | None:
    """`max_memory`, or `gpu_memory_limit` applied to every visible GPU."""
    if config.max_memory is not None:
        return dict(config.max_memory)
    if config.gpu_memory_limit is None:
        return None
    limit = config.gpu_memory_limit
    if isinstance(limit, int) or str(limit).isdigit():
        limit = f"{limit}GiB"
    gpus = torch.cuda.device_count()
    return {i: limit for i in range(gpus)} or None


def quantization_config(options: ModelOptions, dtype: torch.dtype) -> Any:
    """bitsandbytes settings for `load_in_4bit` (NF4, double quant) or `load_in_8bit`."""
    if options.quantize is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"`load_in_{options.quantize}: true` needs bitsandbytes, which is not installed; "
            "run `pip install 'newtune[bnb]'` (or `pip install bitsandbytes`)."
        )
    from transformers import BitsAndBytesConfig

    if options.quantize == "4bit":
        kwargs: dict[str, Any] = {
            "load_in_4bit": True,
            "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_quant_storage": dtype,
        }
    else:
        kwargs = {"load_in_8bit": True}
    kwargs.update(options.bnb_kwargs)
    try:
        return BitsAndBytesConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"`bnb_config_kwargs` is not valid for BitsAndBytesConfig: {exc}"
        ) from exc


def apply_overrides(config: Any, overrides: dict[str, Any]) -> None:
    """Set `overrides_of_model_config` values; a mapping updates a mapping value.

    transformers 5 keeps RoPE settings in `rope_parameters`: `rope_theta` and `rope_scaling`
    (Axolotl's spellings) update it, as they did the old attributes.
    """
    for name, new in overrides.items():
        old = getattr(config, name, None)
        rope = getattr(config, "rope_parameters", None)
        if name in ("rope_theta", "rope_scaling") and isinstance(rope, dict):
            update = dict(new or {}) if name == "rope_scaling" else {"rope_theta": new}
            if "type" in update:
                update.setdefault("rope_type", update.pop("type"))
            config.rope_parameters = new = {**rope, **update}
            name = "rope_parameters"
        else:
            if isinstance(old, dict) and isinstance(new, dict):
                new = {**old, **new}
            setattr(config, name, new)
        log.info("model config: %s = %r (was %r)", name, new, old)


def _model_config(loc: ModelLocation, options: ModelOptions, key: str, value: str) -> Any:
    """The model config (from `base_model_config` if given), with the overrides applied."""
    source = options.config_source
    where = locate(source, "base_model_config") if source else loc
    reader = getattr(transformers, options.config_class) if options.config_class else AutoConfig
    try:
        config = reader.from_pretrained(
            where.name_or_path,
            revision=options.revision,
            trust_remote_code=options.trust_remote_code,
            **where.kwargs(),
        )
    except (OSError, ValueError) as exc:
        raise load_error(
            "base_model_config" if source else key, source or value, where, exc
        ) from exc
    apply_overrides(config, options.overrides)
    if loc.gguf_file and hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_model(
    value: str,
    dtype: str = "float32",
    key: str = "base_model",
    attn: str = "sdpa",
    options: ModelOptions | None = None,
) -> Any:
    """A causal LM from a folder, hub id or .gguf file, in `dtype`, loaded as `options` say."""
    options = options or ModelOptions(attn=attn)
    loc = locate(value, key)
    check_json_files(key, value, loc)
    torch_dtype = DTYPES[dtype]
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "attn_implementation": options.attn,
        "revision": options.revision,
        "trust_remote_code": options.trust_remote_code,
    }
    if options.config_source or options.overrides or options.config_class:
        kwargs["config"] = _model_config(loc, options, key, value)
    if options.device_map is not None and not options.tensor_parallel:  # TP places the shards
        kwargs["device_map"] = options.device_map
    kwargs.update(options.tensor_parallel)
    if options.max_memory is not None:
        kwargs["max_memory"] = options.max_memory
    quant = quantization_config(options, torch_dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if options.quantization is not None:  # model_quantization_config
        kwargs["quantization_config"] = options.quantization
    if options.num_labels is not None and "config" in kwargs:
        kwargs["config"].num_labels = options.num_labels
    elif options.num_labels is not None:
        kwargs["num_labels"] = options.num_labels
    default: Any = AutoModelForCausalLM
    if options.num_labels is not None:
        default = AutoModelForSequenceClassification
        if options.token_classification:
            default = AutoModelForTokenClassification
    cls = transformers_class(
        "model_type", options.model_type, default, "AutoModelForCausalLM or LlamaForCausalLM"
    )
    if options.reinit:
        return _hybrid(_reinitialised(cls, loc, options, key, value, kwargs), options)
    swap: Any = contextlib.nullcontext()
    if options.linearized_llama4:
        from newtune.models.moe import linearized_llama4

        swap = linearized_llama4(value)
    try:
        with swap:
            model = cls.from_pretrained(loc.name_or_path, **kwargs, **loc.kwargs())
    except (OSError, ValueError) as exc:
        raise load_error(key, value, loc, exc) from exc
    if loc.gguf_file:
        model = _plain_from_gguf(model, loc, torch_dtype, options)
    return _hybrid(model, options)


def _hybrid(model: Any, options: ModelOptions) -> Any:
    """`gemma4_hybrid_attn_impl`: Gemma 4's full-attention layers moved to sdpa."""
    if options.hybrid_attention:
        from newtune.models.hybrid_attention import apply_hybrid_attention

        apply_hybrid_attention(model)
    return model


def _reinitialised(
    cls: Any, loc: ModelLocation, options: ModelOptions, key: str, value: str, kwargs: dict
) -> Any:
    """`reinit_weights`: the model built from its config with fresh weights (transformers'
    `from_config` runs the model's `_init_weights`), as Axolotl's `_load_model_from_config`."""
    config = kwargs.get("config") or _model_config(loc, options, key, value)
    if "num_labels" in kwargs:
        config.num_labels = kwargs["num_labels"]
    model = cls.from_config(
        config,
        dtype=kwargs["dtype"],
        attn_implementation=options.attn,
        trust_remote_code=options.trust_remote_code,
    )
    log.info("reinit_weights: %s built with freshly initialised weights", type(model).__name__)
    return model


def enable_gradient_checkpointing(model: Any, config: NewtuneConfig) -> None:
    """Recompute activations in backward; `offload` also keeps saved activations on the CPU."""
    kwargs = {"use_reentrant": False, **(config.gradient_checkpointing_kwargs or {})}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if kwargs["use_reentrant"]:
        # reentrant checkpoints need an input that requires grad when the embeddings are frozen
        model.enable_input_require_grads()
    if config.gradient_checkpointing in ("offload", "unsloth"):
        _offload_activations(model)


def _offload_activations(model: Any) -> None:
    """Run the forward under `save_on_cpu`: tensors kept for backward wait in (pinned) CPU memory."""
    forward = model.forward
    pin = torch.cuda.is_available()

    @functools.wraps(forward)
    def offloaded(*args: Any, **kwargs: Any) -> Any:
        ctx = (
            torch.autograd.graph.save_on_cpu(pin_memory=pin)
            if torch.is_grad_enabled()
            else contextlib.nullcontext()
        )
        with ctx:
            return forward(*args, **kwargs)

    model.forward = offloaded


def build_model(
    config: NewtuneConfig, plan: RunPlan, tokenizer: Any, new_ids: Sequence[int] = ()
) -> Any:
    """The model to train: loaded as the config says, resized for new tokens, adapter attached.

    `new_ids` are the token ids the config added (from `load_tokenizer`): a LoRA run trains
    the embeddings in full when there are any.
    """
    from newtune.models.adapters import attach_lora, describe_parameters
    from newtune.models.tokenizer import resize_embeddings

    # `tf32` is applied by train.precision.tf32_scope for the run only (not process-wide here)
    options = ModelOptions.from_config(config, plan)
    from newtune.train.expert_parallel import with_expert_parallel

    options = with_expert_parallel(options, config, plan)  # expert_parallel_size
    model = load_model(config.base_model, plan.dtype, options=options)
    from newtune.models.moe import expert_lora, prepare_experts

    config = prepare_experts(model, config)  # quantize_moe_experts, scattermoe
    if config.flash_attn_fuse_mlp:  # training only: inference and merging load the plain model
        from newtune.models.fused_mlp import check_engine, fuse_gated_mlps

        check_engine(config)
        fuse_gated_mlps(model)
    if config.tiled_mlp:  # training only, after the fusion: the fused MLP is then tiled
        from newtune.models.tiled_mlp import apply_tiled_mlp

        original = config.tiled_mlp_use_original_mlp is not False
        ds = config.deepspeed is not None
        apply_tiled_mlp(model, config.tiled_mlp_num_shards, original, deepspeed=ds)
    if config.fused_attn_kernel:  # q/k norm + RoPE compiled into one kernel (training only)
        from newtune.models.fused_attention import apply_fused_attention

        apply_fused_attention(model)
    model.config.use_cache = False  # packed rows are isolated only without a KV cache
    resize_embeddings(model, tokenizer, config)
    if options.quantize is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model, config)
    if plan.train_mode in ("lora", "qlora"):
        with expert_lora(model):  # LoRA on quantized experts
            model = attach_lora(model, config, new_tokens=bool(new_ids))
    log.info(describe_parameters(model))
    return model


def _plain_from_gguf(
    model: Any, loc: ModelLocation, dtype: torch.dtype, options: ModelOptions
) -> Any:
    """Rebuild a dequantized GGUF model as a plain (non-quantized) model of the same class.

    transformers marks GGUF-loaded models as quantized, which stops Trainer and peft from
    treating them as ordinary weights; the weights themselves are already dequantized.
    """
    config = AutoConfig.from_pretrained(loc.name_or_path, gguf_file=loc.gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = f"{loc.name_or_path}/{loc.gguf_file}"
    apply_overrides(config, options.overrides)
    plain = type(model)._from_config(config, dtype=dtype, attn_implementation=options.attn)
    result = plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    unexpected = [k for k in result.missing_keys if "lm_head" not in k]
    if unexpected or result.unexpected_keys:
        raise ModelError(
            f"GGUF conversion of {loc.name_or_path}/{loc.gguf_file} failed: missing "
            f"{unexpected[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    plain.generation_config = model.generation_config
    return plain.eval()
