"""The train command's work: data, model, adapter, Trainer, and the saved outputs."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import set_seed

from newtune.config.load import LoadedConfig, dump_config
from newtune.config.machine import check_machine
from newtune.config.resolve import RunPlan, resolve
from newtune.config.schema import NewtuneConfig
from newtune.data.collate import PadCollator
from newtune.data.packing import Packing, packing_plan, sample_lengths
from newtune.data.prepare import PreparedData, prepare, prepare_data  # noqa: F401 - re-export
from newtune.errors import ModelError
from newtune.fileio import clean_stale, temp_dir_beside, temp_name
from newtune.models.load import build_model
from newtune.models.tokenizer import load_tokenizer
from newtune.train.args import build_training_args, schedule_for
from newtune.train.callbacks import (
    LossWatchdogCallback,
    build_callbacks,
    check_resume_data,
    resume_checkpoint,
    resume_record,
)
from newtune.train.distributed import check_distributed, gather_weights
from newtune.train.eaft import loss_func
from newtune.train.kernels import apply_liger, fused_head
from newtune.train.methods import method_for
from newtune.train.methods.base import Reference, mask_attention
from newtune.train.precision import tf32_scope
from newtune.train.preflight import check_output_dir, check_sequence_len
from newtune.train.report import (
    LOSS_PLOT,
    MODEL_CARD,
    model_card,
    tracker_environment,
    write_loss_plot,
)
from newtune.train.seed_features import attach
from newtune.train.trainer import NewtuneTrainer, packed_loader

log = logging.getLogger(__name__)

CONFIG_FILE = "newtune_config.yml"


def _log_packing(config: NewtuneConfig, prepared: PreparedData, batches: int, steps: int) -> None:
    report = prepared.stats.get("packing", {})
    log.info(
        "sample packing: %s samples -> %s rows of %s tokens (efficiency %.1f%%); "
        "%s micro-batches per rank and %s optimizer steps per epoch",
        prepared.stats["rows"]["train"],
        report.get("packed_rows"),
        report.get("row_capacity"),
        100 * report.get("efficiency", 0.0),
        batches,
        steps,
    )
    measured = {
        "sample_packing_eff_est": report.get("efficiency"),
        "total_num_tokens": prepared.stats["total_tokens"],
    }
    for key, value in measured.items():
        given = getattr(config, key)
        if given is not None:
            log.info("%s: the config says %s, the data measures %s", key, given, value)


def _fingerprint(prepared: PreparedData) -> str:
    return str(prepared.stats.get("fingerprint") or prepared.path.name)


def training_model(
    config: NewtuneConfig, plan: RunPlan, tokenizer: Any, new_ids: list[int] | None = None
) -> Any:
    """The model to train, with its adapter and liger kernels; adapter init follows `seed`."""
    set_seed(config.seed)  # adapter init (LoRA A matrices) is reproducible from `seed`
    model = build_model(config, plan, tokenizer, new_ids or [])
    apply_liger(model, config)
    from newtune.train.compat2 import apply_model_keys

    apply_model_keys(model, config)  # unfrozen_parameters, kernels, offloading, CCE
    return model


def _own_copy(loaded: LoadedConfig) -> LoadedConfig:
    """A copy of the caller's config that this run may use freely (the caller's stays as is)."""
    return dataclasses.replace(
        loaded,
        config=loaded.config.model_copy(deep=True),
        raw=copy.deepcopy(loaded.raw),
        notes=list(loaded.notes),
    )


def train(loaded: LoadedConfig, plan: RunPlan | None = None) -> Path:
    """Train as the config says; return the output folder. `loaded` is not changed.

    Before any data is prepared or a model loaded: DeepSpeed/FSDP settings are checked, temp
    folders that dead processes left in output_dir are removed, output_dir must be writable,
    `sequence_len` must fit (`train.preflight`), and a resume checkpoint must be complete.
    """
    loaded = check_distributed(_own_copy(loaded))  # relative deepspeed path pinned in the copy
    config = loaded.config
    plan = plan or resolve(config)
    check_machine(config, plan.device)  # packages, CUDA, launch: validate only warned
    method = method_for(config)  # the training method's own config errors: before any work
    check_output_dir(config.output_dir)
    if plan.local_rank == 0:
        for entry in clean_stale(Path(config.output_dir)):
            log.info("removed %s, left by a process that no longer runs", entry)
    check_sequence_len(config, plan)
    checkpoint = resume_checkpoint(config)  # a missing or incomplete folder fails now
    from newtune.train.compat4 import run_scope4  # flex wrapper, otel endpoint: undone after

    with tf32_scope(config.tf32), run_scope4():  # process-wide switches: restored after the run
        if getattr(method, "trains_itself", False):  # online RL (rl: ebft): its own data + loop
            return method.train(loaded, plan, checkpoint)
        if config.pretraining_dataset or config.streaming:  # no prepared copy: train.streamed
            from newtune.train.streamed import train_streamed

            return train_streamed(loaded, plan, checkpoint)
        return _train(loaded, plan, checkpoint, method)


def _train(loaded: LoadedConfig, plan: RunPlan, checkpoint: str | None, method: Any) -> Path:
    """Prepare data, build the model, train, and save the outputs."""
    config = loaded.config
    from newtune.config.schema.multimodal import is_multimodal

    if is_multimodal(config):  # a processor, image rows, a VLM: train.methods.vision
        from newtune.train.methods.vision import train_vision

        return train_vision(loaded, plan, checkpoint)
    tokenizer, new_ids = load_tokenizer(config)
    prepared = prepare(config, tokenizer, tokenizer.chat_template)
    log.info("prepared data: %s (%s)", prepared.path, "reused" if prepared.reused else "new")
    method.check_data(prepared.data)
    if checkpoint is not None:
        check_resume_data(checkpoint, _fingerprint(prepared))
    model = training_model(config, plan, tokenizer, new_ids)
    callbacks = build_callbacks(config)
    with tracker_environment(config):
        if method.is_preference:
            trainer = _preference_trainer(
                method, config, plan, model, tokenizer, prepared, callbacks
            )
        else:
            trainer = _sft_trainer(config, plan, model, tokenizer, prepared, callbacks)
        attach(trainer, config, tokenizer)  # ReLoRA, jagged lr, LoRA+, LISA, generation metrics
        if checkpoint is not None:
            log.info("resuming from %s (step %s)", checkpoint, _checkpoint_step(checkpoint))
        metrics = train_and_evaluate(trainer, callbacks, config, checkpoint)
    return finish_run(trainer, tokenizer, loaded, prepared, metrics)


def train_and_evaluate(
    trainer: NewtuneTrainer, callbacks: list[Any], config: NewtuneConfig, checkpoint: str | None
) -> dict[str, Any]:
    """Train (stopping with the abort's error if a callback aborted), then the final eval."""
    result = trainer.train(resume_from_checkpoint=checkpoint)
    _raise_if_aborted(callbacks, config.output_dir)
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(_final_eval(trainer))
    return metrics


def finish_run(
    trainer: NewtuneTrainer,
    processing_class: Any,
    loaded: LoadedConfig,
    prepared: PreparedData,
    metrics: dict[str, Any],
) -> Path:
    """Gather the weights (every rank); rank 0 saves the outputs and pushes them when asked."""
    out = Path(loaded.config.output_dir)
    weights = gather_weights(trainer)  # ZeRO-3 / FSDP shards -> whole tensors (every rank)
    if trainer.is_world_process_zero():
        save_outputs(
            trainer.model,
            processing_class,
            loaded,
            prepared,
            metrics,
            out,
            trainer.state,
            trainer.args,
            state_dict=weights,
        )
        if trainer.args.push_to_hub:
            push_final(trainer, out)
    return out


def _sft_trainer(
    config: NewtuneConfig,
    plan: RunPlan,
    model: Any,
    tokenizer: Any,
    prepared: PreparedData,
    callbacks: list[Any],
) -> NewtuneTrainer:
    """The SFT Trainer: padded or multipack batches, the token-normalised loss."""
    eval_ds = prepared.data.get("test", None)
    train_ds = prepared.data["train"]
    if config.group_by_length:
        train_ds = train_ds.add_column("length", sample_lengths(train_ds).tolist())
    packing, eval_packing = packing_plan(config)
    pad_to = config.sequence_len if config.pad_to_sequence_len else None
    packed = None
    if packing is not None:
        packed = packed_loader(
            train_ds,
            packing,
            tokenizer.pad_token_id,
            seed=config.seed,
            shuffle=True,
            num_replicas=plan.world_size,
            rank=plan.rank,
            epochs=max(1, math.ceil(config.num_epochs)),
        )
        batches = len(packed)
    else:
        batches = math.ceil(len(train_ds) / (config.micro_batch_size * plan.world_size))
    steps_per_epoch = max(1, math.ceil(batches / plan.gradient_accumulation_steps))
    trainer = NewtuneTrainer(
        model=model,
        args=build_training_args(config, plan, eval_ds is not None, steps_per_epoch),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PadCollator(tokenizer.pad_token_id, pad_to),
        processing_class=tokenizer,
        callbacks=callbacks,
        packing=packing,
        eval_packing=eval_packing,
        pad_to=pad_to,
        packed_train=packed,
        schedule=schedule_for(config),
        fused_head=fused_head(config),
        checkpoint_files=resume_record(_fingerprint(prepared)),
        compute_loss_func=loss_func(config),  # use_eaft
    )
    if packing is not None:
        _log_packing(config, prepared, batches, steps_per_epoch)
    return trainer


def _preference_trainer(
    method: Any,
    config: NewtuneConfig,
    plan: RunPlan,
    model: Any,
    tokenizer: Any,
    prepared: PreparedData,
    callbacks: list[Any],
) -> NewtuneTrainer:
    """The Trainer of a preference method: its collator (padded or packed), loss, reference."""
    from newtune.train.methods.reference import live_reference, precompute
    from newtune.train.methods.trainer import PreferenceTrainer

    splits = {
        name: method.prepare_rows(ds, config.micro_batch_size) for name, ds in prepared.data.items()
    }
    if method.sequence_classification:
        model.config.pad_token_id = tokenizer.pad_token_id
    pad_id = tokenizer.pad_token_id
    if method.needs_reference and config_flag(config, "precompute_ref_log_probs"):
        reference = Reference("adapter" if plan.train_mode in ("lora", "qlora") else "model")
        if reference.kind == "model":
            reference.model = model  # before training, the policy is the reference
        splits = precompute(method, config, plan, prepared.path, splits, reference, model, pad_id)
        reference = Reference("precomputed")
    else:
        reference = live_reference(method, config, plan, tokenizer)
    train_ds, eval_ds = splits["train"], splits.get("test")
    if config.group_by_length:
        train_ds = train_ds.add_column("length", method.lengths(train_ds))
    packing, eval_packing = packing_plan(config)
    if config_flag(config, "dpo_padding_free") and packing is None:
        packing = Packing.for_run(
            config.sequence_len, config.micro_batch_size, plan.attn_implementation
        )
        eval_packing = eval_packing or packing
    pad_to = config.sequence_len if config.pad_to_sequence_len else None
    attention = plan.attn_implementation  # shared prompts only where a 4-D mask is exact
    batches = math.ceil(len(train_ds) / (config.micro_batch_size * plan.world_size))
    steps_per_epoch = max(1, math.ceil(batches / plan.gradient_accumulation_steps))
    if packing is not None:
        log.info("sample packing: the sequences of each micro-batch are packed into rows")
    return PreferenceTrainer(
        model=model,
        args=build_training_args(config, plan, eval_ds is not None, steps_per_epoch),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=method.collator(
            pad_id, pair_capacity(packing, config), pad_to, mask_attention(model, attention)
        ),
        processing_class=tokenizer,
        callbacks=callbacks,
        pad_to=pad_to,
        schedule=schedule_for(config),
        checkpoint_files=resume_record(_fingerprint(prepared)),
        method=method,
        reference=reference,
        eval_collator=method.collator(
            pad_id, pair_capacity(eval_packing, config), pad_to, mask_attention(model, attention)
        ),
    )


def config_flag(config: NewtuneConfig, key: str) -> bool:
    """A preference key's truth (the keys live in config.schema.preference)."""
    return bool(getattr(config, key, None))


def pair_capacity(packing: Packing | None, config: NewtuneConfig) -> int | None:
    """Row capacity for packing a micro-batch's sequences, or None to pad them one per row."""
    if packing is None:
        return None
    if packing.rows == 1:  # flash-attention varlen: every sequence of the batch in one row
        return 2 * config.sequence_len * config.micro_batch_size
    return config.sequence_len


def _checkpoint_step(checkpoint: str) -> int | None:
    state = Path(checkpoint) / "trainer_state.json"
    return json.loads(state.read_text()).get("global_step") if state.is_file() else None


def _raise_if_aborted(callbacks: list[Any], output_dir: str) -> None:
    for callback in callbacks:
        if isinstance(callback, LossWatchdogCallback) and callback.tripped is not None:
            raise callback.error(output_dir)


def push_final(trainer: NewtuneTrainer, out: Path) -> None:
    """Upload the final output folder to `hub_model_id` (checkpoints go with hub_strategy)."""
    from huggingface_hub import HfApi

    if hasattr(trainer, "_finish_current_push"):
        trainer._finish_current_push()  # checkpoint pushes Trainer started (hub_strategy)
    repo = trainer.hub_model_id or trainer.args.hub_model_id  # as Trainer resolved it
    try:
        HfApi().upload_folder(
            repo_id=repo,
            folder_path=str(out),
            commit_message="newtune: end of training",
            ignore_patterns=["checkpoint-*", "last-checkpoint/*", "runs/*", "wandb/*", ".tmp-*"],
        )
    except Exception as exc:  # noqa: BLE001 - any hub failure: the trained model is safe locally
        raise ModelError(
            f"`hub_model_id: {repo}`: pushing the trained model failed ({type(exc).__name__}: "
            f"{exc}); it is saved in {out}. Check HF_TOKEN (or `hf auth login`) and the repo "
            "name, then upload the folder with `hf upload`"
        ) from exc
    log.info("pushed %s to the hub as %s", out, repo)


def _final_eval(trainer: NewtuneTrainer) -> dict[str, Any]:
    """Eval metrics of the final weights: the last eval if it ran at the last step, else a new one."""
    state = trainer.state
    last = next((h for h in reversed(state.log_history) if "eval_loss" in h), None)
    best = state.best_global_step if trainer.args.load_best_model_at_end else None
    reloaded = best is not None and best != state.global_step  # early stopping: best weights
    if last is not None and last.get("step") == state.global_step and not reloaded:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return trainer.evaluate()


def write_model_files(
    folder: Path,
    model: Any,
    tokenizer: Any,
    config: NewtuneConfig,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Weights (or adapter) as safetensors, tokenizer, and the config used (secrets redacted).

    `state_dict`: whole tensors gathered from ZeRO-3/FSDP shards (`gather_weights`).
    """
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    (folder / CONFIG_FILE).write_text(dump_config(config))


def save_outputs(
    model: Any,
    tokenizer: Any,
    loaded: LoadedConfig,
    prepared: PreparedData,
    metrics: dict[str, Any],
    out: Path,
    state: Any,
    args: Any = None,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write weights (or adapter), tokenizer, config, stats, loss plot and model card into a
    temp folder inside `out`, then publish them into `out` (`publish_final`)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out / FINAL_NAME)  # `out/.tmp-final-{pid}@{host}`: clean_stale knows it
    try:
        write_model_files(tmp, model, tokenizer, loaded.config, state_dict)
        (tmp / "stats.json").write_text(json.dumps(prepared.stats, indent=2))
        (tmp / "train_results.json").write_text(json.dumps(metrics, indent=2))
        (tmp / "log_history.json").write_text(json.dumps(state.log_history, indent=2))
        plot = write_loss_plot(state.log_history, tmp / LOSS_PLOT)
        if args is not None:
            card = model_card(loaded.config, args, metrics, state.log_history, prepared.stats, plot)
            (tmp / MODEL_CARD).write_text(card)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_final(tmp, out)


FINAL_NAME = "final"
# A folder is a model to transformers, peft and newtune (inference, evaluate, merge-lora) once
# it has one of these files; they are the last files of a final save to appear.
MODEL_MARKERS = ("config.json", "adapter_config.json")
WEIGHT_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "adapter_model.bin",
)


def _is_weights(path: Path) -> bool:
    return any(path.match(pattern) for pattern in WEIGHT_FILES)


def _publish_order(entry: Path) -> tuple[int, str]:
    """Other files first, then weight shards, then shard indexes, then the model markers."""
    if entry.name in MODEL_MARKERS:
        return 3, entry.name
    if _is_weights(entry):
        return (2 if entry.name.endswith(".index.json") else 1), entry.name
    return 0, entry.name


def publish_final(tmp: Path, out: Path) -> None:
    """Move a finished final save from `tmp` into `out` so that `out` never looks like a model
    that is not whole.

    `out` also holds what training wrote there (checkpoint-N, runs/, ...), so it cannot be
    swapped as one folder; those entries are left alone. Instead, with every file already
    complete in `tmp` (same file system, so each move is one rename):

    1. the previous result's model markers (config.json, adapter_config.json) and then its
       weight files are moved aside into `.old-final-*`, so old weights never meet new files;
    2. the new files move in: tokenizer, config used, stats, plot and card first, then the
       weight shards, then shard indexes, and the markers last.

    A process killed at any point leaves `out` without a marker (no model, `newtune train`
    runs again) or with the whole new model; the temp folders are removed by the next run's
    `clean_stale`.
    """
    old = temp_name(out / FINAL_NAME, "old")
    old.mkdir(exist_ok=True)
    previous = [out / m for m in MODEL_MARKERS] + sorted(
        p for p in out.iterdir() if p.is_file() and _is_weights(p)
    )
    for entry in previous:
        if entry.exists():
            os.replace(entry, old / entry.name)
    for entry in sorted(tmp.iterdir(), key=_publish_order):
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            os.replace(target, old / entry.name)  # a folder of that name: moved aside, not merged
        os.replace(entry, target)
    tmp.rmdir()
    shutil.rmtree(old, ignore_errors=True)
