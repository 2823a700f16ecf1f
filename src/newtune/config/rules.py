"""Cross-key rules and not-implemented keys: checks on a validated config, no mutation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from newtune.config.compat import compat_notes, compat_rules
from newtune.config.compat2 import compat2_notes, compat2_rules
from newtune.config.keys import is_off
from newtune.config.machine import missing_here
from newtune.config.schema import DatasetEntry, NewtuneConfig, status_of
from newtune.config.schema.formats import entry_problems
from newtune.config.schema.multimodal import multimodal_rules
from newtune.config.schema.online import ONLINE_RL, online_entry_problems
from newtune.config.schema.preference import training_method
from newtune.config.schema.pretraining import streaming_rules
from newtune.config.schema.seed_training import seed_training_rules


@dataclass
class Findings:
    """Errors (the config cannot run) and warnings (it runs, but probably not as meant)."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _both(names: Callable[[str], str], a: str, b: str, why: str) -> str:
    return f"`{names(a)}` and `{names(b)}` are both set; {why}"


def check_rules(cfg: NewtuneConfig, names: Callable[[str], str] = str) -> Findings:
    """Every cross-key rule; messages name the keys as the user spelled them."""
    out = Findings()
    err = out.errors.append
    if cfg.warmup_steps is not None and cfg.warmup_ratio is not None:
        err(_both(names, "warmup_steps", "warmup_ratio", "keep one of them"))
    if cfg.eval_steps is not None and cfg.evals_per_epoch is not None:
        err(_both(names, "eval_steps", "evals_per_epoch", "keep one of them"))
    if cfg.save_steps is not None and cfg.saves_per_epoch is not None:
        err(_both(names, "save_steps", "saves_per_epoch", "keep one of them"))
    if cfg.val_set_size and cfg.test_datasets:
        err(_both(names, "val_set_size", "test_datasets", "evaluate on one or the other"))
    if cfg.load_in_8bit and cfg.load_in_4bit:
        err(_both(names, "load_in_8bit", "load_in_4bit", "choose one quantization"))
    if cfg.bf16 and cfg.fp16:
        err(_both(names, "bf16", "fp16", "choose one precision"))
    batch_keys = [
        k
        for k in ("micro_batch_size", "gradient_accumulation_steps", "batch_size")
        if k in cfg.model_fields_set
    ]
    if len(batch_keys) == 3:
        err(
            "`micro_batch_size`, `gradient_accumulation_steps` and `batch_size` are all set; "
            "set at most two (batch_size = micro_batch_size x gradient_accumulation_steps)"
        )
    elif cfg.batch_size is not None and cfg.batch_size % cfg.micro_batch_size:
        err(
            f"`batch_size: {cfg.batch_size}` is not a multiple of "
            f"`micro_batch_size: {cfg.micro_batch_size}`"
        )
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        err("`adapter: qlora` requires `load_in_4bit: true`")
    bits = "load_in_4bit" if cfg.load_in_4bit else ("load_in_8bit" if cfg.load_in_8bit else None)
    if bits and cfg.adapter is None:
        err(
            f"`{names(bits)}: true` without `adapter`: quantized weights cannot be trained in "
            "full; set `adapter: qlora` (4-bit) or `adapter: lora` (8-bit), or remove the key"
        )
    if bits and str(cfg.base_model).endswith(".gguf"):
        err(
            f"`{names(bits)}: true` with a .gguf `base_model`: bitsandbytes quantizes "
            "safetensors weights; convert the GGUF file to a model folder (load it and "
            "`save_pretrained`), or train without quantization"
        )
    if bits and (cfg.peft or {}).get("loftq_config") is not None:
        err(
            f"`{names(bits)}` and `peft.loftq_config` are both set; LoftQ quantizes the base "
            "weights itself and needs them unquantized: remove the load_in key"
        )
    if cfg.sample_packing and cfg.group_by_length:
        err(
            _both(
                names,
                "sample_packing",
                "group_by_length",
                "packing already groups samples into full rows; keep one",
            )
        )
    if cfg.save_safetensors is False:
        err(
            "`save_safetensors: false` asks for pickle weights; newtune always writes "
            "safetensors (loadable everywhere, safe to open); remove the key"
        )
    out.errors += _training_rules(cfg, names)
    out.errors += streaming_rules(cfg, names)
    out.errors += multimodal_rules(cfg)
    out.errors += compat_rules(cfg, names)
    out.errors += compat2_rules(cfg, names)  # plugins, kernels, trackers, parallelism
    from newtune.config.compat3 import compat3_rules

    out.errors += compat3_rules(cfg, names)  # data order, re-init, quantization configs
    from newtune.config.compat4 import compat4_rules

    out.errors += compat4_rules(cfg, names)  # eta_min, flex compile kwargs, unfrozen + adapter
    out.errors += seed_training_rules(cfg, names)
    from newtune.config.ray import ray_rules

    out.errors += ray_rules(cfg, names)  # use_ray, ray_num_workers, resources_per_worker
    from newtune.config.schema.online import online_rules

    out.errors += online_rules(cfg)  # `trl:`/`vllm:`/`ebft:` blocks (rl: ebft)
    # packages this machine lacks are warnings: the config may train on another machine
    # (`train` refuses at start: config.machine.check_machine)
    out.warnings += missing_here(cfg, names)
    out.errors += _preference_rules(cfg, names, out.warnings)
    out.errors += _reporting_rules(cfg, names, out.warnings)
    if cfg.adapter is None:
        set_lora = sorted(
            k for k in cfg.model_fields_set if k.startswith("lora_") and k != "lora_model_dir"
        )
        if set_lora:
            out.warnings.append(
                f"{', '.join(f'`{k}`' for k in set_lora)} set without `adapter`; "
                "they are ignored and all weights are trained"
            )
    _distributed_rules(cfg, names, out)
    return out


