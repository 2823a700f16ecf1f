"""Rules of the Axolotl data-order, re-init, kernel and quantization keys (schema/compat3.py)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError


def _streamed(cfg: NewtuneConfig) -> bool:
    return bool(cfg.pretraining_dataset or cfg.streaming)


def compat3_rules(cfg: NewtuneConfig, names: Callable[[str], str] = str) -> list[str]:
    """Errors for dataset_exact_deduplication, sample_packing_sequentially,
    pretrain_multipack_attn and model_quantization_config."""
    errors = []
    if cfg.dataset_exact_deduplication and _streamed(cfg):
        errors.append(
            f"`{names('dataset_exact_deduplication')}` deduplicates prepared data, and streamed "
            "data (`pretraining_dataset` / `streaming: true`) is never held whole; remove one "
            "(Axolotl refuses this too)"
        )
    if cfg.sample_packing_sequentially and not cfg.sample_packing:
        errors.append(
            f"`{names('sample_packing_sequentially')}: true` chooses how rows are packed, and "
            "`sample_packing` is off, so nothing would change; set `sample_packing: true` or "
            "remove it (for rows in dataset order without packing: `curriculum_sampling: true`)"
        )
    if cfg.curriculum_sampling and cfg.group_by_length:
        errors.append(
            f"`{names('curriculum_sampling')}` keeps the dataset order and `group_by_length` "
            "reorders rows by length; keep one"
        )
    if cfg.pretrain_multipack_attn is False:
        errors.append(
            f"`{names('pretrain_multipack_attn')}: false` asks packed samples to attend to each "
            "other; newtune always isolates packed samples (position_ids restart per sample, so "
            "flash/flex/sdpa attention stays within each), so it cannot be honoured: remove it, "
            "or set `pretraining_sample_concatenation` / `sample_packing: false`"
        )
    if cfg.reinit_weights and cfg.adapter:
        errors.append(
            f"`{names('reinit_weights')}` trains from fresh random weights, which are not "
            f"saved, and `adapter: {cfg.adapter}` saves only the adapter: it could never be "
            "loaded onto its base again; remove `adapter` (a full training from scratch) or "
            "`reinit_weights`"
        )
    if cfg.fused_attn_kernel:  # the model type, where its config.json is on disk
        from newtune.config.fused_attention import validate_problem

        problem = validate_problem(cfg.base_model_config or cfg.base_model, cfg.revision_of_model)
        errors += [problem] if problem else []
    if cfg.gemma4_hybrid_attn_impl and cfg.attn_implementation != "flash_attention_2":
        errors.append(
            f"`{names('gemma4_hybrid_attn_impl')}: true` runs Gemma 4's sliding-window layers "
            "on flash_attention_2 and its full-attention layers on sdpa, and "
            f"`{names('attn_implementation')}` is `{cfg.attn_implementation}`; set "
            "`attn_implementation: flash_attention_2` (or leave it unset), or remove "
            f"`gemma4_hybrid_attn_impl` to run every layer on {cfg.attn_implementation} "
            "(Axolotl refuses this too)"
        )
    errors += _fused_mlp_rules(cfg, names)
    errors += _tiled_mlp_rules(cfg, names)
    if cfg.model_quantization_config and (cfg.load_in_4bit or cfg.load_in_8bit):
        errors.append(
            f"`{names('model_quantization_config')}` and `load_in_4bit`/`load_in_8bit` both set "
            "the model's quantization_config; keep one (Axolotl refuses this too)"
        )
    if cfg.model_quantization_config_kwargs and not cfg.model_quantization_config:
        errors.append(
            f"`{names('model_quantization_config_kwargs')}` without "
            "`model_quantization_config`: name the class they are for (e.g. Mxfp4Config)"
        )
    name = cfg.cls_model_config
    if name and not _is_config_class(name):
        errors.append(
            f"`{names('cls_model_config')}: {name}` is not a transformers config class (e.g. "
            "LlamaConfig, Gemma3TextConfig); fix the name or remove it (AutoConfig reads the "
            "model's config)"
        )
    unknown = unknown_quant_kwargs(cfg)
    if unknown:
        errors.append(
            f"`{names('model_quantization_config_kwargs')}`: {', '.join(unknown)} "
            f"{'is not a setting' if len(unknown) == 1 else 'are not settings'} of transformers' "
            f"{cfg.model_quantization_config} (it takes "
            f"{', '.join(quant_params(cfg.model_quantization_config))}); remove or rename them"
        )
    return errors + _diffusion_rules(cfg, names)


def _diffusion_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    """Errors for `diffusion` / DiffusionPlugin (masked-diffusion training)."""
    from newtune.config.compat import attention
    from newtune.config.compat2 import diffusion_enabled
    from newtune.config.schema.multimodal import is_multimodal
    from newtune.config.schema.preference import training_method

    if not diffusion_enabled(cfg):
        if cfg.diffusion is None:
            return []
        return [
            f"`{names('diffusion')}` is read by Axolotl's DiffusionPlugin, which `plugins` does "
            "not list, so the run would train a causal LM and ignore it; add "
            "`axolotl.integrations.diffusion.DiffusionPlugin` to `plugins`, or remove the block"
        ]
    errors = []
    if training_method(cfg) != "sft":
        errors.append(
            "DiffusionPlugin trains a masked-diffusion LM on SFT or pretraining data, and "
            "`rl`/`reward_model` ask for preference or reward training; remove one (Axolotl's "
            "plugin has no RL support either)"
        )
    if attention(cfg) not in ("sdpa", "eager"):
        errors.append(
            f"DiffusionPlugin attends bidirectionally through a 4-D attention mask, which "
            f"`{names('attn_implementation')}: {cfg.attn_implementation}` does not take; use "
            "`attn_implementation: sdpa` (or eager); Axolotl's plugin has no flash attention "
            "support either"
        )
    if is_multimodal(cfg):
        errors.append(
            "DiffusionPlugin trains text models; `processor_type` asks for a vision-language "
            "model: remove one"
        )
    generating = [k for k in ("do_causal_lm_eval", "eval_table_size") if getattr(cfg, k)]
    if generating:
        keys = " and ".join(f"`{names(k)}`" for k in generating)
        errors.append(
            f"{keys} generate token by token, left to right, which a masked-diffusion model "
            "does not do; remove them (DiffusionPlugin's `generate_samples` / "
            "`generation_interval` log denoised samples)"
        )
    return errors


def quant_params(name: str) -> list[str]:
    """The named settings of a transformers quantization config class."""
    import transformers

    params = inspect.signature(getattr(transformers, name).__init__).parameters
    return [p for p, v in params.items() if p != "self" and v.kind is v.POSITIONAL_OR_KEYWORD]


def unknown_quant_kwargs(cfg: NewtuneConfig) -> list[str]:
    """model_quantization_config_kwargs keys its class does not name (its **kwargs would
    swallow them unread)."""
    if not cfg.model_quantization_config or not cfg.model_quantization_config_kwargs:
        return []
    known = set(quant_params(cfg.model_quantization_config))
    return [f"`{k}`" for k in cfg.model_quantization_config_kwargs if k not in known]


def model_quantization(cfg: NewtuneConfig) -> Any:
    """The transformers quantization config object `model_quantization_config` names, built
    with its kwargs (None when unset); ConfigError when the class refuses the kwargs."""
    name = cfg.model_quantization_config
    if not name:
        return None
    import transformers

    kwargs = dict(cfg.model_quantization_config_kwargs or {})
    try:
        return getattr(transformers, name)(**kwargs)
    except (TypeError, ValueError, ImportError) as exc:
        raise ConfigError(
            f"`model_quantization_config_kwargs` {kwargs} are not valid for transformers' "
            f"{name}: {exc}; fix or remove them"
        ) from exc


def _fused_mlp_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    """`flash_attn_fuse_mlp` (models/fused_mlp.py): full fine-tunes, one process or DDP/ZeRO-1/2."""
    if not cfg.flash_attn_fuse_mlp:
        return []
    key, errors = names("flash_attn_fuse_mlp"), []
    if cfg.adapter:
        errors.append(
            f"`{key}: true` replaces each MLP's gate_proj and up_proj by one packed "
            f"`gate_up_proj`, and `adapter: {cfg.adapter}` puts LoRA on those projections (and "
            "merges into them): it would find none; remove `flash_attn_fuse_mlp` (Axolotl "
            "refuses fused modules with LoRA/QLoRA too)"
        )
    if cfg.fsdp or cfg.fsdp_config:
        errors.append(
            f"`{key}: true` keeps the model's gate_proj/up_proj checkpoint keys with state-dict "
            "hooks, and FSDP builds and loads its state dicts by parameter names "
            "(`gate_up_proj`); remove `flash_attn_fuse_mlp` under FSDP"
        )
    if cfg.liger_glu_activation:
        errors.append(
            f"`{key}` and `liger_glu_activation` both replace the MLP's forward (the fused MLP "
            "already runs liger's SiLU-mul on CUDA when liger-kernel is installed); keep one"
        )
    hit = [p for p in cfg.unfrozen_parameters or [] if "gate_proj" in p or "up_proj" in p]
    if hit:
        errors.append(
            f"`unfrozen_parameters` names {hit[0]!r}, and `{key}: true` packs gate_proj and "
            "up_proj into one `gate_up_proj` parameter (trained or frozen together); name "
            "`mlp.gate_up_proj` instead, or remove `flash_attn_fuse_mlp`"
        )
    return errors


def _tiled_mlp_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    """`tiled_mlp` (models/tiled_mlp.py) and its two knobs."""
    key, errors = names("tiled_mlp"), []
    knobs = []
    if cfg.tiled_mlp_num_shards is not None:
        knobs.append(f"`{names('tiled_mlp_num_shards')}: {cfg.tiled_mlp_num_shards}`")
    if cfg.tiled_mlp_use_original_mlp is False:
        knobs.append(f"`{names('tiled_mlp_use_original_mlp')}: false`")
    if knobs and not cfg.tiled_mlp:
        errors.append(
            f"{' and '.join(knobs)} configure `{key}`, which is off, so nothing would change; "
            "set `tiled_mlp: true` or remove them"
        )
    if not cfg.tiled_mlp:
        return errors
    if cfg.liger_glu_activation:
        errors.append(
            f"`{key}` and `liger_glu_activation`: liger replaces each MLP's forward after the "
            "model is built, which would silently undo the tiling; keep one"
        )
    if cfg.tiled_mlp_use_original_mlp is False and cfg.flash_attn_fuse_mlp:
        errors.append(
            f"`{names('tiled_mlp_use_original_mlp')}: false` tiles Llama's gate_proj/up_proj "
            "forward, and `flash_attn_fuse_mlp` packs those into `gate_up_proj`; set it to true "
            "(the fused MLP is then tiled) or remove `flash_attn_fuse_mlp`"
        )
    return errors


def _is_config_class(name: str) -> bool:
    """Whether transformers has a PretrainedConfig subclass of that name."""
    import transformers

    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError):
        return False
    return isinstance(cls, type) and issubclass(cls, transformers.PretrainedConfig)
