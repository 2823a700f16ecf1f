"""Config -> transformers.TrainingArguments, in one explicit table."""

from __future__ import annotations

from typing import Any

from transformers import TrainingArguments

from newtune.config.resolve import RunPlan
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError


def training_kwargs(config: NewtuneConfig, plan: RunPlan, has_eval: bool) -> dict[str, Any]:
    """The TrainingArguments keyword arguments, each from a named config key."""
    return {
        "output_dir": config.output_dir,
        "per_device_train_batch_size": config.micro_batch_size,  # micro_batch_size
        "per_device_eval_batch_size": config.micro_batch_size,  # micro_batch_size
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "num_train_epochs": config.num_epochs,  # num_epochs
        "max_steps": config.max_steps or -1,  # max_steps (-1: use epochs)
        "learning_rate": config.learning_rate,
        "optim": config.optimizer,  # optimizer
        "lr_scheduler_type": config.lr_scheduler,  # lr_scheduler
        "warmup_steps": config.warmup_steps or 0,
        "logging_steps": config.logging_steps or 1,
        "seed": config.seed,
        "data_seed": config.seed,
        "bf16": plan.mixed_precision == "bf16",  # bf16 (resolved: auto -> device support)
        "fp16": plan.mixed_precision == "fp16",  # fp16
        "eval_strategy": "epoch" if has_eval else "no",  # val_set_size > 0
        "save_strategy": "no",  # the final model is saved by newtune, atomically
        "report_to": "none",
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": plan.device == "cuda",
        "use_cpu": plan.device == "cpu",  # also makes CPU DDP (gloo) under a launcher work
    }


def build_training_args(config: NewtuneConfig, plan: RunPlan, has_eval: bool) -> TrainingArguments:
    """TrainingArguments for this config; unknown optimizer/scheduler names are config errors."""
    kwargs = training_kwargs(config, plan, has_eval)
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
