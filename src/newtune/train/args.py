"""Config -> transformers.TrainingArguments, in one explicit table."""

from __future__ import annotations

import importlib.util
from typing import Any

from transformers import TrainingArguments

from newtune.config.resolve import RunPlan
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError
from newtune.train.compat2 import training_kwargs2
from newtune.train.distributed import distributed_kwargs
from newtune.train.report import report_targets
from newtune.train.schedules import Schedule

DEFAULT_HUB_STRATEGY = "every_save"


def _per_epoch(count: int | None, steps_per_epoch: int) -> int | None:
    return None if not count else max(1, steps_per_epoch // count)


def _optim_args(value: str | dict[str, Any] | None) -> str | None:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return value


def _unset(value: Any, default: Any) -> Any:
    return default if value is None else value


def schedule_for(config: NewtuneConfig) -> Schedule | None:
    """The schedule newtune builds itself (one_cycle, cosine with quadratic warmup or a
    constant tail); None when transformers' `lr_scheduler_type` does the job."""
    kwargs = dict(config.lr_scheduler_kwargs or {})
    if config.lr_scheduler == "one_cycle":
        return Schedule("one_cycle", div_factor=config.lr_div_factor, kwargs=kwargs)
    if config.lr_scheduler == "cosine" and (
        config.lr_quadratic_warmup or config.cosine_constant_lr_ratio is not None
    ):
        return Schedule(
            "cosine",
            min_lr_ratio=config.cosine_min_lr_ratio or _eta_ratio(config),
            constant_lr_ratio=config.cosine_constant_lr_ratio,
            quadratic_warmup=bool(config.lr_quadratic_warmup),
            kwargs=kwargs,
        )
    return None


def _scheduler(config: NewtuneConfig) -> tuple[str, dict[str, Any]]:
    """`lr_scheduler_type` and its kwargs (a placeholder when newtune builds the schedule)."""
    kwargs = dict(config.lr_scheduler_kwargs or {})
    schedule = schedule_for(config)
    if schedule is not None:  # built by NewtuneTrainer.create_scheduler from schedule_for()
        return ("constant" if schedule.kind == "one_cycle" else "cosine"), {}
    if config.lr_scheduler == "cosine" and config.cosine_min_lr_ratio is not None:
        return "cosine_with_min_lr", {**kwargs, "min_lr_rate": config.cosine_min_lr_ratio}
    if config.lr_scheduler == "cosine" and config.eta_min is not None:  # absolute floor
        return "cosine_with_min_lr", {**kwargs, "min_lr": config.eta_min}
    return config.lr_scheduler, kwargs


def _eta_ratio(config: NewtuneConfig) -> float:
    """`eta_min` (the cosine's absolute floor) as a ratio of the peak lr; 0 when unset."""
    return (config.eta_min or 0.0) / config.learning_rate


def compile_enabled(config: NewtuneConfig, plan: RunPlan) -> bool:
    """`torch_compile`; `auto` means on where inductor has a GPU backend (CUDA with triton)."""
    if config.torch_compile == "auto":
        return plan.device == "cuda" and importlib.util.find_spec("triton") is not None
    return bool(config.torch_compile)


def _checkpoints(config: NewtuneConfig, has_eval: bool, steps_per_epoch: int) -> dict[str, Any]:
    """eval_*/save_* keys; early stopping saves at every eval and keeps the best weights."""
    eval_every = config.eval_steps or _per_epoch(config.evals_per_epoch, steps_per_epoch)
    save_every = config.save_steps or _per_epoch(config.saves_per_epoch, steps_per_epoch)
    eval_strategy = ("steps" if eval_every else "epoch") if has_eval else "no"
    if has_eval and (config.eval_strategy == "no" or config.evals_per_epoch == 0):
        eval_strategy, eval_every = "no", None  # eval_strategy: no / evals_per_epoch: 0
    save_strategy = config.save_strategy or ("steps" if save_every else "no")
    early = config.early_stopping_patience is not None
    if early and config.save_strategy is None and save_every is None:
        save_strategy, save_every = eval_strategy, eval_every  # a checkpoint at every eval
    best = early or save_strategy == "best"
    if early and save_strategy not in (eval_strategy, "best"):
        raise ConfigError(
            f"`early_stopping_patience` keeps the best checkpoint, so checkpoints must be saved "
            f"when evaluating: `save_strategy: {save_strategy}` differs from the eval strategy "
            f"({eval_strategy}); remove `save_strategy` or set it to `{eval_strategy}`"
        )
    return {
        # val_set_size > 0: evaluate every eval_steps / evals_per_epoch, else once per epoch
        "eval_strategy": eval_strategy,
        "eval_steps": eval_every,
        # default: no checkpoints; the final model is saved by newtune, atomically
        "save_strategy": save_strategy,  # save_strategy (+ early_stopping_patience)
        "save_steps": save_every or TrainingArguments.__dataclass_fields__["save_steps"].default,
        "save_total_limit": config.save_total_limit,
        # early_stopping_patience: EarlyStoppingCallback compares eval_loss, lower is better
        "load_best_model_at_end": early,
        "metric_for_best_model": "eval_loss" if best else None,
        "greater_is_better": False if best else None,
        # checkpoints keep optimizer, scheduler and RNG state (exact resume), unless
        # save_only_model (then resuming from them is refused at validation)
        "save_only_model": bool(config.save_only_model),
    }


def training_kwargs(
    config: NewtuneConfig, plan: RunPlan, has_eval: bool, steps_per_epoch: int = 1
) -> dict[str, Any]:
    """The TrainingArguments keyword arguments; each comment names the config key(s)."""
    defaults = TrainingArguments.__dataclass_fields__
    scheduler, scheduler_kwargs = _scheduler(config)
    hub = config.hub_model_id is not None
    return {
        "output_dir": config.output_dir,  # output_dir
        "per_device_train_batch_size": config.micro_batch_size,  # micro_batch_size
        # eval_batch_size (default micro_batch_size)
        "per_device_eval_batch_size": config.eval_batch_size or config.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,  # (or batch_size/micro)
        "num_train_epochs": config.num_epochs,  # num_epochs
        "max_steps": config.max_steps or -1,  # max_steps (-1: use epochs)
        "learning_rate": config.learning_rate,  # learning_rate
        "optim": config.optimizer,  # optimizer (any transformers name, bnb 8-bit/paged too)
        "optim_args": _optim_args(config.optim_args),  # optim_args
        "optim_target_modules": config.optim_target_modules,  # optim_target_modules (GaLore)
        "weight_decay": _unset(config.weight_decay, 0.0),  # weight_decay
        "adam_beta1": _unset(config.adam_beta1, defaults["adam_beta1"].default),  # adam_beta1
        "adam_beta2": _unset(config.adam_beta2, defaults["adam_beta2"].default),  # adam_beta2
        "adam_epsilon": _unset(config.adam_epsilon, defaults["adam_epsilon"].default),
        "max_grad_norm": _unset(config.max_grad_norm, defaults["max_grad_norm"].default),
        # lr_scheduler, lr_scheduler_kwargs, cosine_min_lr_ratio (-> cosine_with_min_lr);
        # one_cycle / lr_quadratic_warmup / cosine_constant_lr_ratio / lr_div_factor:
        # train.schedules, built by NewtuneTrainer.create_scheduler
        "lr_scheduler_type": scheduler,
        "lr_scheduler_kwargs": scheduler_kwargs,
        "warmup_steps": config.warmup_steps or config.warmup_ratio or 0,  # warmup_steps|_ratio
        "logging_steps": config.logging_steps or 1,  # logging_steps
        "seed": config.seed,  # seed
        "data_seed": config.seed,
        "bf16": plan.mixed_precision == "bf16",  # bf16 (resolved: auto -> device support)
        "fp16": plan.mixed_precision == "fp16",  # fp16
        **_checkpoints(config, has_eval, steps_per_epoch),
        # save_safetensors: transformers 5 always writes safetensors (false is refused)
        "neftune_noise_alpha": config.neftune_noise_alpha,  # neftune_noise_alpha
        "torch_compile": compile_enabled(config, plan),  # torch_compile (auto: CUDA + triton)
        "torch_compile_backend": config.torch_compile_backend,  # torch_compile_backend
        "torch_compile_mode": config.torch_compile_mode,  # torch_compile_mode
        # hub_model_id / hub_strategy: push to the hub (token: HF_TOKEN or `hf auth login`)
        "push_to_hub": hub,
        "hub_model_id": config.hub_model_id,
        "hub_strategy": config.hub_strategy or DEFAULT_HUB_STRATEGY,
        # wandb_* / mlflow_* / use_tensorboard; nothing by default (env: train.report)
        "report_to": report_targets(config),
        "run_name": config.wandb_name,  # wandb_name (also the mlflow run name)
        # liger_*: applied to the model by train.kernels.apply_liger after build_model
        "disable_tqdm": False,  # Trainer's progress bar (main process only)
        # group_by_length: batches of similar lengths (the train set gets a `length` column);
        # curriculum_sampling: rows in dataset order (config.compat3 refuses both together)
        "train_sampling_strategy": "sequential"
        if config.curriculum_sampling
        else ("group_by_length" if config.group_by_length else "random"),
        "remove_unused_columns": False,
        "accelerator_config": config.accelerator_config,  # accelerator_config (accelerate)
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": plan.device == "cuda",
        "use_cpu": plan.device == "cpu",  # also makes CPU DDP (gloo) under a launcher work
        **distributed_kwargs(config, plan),  # deepspeed, fsdp, fsdp_config, ddp_*
        # trackio_* / swanlab_experiment_name / parallelism sizes: train.compat2
        **training_kwargs2(config, plan.world_size),
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
        lower = text.lower()
        if "load_best_model_at_end" in lower:
            key = "early_stopping_patience` with `save_steps`/`eval_steps"
        elif "optim" in lower:
            key = "optimizer"
        else:
            key = "lr_scheduler" if "scheduler" in lower else None
        where = f"`{key}`" if key else "a training option"
        raise ConfigError(f"{where} is not valid for transformers: {text.splitlines()[0]}") from exc
