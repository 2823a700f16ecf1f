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
from typing import Any

from newtune.config.expert_parallel import (  # noqa: F401 - re-exported
    EP_EXPERTS,
    EP_PLUGIN,
    ep_enabled,
    ep_layout,
    ep_notes,
    ep_rules,
    ep_size,
    launch_problem,
)
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def distributed_config(config: NewtuneConfig, world_size: int) -> Any:
    """transformers' DistributedConfig for this launch (see `ep_layout`)."""
    from transformers.distributed import DistributedConfig

    fsdp = config.fsdp_config or {}
    offload = any(fsdp.get(k) for k in ("offload_params", "fsdp_offload_params", "cpu_offload"))
    offload = offload or "offload" in (config.fsdp or [])
    return DistributedConfig(**ep_layout(config, world_size), fsdp_cpu_offload=bool(offload))


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
