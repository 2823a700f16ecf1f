"""`expert_parallel_size` (Axolotl's ExpertParallelPlugin) -> transformers' expert parallelism.

newtune writes no expert-parallel code. The MoE layers are sharded at load time by
`from_pretrained(distributed_config=DistributedConfig(ep_size=..., fsdp_size=...))`:

- the experts of each MoE layer are split by expert over `ep_size` ranks (the model's
  `base_model_ep_plan`: `grouped_gemm` shards the 3-D `gate_up_proj`/`down_proj` on dim 0,
  `ep_dispatch_experts` sends each routed token to the rank owning its expert with an
  all-to-all and brings the output back, "all_to_all" in transformers' EPImplementation);
- every other weight is FSDP2-sharded over the data-parallel ranks (`fsdp_size`: all the
  launched processes, or those in one `dp_replicate_size` replica), and experts held by several
  ranks (`efsdp = fsdp_size / ep_size`) are FSDP2-sharded between those.

Each rank reads its own batch, as with FSDP. The Trainer sees a model "sharded at load time"
and leaves placement and gradient reduction to it, so accelerate's FSDP / ParallelismConfig are
not configured for the run (the `fsdp_config` options map onto DistributedConfig here).
Axolotl reaches the same layout with its own DeepEP dispatch; its DeepEP buffer keys stay
refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

EP_PLUGIN = "axolotl.integrations.expert_parallel.ExpertParallelPlugin"
# experts implementations transformers' EP dispatch runs: each is called by the dispatch with
# the received tokens and local expert ids on this rank's slice of the expert weights
EP_EXPERTS = ("eager", "batched_mm", "grouped_mm", "deepgemm", "sonicmoe", "scattermoe")


def ep_size(config: NewtuneConfig) -> int:
    """The expert-parallel size the config asks for (1: off)."""
    return int(config.expert_parallel_size or 1)


def ep_enabled(config: NewtuneConfig) -> bool:
    """Expert parallelism is on (`expert_parallel_size` > 1)."""
    return ep_size(config) > 1


def ep_layout(config: NewtuneConfig, world_size: int) -> dict[str, int]:
    """DistributedConfig sizes for `world_size` processes: ep_size, fsdp_size (the ranks that
    share one copy of the dense weights) and dp_replicate_size. ValueError names the misfit.

    As in Axolotl, `expert_parallel_size x dp_shard_size` must be the launch (times
    `dp_replicate_size` replicas); without `dp_shard_size` every rank of a replica shards the
    dense weights, and the ranks beyond `expert_parallel_size` hold FSDP-sharded copies of
    the experts.
    """
    ep = ep_size(config)
    replicas = int(config.dp_replicate_size or 1)
    if world_size % replicas:
        raise ValueError(f"`dp_replicate_size: {replicas}` does not divide {world_size} processes")
    fsdp = world_size // replicas
    shard = config.dp_shard_size
    if shard and ep * shard != fsdp:
        raise ValueError(
            f"`expert_parallel_size: {ep}` x `dp_shard_size: {shard}` = {ep * shard} processes "
            f"per replica, but the launch has {fsdp}"
        )
    if fsdp % ep:
        raise ValueError(
            f"`expert_parallel_size: {ep}` does not divide the {fsdp} data-parallel processes "
            "per replica"
        )
    return {"ep_size": ep, "fsdp_size": fsdp, "dp_replicate_size": replicas}


def distributed_config(config: NewtuneConfig, world_size: int) -> Any:
    """transformers' DistributedConfig for this launch (see `ep_layout`)."""
    from transformers.distributed import DistributedConfig

    fsdp = config.fsdp_config or {}
    offload = any(fsdp.get(k) for k in ("offload_params", "fsdp_offload_params", "cpu_offload"))
    offload = offload or "offload" in (config.fsdp or [])
    return DistributedConfig(**ep_layout(config, world_size), fsdp_cpu_offload=bool(offload))


