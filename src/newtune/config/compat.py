"""Cross-key rules and notes for the Axolotl keys read as Axolotl reads them (schema/compat.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from newtune.config.machine import lora_kernel_problem
from newtune.config.schema import NewtuneConfig


def attention(cfg: NewtuneConfig) -> str:
    """The attn_implementation given to transformers (xformers is read as sdpa)."""
    value = cfg.attn_implementation or "sdpa"
    return "sdpa" if value == "xformers" else value


def _lora_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    if cfg.lora_target_linear and isinstance(cfg.lora_target_modules, str):
        return [
            f"`{names('lora_target_modules')}` is a regex string and "
            f"`{names('lora_target_linear')}: true` is set; Axolotl would read the regex as one "
            "literal module name (matching nothing) and adapt only the linear layers. Keep "
            "`lora_target_linear: true` alone (every linear layer), or the regex alone (matched "
            "against full module names), or give a list of names (adapted besides the linear "
            "layers)"
        ]
    return []


def _eval_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    errors = []
    strategy = cfg.eval_strategy
    key = names("eval_strategy")
    if strategy in ("no", "epoch") and cfg.eval_steps is not None:
        errors.append(
            f"`{key}: {strategy}` and `{names('eval_steps')}` are both set; eval_steps "
            "evaluates every N steps: remove one (Axolotl refuses this too)"
        )
    if strategy in ("no", "epoch") and cfg.evals_per_epoch:
        errors.append(
            f"`{key}: {strategy}` and `{names('evals_per_epoch')}: {cfg.evals_per_epoch}` are "
            "both set; evals_per_epoch evaluates every few steps: remove one, or set "
            "`eval_strategy: steps` (Axolotl refuses this too)"
        )
    if strategy == "steps" and cfg.eval_steps is None and not cfg.evals_per_epoch:
        errors.append(
            f"`{key}: steps` needs `eval_steps` or `evals_per_epoch` to say how often; set one, "
            "or use `eval_strategy: epoch`"
        )
    if (strategy == "no" or cfg.evals_per_epoch == 0) and cfg.early_stopping_patience:
        off = f"{key}: no" if strategy == "no" else f"{names('evals_per_epoch')}: 0"
        errors.append(
            f"`{names('early_stopping_patience')}` stops on the eval loss, but `{off}` turns "
            "evaluation during training off; remove one of them"
        )
    if strategy in ("steps", "epoch") and not (cfg.val_set_size or cfg.test_datasets):
        errors.append(
            f"`{key}: {strategy}` evaluates during training, but there is no eval split; set "
            "`val_set_size` (e.g. 0.05) or `test_datasets`, or remove the key"
        )
    return errors


def compat_rules(cfg: NewtuneConfig, names: Callable[[str], str] = str) -> list[str]:
    """Errors: Axolotl keys whose values newtune cannot honour, or that contradict others."""
    errors = _lora_rules(cfg, names) + _eval_rules(cfg, names)
    if cfg.float16 and cfg.bf16:
        errors.append(
            f"`{names('float16')}: true` loads float16 weights and `{names('bf16')}` trains in "
            "bfloat16; choose one precision"
        )
    if cfg.low_cpu_mem_usage is False:
        errors.append(
            f"`{names('low_cpu_mem_usage')}: false` cannot be honoured: transformers 5 always "
            "loads with one copy of the weights in memory (it drops the option); remove the key"
        )
    if cfg.experimental_skip_move_to_device is False:
        errors.append(
            f"`{names('experimental_skip_move_to_device')}: false` asks the loader to move the "
            "model to the device itself; newtune leaves placement to the Trainer (DDP, FSDP, "
            "DeepSpeed), as Axolotl does by default; remove the key"
        )
    if cfg.use_wandb is True and not cfg.wandb_project:
        errors.append(
            f"`{names('use_wandb')}: true` without `wandb_project`; newtune reports to Weights & "
            "Biases when `wandb_project` names the project: set it"
        )
    if cfg.use_wandb is False and cfg.wandb_project:
        errors.append(
            f"`{names('use_wandb')}: false` and `wandb_project: {cfg.wandb_project}` contradict "
            "each other (Axolotl reports anyway); remove `wandb_project` to report nothing, or "
            "`use_wandb` to report"
        )
    if cfg.torch_compile_mode is not None and not cfg.torch_compile:
        errors.append(
            f"`{names('torch_compile_mode')}: {cfg.torch_compile_mode}` applies with "
            "`torch_compile: true`, which is not set; set it, or remove the mode"
        )
    if cfg.save_only_model and (cfg.resume_from_checkpoint or cfg.auto_resume_from_checkpoints):
        resume = (
            "resume_from_checkpoint"
            if cfg.resume_from_checkpoint
            else "auto_resume_from_checkpoints"
        )
        errors.append(
            f"`{names('save_only_model')}: true` writes checkpoints without optimizer, scheduler "
            f"and RNG state, which `{names(resume)}` needs to resume; remove one of them"
        )
    return errors


def compat_notes(cfg: NewtuneConfig) -> list[str]:
    """Notes for Axolotl keys newtune reads in its own way (printed by `validate` and `train`)."""
    notes = []
    kernels = lora_kernel_problem(cfg)
    if kernels:
        notes.append(f"warning: {kernels}; `train` refuses them")
    steps: Any = cfg.warmup_steps
    if isinstance(steps, float) and 0 < steps < 1:
        notes.append(
            f"`warmup_steps: {steps}` is a fraction: read as warmup over {steps:.0%} of the "
            f"steps, i.e. `warmup_ratio: {steps}` (write that; Axolotl refuses a fraction here)"
        )
    if cfg.attn_implementation == "xformers":
        notes.append(
            "`attn_implementation: xformers` is read as sdpa: torch's scaled_dot_product_"
            "attention runs the memory-efficient kernel that came from xformers (newtune does "
            "not install xformers)"
        )
    if cfg.evals_per_epoch == 0:
        notes.append("`evals_per_epoch: 0`: no evaluation during training")
    if cfg.low_cpu_mem_usage:
        notes.append(
            "`low_cpu_mem_usage: true` is how transformers 5 always loads a model (it drops the "
            "option); nothing to set"
        )
    if cfg.experimental_skip_move_to_device:
        notes.append(
            "`experimental_skip_move_to_device: true` is how newtune always loads: the Trainer "
            "places the model"
        )
    if cfg.float16 and not cfg.fp16:
        notes.append(
            "`float16: true`: the weights are loaded in float16 and trained without mixed "
            "precision (no loss scaling), as in Axolotl; `fp16: true` adds mixed precision"
        )
    return notes