def _distributed_rules(cfg: NewtuneConfig, names: Callable[[str], str], out: Findings) -> None:
    """DeepSpeed / FSDP: one engine at a time, and the package DeepSpeed needs."""
    fsdp_on = bool(cfg.fsdp) or bool(cfg.fsdp_config)
    if cfg.deepspeed and fsdp_on:
        key = "fsdp" if cfg.fsdp else "fsdp_config"
        out.errors.append(_both(names, "deepspeed", key, "choose DeepSpeed or FSDP"))
    if cfg.fsdp_version is not None and not fsdp_on:
        out.errors.append(
            f"`{names('fsdp_version')}` is set but FSDP is off; add `fsdp_config` (and `fsdp`) "
            "or remove it"
        )


LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
WANDB_VALUES = {
    "wandb_mode": ("online", "offline", "disabled"),
    "wandb_log_model": ("false", "checkpoint", "end"),
    "wandb_watch": ("false", "gradients", "parameters", "all"),
}


def _optimizer_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    errors = []
    projected = cfg.optimizer.startswith(("galore_", "apollo_"))
    if projected and not cfg.optim_target_modules:
        errors.append(
            f"`{names('optimizer')}: {cfg.optimizer}` projects the gradients of chosen modules: "
            f"set `{names('optim_target_modules')}` (e.g. [attn, mlp] or all-linear)"
        )
    if cfg.optim_target_modules and not projected:
        errors.append(
            f"`{names('optim_target_modules')}` only applies to the galore_*/apollo_* optimizers, "
            f"not `{names('optimizer')}: {cfg.optimizer}`; remove it"
        )
    return errors


def _training_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    errors = _optimizer_rules(cfg, names)
    cosine_keys = ("cosine_min_lr_ratio", "cosine_constant_lr_ratio", "lr_quadratic_warmup")
    for key in cosine_keys:
        if not is_off(getattr(cfg, key)) and cfg.lr_scheduler != "cosine":
            errors.append(
                f"`{names(key)}` shapes the cosine schedule, but `{names('lr_scheduler')}` is "
                f"{cfg.lr_scheduler}; set `lr_scheduler: cosine` or remove `{names(key)}`"
            )
    floor = cfg.cosine_min_lr_ratio if cfg.eta_min is None else cfg.eta_min  # eta_min: absolute
    if cfg.cosine_constant_lr_ratio is not None and floor is None:
        errors.append(
            f"`{names('cosine_constant_lr_ratio')}` holds the lr at `cosine_min_lr_ratio` for the "
            f"rest of training; set `{names('cosine_min_lr_ratio')}` too (e.g. 0.1)"
        )
    if cfg.lr_div_factor is not None and cfg.lr_scheduler != "one_cycle":
        errors.append(
            f"`{names('lr_div_factor')}` applies to `lr_scheduler: one_cycle`, not "
            f"`{names('lr_scheduler')}: {cfg.lr_scheduler}`; remove it"
        )
    if cfg.loss_watchdog_patience is not None and cfg.loss_watchdog_threshold is None:
        errors.append(
            f"`{names('loss_watchdog_patience')}` is set without "
            f"`{names('loss_watchdog_threshold')}`; set the threshold (about 2x the first loss)"
        )
    if cfg.early_stopping_patience is not None and not (cfg.val_set_size or cfg.test_datasets):
        errors.append(
            f"`{names('early_stopping_patience')}` stops on the eval loss, but there is no eval "
            "split; set `val_set_size` (e.g. 0.05) or `test_datasets`"
        )
    if cfg.liger_cross_entropy and cfg.liger_fused_linear_cross_entropy:
        errors.append(
            _both(
                names,
                "liger_cross_entropy",
                "liger_fused_linear_cross_entropy",
                "the fused kernel already computes the cross-entropy; keep one",
            )
        )
    return errors