def launch_problem(config: NewtuneConfig, world_size: int) -> str | None:
    """Why a launch of `world_size` processes does not fit `expert_parallel_size` (None: fits)."""
    if not ep_enabled(config):
        return None
    ep = ep_size(config)
    if world_size < 2:
        return (
            f"`expert_parallel_size: {ep}` splits the experts over {ep} processes, and this run "
            f"is a single process; launch it with `accelerate launch --num_processes {ep} -m "
            "newtune.cli.train ...` (or a multiple of it), or remove `expert_parallel_size`"
        )
    try:
        ep_layout(config, world_size)
    except ValueError as exc:
        return (
            f"expert parallelism does not fit this launch of {world_size} processes: {exc}; "
            "launch a fitting number (`accelerate launch --num_processes N`) or change the sizes"
        )
    return None


def check_launch(config: NewtuneConfig, world_size: int) -> None:
    """ConfigError when the launch does not fit `expert_parallel_size` (before any work)."""
    problem = launch_problem(config, world_size)
    if problem:
        raise ConfigError(problem[0].upper() + problem[1:] + ".")


def check_model(model_config: Any, config: NewtuneConfig) -> None:
    """ModelError when transformers cannot split this model's experts `ep_size` ways."""
    ep = ep_size(config)
    plan = getattr(model_config, "base_model_ep_plan", None)
    name = type(model_config).__name__
    if not plan:
        raise ModelError(
            f"`expert_parallel_size: {ep}`: `{config.base_model}` ({name}) has no expert-parallel "
            "plan in transformers (no mixture-of-experts layers, or experts kept as a module "
            "list); remove `expert_parallel_size`, or shard it with `fsdp_config` instead."
        )
    experts = next(
        (
            getattr(model_config, k)
            for k in ("num_experts", "num_local_experts", "n_routed_experts")
            if isinstance(getattr(model_config, k, None), int)
        ),
        None,
    )
    if experts is not None and experts % ep:
        raise ModelError(
            f"`expert_parallel_size: {ep}`: `{config.base_model}` has {experts} experts per "
            f"layer, which do not split evenly over {ep} ranks; choose a divisor of {experts}."
        )


def expert_parallel_kwargs(config: NewtuneConfig, world_size: int, model_config: Any) -> dict:
    """from_pretrained arguments that shard the model by expert; empty without EP."""
    if not ep_enabled(config):
        return {}
    check_launch(config, world_size)
    check_model(model_config, config)
    dist = distributed_config(config, world_size)
    log.info(
        "expert parallelism: transformers DistributedConfig(ep_size=%s, fsdp_size=%s, "
        "dp_replicate_size=%s): each rank holds 1/%s of the experts",
        dist.ep_size,
        dist.fsdp_size,
        dist.dp_replicate_size,
        dist.ep_size,
    )
    return {"distributed_config": dist}


def with_expert_parallel(options: Any, config: NewtuneConfig, plan: Any) -> Any:
    """`options` (models.load.ModelOptions) with the EP DistributedConfig for this launch."""
    if not ep_enabled(config):
        return options
    import dataclasses

    from transformers import AutoConfig

    source = config.base_model_config or config.base_model
    try:
        model_config = AutoConfig.from_pretrained(
            source,
            revision=config.revision_of_model,
            trust_remote_code=bool(config.trust_remote_code),
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"`expert_parallel_size`: could not read the model config of `{source}` ({exc})."
        ) from exc
    kwargs = expert_parallel_kwargs(config, plan.world_size, model_config)
    return dataclasses.replace(options, tensor_parallel=kwargs, device_map=None)


def sharded_at_load(model: Any) -> bool:
    """The model (or the one a PEFT model wraps) was sharded by transformers at load time."""
    for candidate in (model, getattr(model, "base_model", None), _peft_base(model)):
        if getattr(candidate, "is_distributed_loading_by_transformers", False):
            return True
    return False


def _peft_base(model: Any) -> Any:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else None


def gather_expert_parallel(trainer: Any) -> dict[str, Any] | None:
    """Whole weights of a model sharded at load time (EP + FSDP2), gathered on every rank (a
    collective); rank 0 gets them, other ranks an empty dict. None for other models.

    The model is then detached from its DistributedConfig, so that rank 0 alone writes the
    gathered tensors (transformers' save_pretrained would gather again, from every rank) and
    the saved config.json loads as a plain model.
    """
    model = trainer.model
    if not sharded_at_load(model):
        return None
    from transformers.distributed import gather_full_state_dict

    weights = gather_full_state_dict(model)
    for candidate in (model, _peft_base(model)):
        cfg = getattr(candidate, "config", None)
        if cfg is not None and getattr(cfg, "distributed_config", None) is not None:
            cfg.distributed_config = None
    return weights


