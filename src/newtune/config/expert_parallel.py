"""validate's side of `expert_parallel_size` (train/expert_parallel.py runs it): the sizes a
launch must have, and what transformers' expert parallelism cannot combine with."""

from __future__ import annotations

from collections.abc import Callable

from newtune.config.schema import NewtuneConfig

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
