"""Config -> transformers.TrainingArguments, in one explicit table."""

from __future__ import annotations

from typing import Any

from transformers import TrainingArguments

from newtune.config.resolve import RunPlan
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError
from newtune.train.distributed import distributed_kwargs


def _per_epoch(count: int | None, steps_per_epoch: int) -> int | None:
    return None if count is None else max(1, steps_per_epoch // count)


def _optim_args(value: str | dict[str, Any] | None) -> str | None:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return value


def _unset(value: Any, default: Any) -> Any:
    return default if value is None else value


def training_kwargs(
    config: NewtuneConfig, plan: RunPlan, has_eval: bool, steps_per_epoch: int = 1
) -> dict[str, Any]:
    """The TrainingArguments keyword arguments; each comment names the config key(s)."""
    eval_every = config.eval_steps or _per_epoch(config.evals_per_epoch, steps_per_epoch)
    save_every = config.save_steps or _per_epoch(config.saves_per_epoch, steps_per_epoch)
    save_strategy = config.save_strategy or ("steps" if save_every else "no")
    defaults = TrainingArguments.__dataclass_fields__
    return {
        "output_dir": config.output_dir,
        "per_device_train_batch_size": config.micro_batch_size,  # micro_batch_size
        "per_device_eval_batch_size": config.eval_batch_size or config.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,  # (or batch_size/micro)
        "num_train_epochs": config.num_epochs,  # num_epochs
        "max_steps": config.max_steps or -1,  # max_steps (-1: use epochs)
        "learning_rate": config.learning_rate,
        "optim": config.optimizer,  # optimizer
        "optim_args": _optim_args(config.optim_args),  # optim_args
        "weight_decay": _unset(config.weight_decay, 0.0),
        "adam_beta1": _unset(config.adam_beta1, defaults["adam_beta1"].default),
        "adam_beta2": _unset(config.adam_beta2, defaults["adam_beta2"].default),
        "adam_epsilon": _unset(config.adam_epsilon, defaults["adam_epsilon"].default),
        "max_grad_norm": _unset(config.max_grad_norm, defaults["max_grad_norm"].default),
        "lr_scheduler_type": config.lr_scheduler,  # lr_scheduler
        "lr_scheduler_kwargs": config.lr_scheduler_kwargs or {},
        "warmup_steps": config.warmup_steps or config.warmup_ratio or 0,  # warmup_steps|_ratio
        "logging_steps": config.logging_steps or 1,
        "seed": config.seed,
        "data_seed": config.seed,
        "bf16": plan.mixed_precision == "bf16",  # bf16 (resolved: auto -> device support)
        "fp16": plan.mixed_precision == "fp16",  # fp16
        # val_set_size > 0: evaluate every eval_steps / evals_per_epoch, else once per epoch
        "eval_strategy": ("steps" if eval_every else "epoch") if has_eval else "no",
        "eval_steps": eval_every,
        # default: no checkpoints; the final model is saved by newtune, atomically
        "save_strategy": save_strategy,
        "save_steps": save_every or defaults["save_steps"].default,
        "save_total_limit": config.save_total_limit,
        "neftune_noise_alpha": config.neftune_noise_alpha,
        # group_by_length: batches of similar lengths (the train set gets a `length` column)
        "train_sampling_strategy": "group_by_length" if config.group_by_length else "random",
        "report_to": "none",
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": plan.device == "cuda",
        "use_cpu": plan.device == "cpu",  # also makes CPU DDP (gloo) under a launcher work
        **distributed_kwargs(config, plan),  # deepspeed, fsdp, fsdp_config, ddp_*
    }


def build_training_args(
    config: NewtuneConfig, plan: RunPlan, has_eval: bool, steps_per_epoch: int = 1
) -> TrainingArguments:
    """TrainingArguments for this config; unknown optimizer/scheduler names are config errors."""
    kwargs = training_kwargs(config, plan, has_eval, steps_per_epoch)
    try:
        return TrainingArguments(**kwargs)
    except ValueError as exc:
        text = str(exc)
        key = (
            "optimizer"
            if "optim" in text.lower()
            else ("lr_scheduler" if "scheduler" in text.lower() else None)
        )
        where = f"`{key}`" if key else "a training option"
        raise ConfigError(f"{where} is not valid for transformers: {text.splitlines()[0]}") from exc