def training_kwargs(config: NewtuneConfig) -> dict[str, Any]:
    """TrainingArguments entries EP needs: checkpoints without optimizer state (transformers
    does not checkpoint the optimizer of a model sharded at load time)."""
    return {"save_only_model": True} if ep_enabled(config) else {}


def ep_rules(cfg: NewtuneConfig, names: Callable[[str], str] = str) -> list[str]:
    """Validate errors: what transformers' expert parallelism cannot combine with."""
    if not ep_enabled(cfg):
        return []
    key = f"`{names('expert_parallel_size')}: {ep_size(cfg)}`"
    errors = []
    engine = "transformers' DistributedConfig (EP + FSDP2 sharded at load time)"
    if cfg.deepspeed:
        errors.append(f"{key} runs on {engine}, and `deepspeed` is its own engine; choose one")
    for other, why in (
        ("tensor_parallel_size", "EP x TP is not supported (Axolotl refuses it too)"),
        (
            "context_parallel_size",
            "context parallelism is accelerate's, and a model sharded at load time by "
            "transformers is not wrapped by accelerate",
        ),
    ):
        if (getattr(cfg, other) or 1) > 1:
            errors.append(f"{key} with `{names(other)}`: {why}; remove one of them")
    version = cfg.fsdp_version or (cfg.fsdp_config or {}).get("fsdp_version")
    version = version or (cfg.fsdp_config or {}).get("version")
    if version not in (None, 2, "2"):
        errors.append(
            f"{key} shards the dense weights with FSDP2; `fsdp_version: {version}` is FSDP1: set "
            "`fsdp_version: 2` or remove it"
        )
    impl = cfg.experts_implementation
    if impl is not None and impl not in EP_EXPERTS:
        errors.append(
            f"{key}: `experts_implementation: {impl}` cannot run under transformers' expert "
            f"dispatch; use one of {', '.join(EP_EXPERTS)}"
        )
    for flag, why in (
        ("load_in_4bit", "bitsandbytes-quantized weights cannot be sharded by FSDP2/EP"),
        ("load_in_8bit", "bitsandbytes-quantized weights cannot be sharded by FSDP2/EP"),
        ("quantize_moe_experts", "quantized experts cannot be split by expert"),
        ("llama4_linearized_experts", "linearized experts are a module list, not 3-D weights"),
    ):
        if getattr(cfg, flag, None):
            errors.append(f"{key} with `{names(flag)}`: {why}; remove one of them")
    if cfg.lora_target_parameters:
        errors.append(
            f"{key} with `{names('lora_target_parameters')}`: PEFT's LoRA on parameters adds "
            "whole-tensor deltas to weights that expert parallelism holds as per-rank DTensor "
            "shards, which torch refuses (mixed Tensor and DTensor); adapt the attention and "
            "dense layers with `lora_target_modules`, or drop `expert_parallel_size`"
        )
    for resume in ("resume_from_checkpoint", "auto_resume_from_checkpoints"):
        if getattr(cfg, resume, None):
            errors.append(
                f"{key} with `{names(resume)}`: transformers keeps no optimizer state in the "
                "checkpoints of a model sharded at load time, so a run cannot resume from them; "
                "remove it"
            )
    return errors


def ep_notes(cfg: NewtuneConfig) -> list[str]:
    """Validate notes: the layout expert parallelism uses."""
    if not ep_enabled(cfg):
        return []
    ep = ep_size(cfg)
    launch = ep * (cfg.dp_shard_size or 1)
    per = " (expert_parallel_size x dp_shard_size)" if cfg.dp_shard_size else ""
    return [
        f"expert parallelism (transformers DistributedConfig, all-to-all token dispatch): the "
        f"experts are split over {ep} ranks, the other weights FSDP2-sharded over the "
        f"data-parallel ranks; launch {launch} processes{per}, or a multiple of {ep} without "
        "dp_shard_size; checkpoints hold the model only (no resume)"
    ]
