"""ReLoRA with jagged restarts, LoRA+, LISA and generation metrics during eval (Axolotl's keys)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from newtune.config.keys import is_off
from newtune.config.schema.base import Section

CAUSAL_LM_METRICS = ("sacrebleu", "chrf", "ter", "perplexity", "comet")
DEFAULT_CAUSAL_LM_METRICS = ["sacrebleu", "chrf", "ter", "perplexity"]
RELORA_KEYS = ("relora_prune_ratio", "relora_prune_method", "relora_cpu_offload")
JAGGED_KEYS = ("jagged_restart_warmup_steps", "jagged_restart_anneal_steps")


class SeedTrainingSection(Section):
    """ReLoRA, jagged lr restarts, LoRA+, LISA, and generation metrics during eval."""

    relora: bool | None = Field(
        default=None,
        description="ReLoRA: every `jagged_restart_steps` steps the LoRA delta is merged into the "
        "base weights (fp32), the adapter re-initialised and its optimizer state pruned (Adam, "
        "also bitsandbytes 8-bit). `adapter: lora`, or `qlora`: the merged base is kept at full "
        "precision (safetensors) and the 4-bit weights re-quantized from it. The output holds "
        "the adapter and the merged-so-far base in `relora_base/` (merge-lora gives the final "
        "model).",
    )
    jagged_restart_steps: int | None = Field(
        default=None,
        gt=0,
        description="Steps between restarts: ReLoRA merges, and the lr warms up again "
        "(Axolotl's JaggedLRRestartScheduler around the configured schedule; also without relora). "
        "Legacy spelling: `relora_steps`.",
    )
    jagged_restart_warmup_steps: int | None = Field(
        default=None,
        ge=0,
        description="Linear lr warm-up after each restart (default 10). "
        "Legacy spelling: `relora_warmup_steps`.",
    )
    jagged_restart_anneal_steps: int | None = Field(
        default=None,
        ge=0,
        description="Linear lr anneal before each restart (default 1). "
        "Legacy spelling: `relora_anneal_steps`.",
    )
    relora_prune_ratio: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Fraction of the LoRA parameters' Adam state zeroed at each restart "
        "(default 0.9; 0.999 with `relora_prune_method: reset`).",
    )
    relora_prune_method: Literal["magnitude", "random", "reset"] | None = Field(
        default=None,
        description="How the optimizer state is pruned: `magnitude` (default) zeroes the "
        "smallest values, `random` a random subset, `reset` a random 99.9% (paper style).",
    )
    relora_cpu_offload: bool | None = Field(
        default=None,
        description="Compute each restart's merge on the CPU (fp32), to save accelerator memory.",
    )
    loraplus_lr_ratio: float | None = Field(
        default=None,
        gt=0,
        description="LoRA+: lora_B matrices train at learning_rate x this ratio (peft's "
        "create_loraplus_optimizer; 16 is the paper's recommendation).",
    )
    loraplus_lr_embedding: float | None = Field(
        default=None,
        gt=0,
        description="LoRA+: learning rate of LoRA adapters on embedding layers (default 1e-6).",
    )
    lisa_n_layers: int | None = Field(
        default=None, gt=0, description="LISA: how many layers train at a time (full fine-tune)."
    )
    lisa_step_interval: int | None = Field(
        default=None, gt=0, description="LISA: steps between draws of the layers that train."
    )
    lisa_layers_attribute: str = Field(
        default="model.layers",
        description="LISA: dotted path from the model to its list of layers.",
    )
    do_causal_lm_eval: bool | None = Field(
        default=None,
        description="At each evaluation, generate an answer to every eval row's prompt (greedy) "
        "and log `eval_causal_lm_metrics` against the row's reference completion.",
    )
    eval_causal_lm_metrics: (
        list[Literal["sacrebleu", "chrf", "ter", "perplexity", "comet"]] | None
    ) = Field(
        default=None,
        description="Metrics of do_causal_lm_eval (default sacrebleu, chrf, ter, perplexity): "
        "sacrebleu/chrf/ter are sacrebleu's corpus scores, logged as eval_<name>; perplexity "
        "is eval_perplexity (exp of the eval loss on the reference tokens); comet needs "
        "`pip install unbabel-comet` and downloads Unbabel/wmt22-comet-da.",
    )
    eval_max_new_tokens: int | None = Field(
        default=None, gt=0, description="Tokens generated per eval prompt (default 128)."
    )
    eval_table_size: int | None = Field(
        default=None,
        ge=0,
        description="Rows of the prompt / reference / prediction table written at each "
        "evaluation to output_dir/eval_predictions/step-N.{jsonl,md} and to the trackers.",
    )


def _named(names: Callable[[str], str], keys: list[str]) -> str:
    return ", ".join(f"`{names(k)}`" for k in keys)


def seed_training_rules(cfg: Any, names: Callable[[str], str] = str) -> list[str]:
    """What ReLoRA, LoRA+, LISA and generation metrics need, and what they cannot do."""
    used = [
        k for k in ("relora", "loraplus_lr_ratio", "lisa_n_layers") if not is_off(getattr(cfg, k))
    ]
    vision = [
        f"`{names(key)}` with `processor_type`: not available for vision-language training"
        for key in used[:1]
        if getattr(cfg, "processor_type", None)
    ]
    return (
        vision
        + _relora_rules(cfg, names)
        + _loraplus_rules(cfg, names)
        + _lisa_rules(cfg, names)
        + _generation_rules(cfg, names)
    )


def _relora_rules(cfg: Any, names: Callable[[str], str]) -> list[str]:
    errors = []
    if cfg.jagged_restart_steps and cfg.lr_scheduler in ("one_cycle", "reduce_lr_on_plateau"):
        errors.append(
            f"`{names('jagged_restart_steps')}` with `{names('lr_scheduler')}: "
            f"{cfg.lr_scheduler}`: jagged restarts scale a step-wise schedule (as in Axolotl, "
            "not one_cycle); use cosine, linear or constant"
        )
    if not cfg.relora:
        given = [k for k in RELORA_KEYS if not is_off(getattr(cfg, k))]
        if given:
            errors.append(
                f"{_named(names, given)} set without `{names('relora')}: true`; "
                "they shape ReLoRA restarts: set relora or remove them"
            )
        if cfg.jagged_restart_steps and names("jagged_restart_steps") == "relora_steps":
            errors.append(
                "`relora_steps` (the seed's spelling of `jagged_restart_steps`) turned ReLoRA on "
                "in Axolotl's first versions; add `relora: true` (or write "
                "`jagged_restart_steps` for jagged lr restarts without ReLoRA)"
            )
        given = [k for k in JAGGED_KEYS if getattr(cfg, k) is not None]
        if given and not cfg.jagged_restart_steps:
            errors.append(f"{_named(names, given)} set without `{names('jagged_restart_steps')}`")
        return errors
    why = f"`{names('relora')}: true`"
    if not cfg.jagged_restart_steps:
        errors.append(f"{why} needs `{names('jagged_restart_steps')}` (steps between restarts)")
    if cfg.adapter not in ("lora", "qlora"):
        errors.append(
            f"{why} with `adapter: {cfg.adapter}`: ReLoRA merges a LoRA adapter into the base "
            "weights; set `adapter: lora` (or `qlora`)"
        )
    for key in ("load_in_8bit", "load_in_4bit"):
        if getattr(cfg, key) and cfg.adapter != "qlora":
            errors.append(
                f"{why} with `{names(key)}: true` and `adapter: {cfg.adapter}`: ReLoRA merges "
                "into quantized weights only under `adapter: qlora` (4-bit, re-quantized from a "
                "full-precision copy); use `adapter: qlora` with load_in_4bit, or remove the key"
            )
    if cfg.peft_use_dora:
        errors.append(
            f"{why} with `{names('peft_use_dora')}: true`: a DoRA adapter's magnitude vector "
            "does not merge as an additive delta; remove one of them"
        )
    if cfg.deepspeed:
        errors.append(f"{why} with `{names('deepspeed')}`: not supported (as in Axolotl)")
    if cfg.fsdp or cfg.fsdp_config:
        errors.append(f"{why} with FSDP: not supported (as in Axolotl)")
    if "adam" not in cfg.optimizer:
        errors.append(
            f"{why} with `{names('optimizer')}: {cfg.optimizer}`: restarts prune Adam "
            "state (exp_avg, exp_avg_sq); choose an Adam optimizer such as adamw_torch"
        )
    return errors


def _loraplus_rules(cfg: Any, names: Callable[[str], str]) -> list[str]:
    errors = []
    if cfg.loraplus_lr_embedding is not None and cfg.loraplus_lr_ratio is None:
        errors.append(
            f"`{names('loraplus_lr_embedding')}` without "
            f"`{names('loraplus_lr_ratio')}`: set the ratio to use LoRA+"
        )
    if cfg.loraplus_lr_ratio is not None:
        if cfg.adapter not in ("lora", "qlora"):
            errors.append(
                f"`{names('loraplus_lr_ratio')}` needs `adapter: lora` or `qlora` "
                "(LoRA+ sets the learning rates of the lora_A / lora_B matrices)"
            )
        if cfg.optimizer.startswith(("galore_", "apollo_", "lomo", "adalomo")):
            errors.append(
                f"`{names('loraplus_lr_ratio')}` with `{names('optimizer')}: "
                f"{cfg.optimizer}`: LoRA+ builds parameter groups for a plain torch "
                "optimizer; choose e.g. adamw_torch"
            )
    return errors


def _lisa_rules(cfg: Any, names: Callable[[str], str]) -> list[str]:
    errors = []
    given = [k for k in ("lisa_n_layers", "lisa_step_interval") if getattr(cfg, k) is not None]
    if len(given) == 1:
        errors.append(
            f"`{names(given[0])}` alone: LISA needs both `{names('lisa_n_layers')}` and "
            f"`{names('lisa_step_interval')}`"
        )
    if given and cfg.adapter is not None:
        errors.append(
            f"LISA (`{names(given[0])}`) with `adapter: {cfg.adapter}`: LISA samples "
            "which layers of a full fine-tune train (unfreezing a layer would train its "
            "base weights beside the adapter); remove adapter or the lisa keys"
        )
    if given and (cfg.deepspeed or cfg.fsdp or cfg.fsdp_config):
        errors.append(
            f"LISA (`{names(given[0])}`) with DeepSpeed/FSDP: changing which "
            "parameters need gradients during a sharded run is not supported"
        )
    return errors


def _generation_rules(cfg: Any, names: Callable[[str], str]) -> list[str]:
    errors = []
    if cfg.eval_causal_lm_metrics and not cfg.do_causal_lm_eval:
        errors.append(
            f"`{names('eval_causal_lm_metrics')}` without "
            f"`{names('do_causal_lm_eval')}: true`: set it to compute the metrics"
        )
    generating = [k for k in ("do_causal_lm_eval", "eval_table_size") if getattr(cfg, k)]
    if not generating:
        return errors
    key = names(generating[0])
    if not cfg.val_set_size and not cfg.test_datasets:
        errors.append(
            f"`{key}` generates answers to the eval rows: set `{names('val_set_size')}` "
            f"or `{names('test_datasets')}`"
        )
    if cfg.rl or cfg.reward_model or cfg.process_reward_model:
        errors.append(
            f"`{key}` applies to supervised fine-tuning (prompt and reference "
            "completion), not to preference or reward training"
        )
    if getattr(cfg, "pretraining_dataset", None) or getattr(cfg, "streaming", None):
        errors.append(
            f"`{key}` with a streamed run (`pretraining_dataset` / `streaming`): it has no "
            "prepared eval split to answer"
        )
    if getattr(cfg, "processor_type", None):
        errors.append(f"`{key}` with `processor_type`: generation metrics need text-only rows")
    return errors