# key -> the `rl` values that read it ("reward": `reward_model: true`)
_PREFERENCE_KEYS: dict[str, tuple[str, ...]] = {
    "rl_beta": ("dpo", "ipo", "simpo", "orpo", "kto", "grpo", "gdpo"),  # grpo: trl.beta's default
    "dpo_loss_type": ("dpo", "ipo"),
    "dpo_loss_weights": ("dpo", "ipo"),
    "dpo_label_smoothing": ("dpo", "ipo", "simpo"),
    "dpo_use_weighting": ("dpo", "ipo"),
    "dpo_use_liger_kernel": ("dpo", "ipo"),
    "dpo_padding_free": ("dpo", "ipo", "simpo", "orpo", "kto"),
    "precompute_ref_log_probs": ("dpo", "ipo", "kto"),
    "cpo_alpha": ("simpo",),
    "simpo_gamma": ("simpo",),
    "orpo_alpha": ("orpo",),
    "kto_desirable_weight": ("kto",),
    "kto_undesirable_weight": ("kto",),
    "max_prompt_len": ("dpo", "ipo", "simpo", "orpo", "kto"),
    "num_labels": ("reward", "prm"),
    "center_rewards_coefficient": ("reward",),
}


def _preference_rules(
    cfg: NewtuneConfig, names: Callable[[str], str], warnings: list[str]
) -> list[str]:
    """Preference keys only with the method that reads them; loss lists that agree."""
    errors = []
    if cfg.rl and cfg.reward_model:
        errors.append(
            f"`{names('rl')}: {cfg.rl}` and `{names('reward_model')}: true` are both set; a "
            "reward model is trained with its own (Bradley-Terry) loss: keep one of them"
        )
    errors += _prm_rules(cfg, names)
    rl = "reward" if cfg.reward_model else ("prm" if cfg.process_reward_model else cfg.rl)
    labels = {None: "SFT", "reward": "`reward_model: true`", "prm": "`process_reward_model: true`"}
    for key, readers in _PREFERENCE_KEYS.items():
        value = getattr(cfg, key)
        if value is None or value is False or rl in readers:
            continue
        method = labels.get(rl, f"`rl: {rl}`")
        wanted = " or ".join(labels.get(r, f"`rl: {r}`") for r in readers)
        errors.append(
            f"`{names(key)}: {value}` is read only with {wanted}, and this config trains with "
            f"{method}; remove it"
        )
    types = cfg.dpo_loss_type or ["sigmoid"]
    if cfg.rl == "ipo" and cfg.dpo_loss_type not in (None, ["ipo"]):
        errors.append(
            f"`rl: ipo` is DPO with `dpo_loss_type: [ipo]`, but `{names('dpo_loss_type')}` is "
            f"{cfg.dpo_loss_type}; use `rl: dpo` with that list, or remove the key"
        )
    weights = cfg.dpo_loss_weights
    if weights is not None and len(weights) != len(types):
        errors.append(
            f"`{names('dpo_loss_weights')}` has {len(weights)} weight(s) for "
            f"{len(types)} loss type(s) ({', '.join(types)}); give one weight per "
            f"`{names('dpo_loss_type')}` entry"
        )
    if cfg.num_labels is not None and cfg.num_labels != 1 and not cfg.process_reward_model:
        errors.append(
            f"`{names('num_labels')}: {cfg.num_labels}`: a Bradley-Terry reward model scores "
            "a sequence with one number; use `num_labels: 1` or remove the key"
        )
    return errors


def _prm_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    """`process_reward_model: true` (train.methods.prm): what its token classifier cannot take."""
    if not cfg.process_reward_model:
        return []
    errors = []
    why = f"`{names('process_reward_model')}: true`"
    for other in ("rl", "reward_model"):
        value = getattr(cfg, other)
        if value:
            errors.append(
                f"{why} and `{names(other)}: {'true' if value is True else value}` are both "
                "set; a process "
                "reward model trains a token classifier on step labels with its own loss: keep "
                "one of them"
            )
    if cfg.num_labels is not None and cfg.num_labels != 2:
        errors.append(
            f"`{names('num_labels')}: {cfg.num_labels}` with {why}: each step is labelled "
            "right or wrong (true/false), so the classifier has 2 classes and is trained with "
            "cross-entropy on them (as TRL's PRMTrainer); use `num_labels: 2` or remove the key"
        )
    model_type = cfg.model_type
    if model_type and not str(model_type).endswith("ForTokenClassification"):
        errors.append(
            f"`{names('model_type')}: {model_type}` with {why}: a process reward model is a "
            "token classifier (a label at each step's separator); use `model_type: "
            "AutoModelForTokenClassification` or remove the key"
        )
    for key in ("sample_packing", "eval_sample_packing"):
        if getattr(cfg, key):
            errors.append(
                f"`{names(key)}: true` with {why}: process reward rows are padded one per "
                "batch row (Axolotl and TRL do not pack them either); set it false or remove it"
            )
    if cfg.chat_template is not None:
        errors.append(
            f"`{names('chat_template')}: {cfg.chat_template}` with {why}: `type: "
            "stepwise_supervised` tokenizes the prompt and steps as plain text (as Axolotl and "
            "TRL do), so no chat template would be applied; remove the key"
        )
    if cfg.train_on_inputs:
        errors.append(
            f"`{names('train_on_inputs')}: true` with {why}: only the steps' separator tokens "
            "carry labels, and a prompt has no step label to train; remove the key"
        )
    if getattr(cfg, "processor_type", None):
        errors.append(
            f"`{names('processor_type')}` with {why}: process reward models train on text "
            "steps; remove processor_type or train a text-only model"
        )
    return errors


def _reporting_rules(
    cfg: NewtuneConfig, names: Callable[[str], str], warnings: list[str]
) -> list[str]:
    errors = []
    for key, allowed in WANDB_VALUES.items():
        value = getattr(cfg, key)
        if value is not None and str(value).lower() not in allowed:
            errors.append(f"`{names(key)}: {value}` is not one of {', '.join(allowed)}")
    wandb_set = sorted(
        k for k in cfg.model_fields_set if k.startswith("wandb_") and getattr(cfg, k) is not None
    )
    if wandb_set and not cfg.wandb_project:
        warnings.append(
            f"{', '.join(f'`{names(k)}`' for k in wandb_set)} set without `wandb_project`; "
            "nothing is reported to Weights & Biases"
        )
    wanted = {
        "wandb": bool(cfg.wandb_project) and cfg.wandb_mode != "disabled",
        "mlflow": bool(cfg.mlflow_tracking_uri or cfg.mlflow_experiment_name),
        "tensorboard": bool(cfg.use_tensorboard),
    }
    if cfg.hf_mlflow_log_artifacts and not wanted["mlflow"]:
        warnings.append(
            f"`{names('hf_mlflow_log_artifacts')}` set without `mlflow_tracking_uri` or "
            "`mlflow_experiment_name`; nothing is logged to MLflow"
        )
    if cfg.hub_strategy is not None and cfg.hub_model_id is None:
        errors.append(
            f"`{names('hub_strategy')}` is set without `{names('hub_model_id')}`; name the hub "
            "repo to push to, or remove hub_strategy"
        )
    return errors


def _unimplemented_in(model: NewtuneConfig | DatasetEntry, prefix: str) -> list[str]:
    found = []
    for name, info in type(model).model_fields.items():
        meta = status_of(info)
        if meta["status"] in ("implemented", "ignored"):
            continue
        value = getattr(model, name)
        if is_off(value):
            continue
        alt = f"; use {meta['alternative']} instead" if "alternative" in meta else ""
        reason = f": {meta['reason']}" if "reason" in meta else " is not implemented by newtune"
        found.append(f"`{prefix}{name}: {value!r}`{reason}{alt}; remove it or set it to null")
    return found


def check_unimplemented(cfg: NewtuneConfig) -> list[str]:
    """Keys newtune does not implement set to a value, and dataset entries it cannot read."""
    found = _unimplemented_in(cfg, "")
    for key in ("datasets", "test_datasets"):
        for i, entry in enumerate(getattr(cfg, key) or []):
            found += _unimplemented_in(entry, f"{key}[{i}].")
            # unknown formats, bad `:style`, bad `type:` mappings and entry keys the format
            # does not read; plugin formats are only checked to exist (no code runs here)
            if cfg.rl in ONLINE_RL:  # a user transform `module.function`
                found += online_entry_problems(entry, f"{key}[{i}]")
                continue
            found += entry_problems(entry, f"{key}[{i}]", training_method(cfg))
    return found


def ignored_keys(cfg: NewtuneConfig) -> list[str]:
    """Notes for ignored keys that were given a value."""
    notes = []
    for name in sorted(cfg.model_fields_set):
        info = type(cfg).model_fields[name]
        if status_of(info)["status"] == "ignored" and getattr(cfg, name) is not None:
            notes.append(f"`{name}` is ignored: {info.description}")
    from newtune.config.compat4 import compat4_notes

    return notes + compat_notes(cfg) + compat2_notes(cfg) + compat4_notes(cfg)
