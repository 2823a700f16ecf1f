"""Trainer callbacks: loss watchdog, early stopping, and the data identity of checkpoints."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError, NewtuneError

log = logging.getLogger(__name__)

DEFAULT_WATCHDOG_PATIENCE = 3
RESUME_FILE = "newtune_resume.json"


class TrainingAborted(NewtuneError):
    """Training stopped itself because it went wrong (e.g. the loss watchdog fired)."""

    exit_code = 3


class LossWatchdogCallback(TrainerCallback):
    """Stop training after `patience` logged training losses in a row above `threshold`.

    The run is stopped, not saved: checkpoints already written stay as they are, and
    `train.run` turns `tripped` into a TrainingAborted error after Trainer returns.
    """

    def __init__(self, threshold: float, patience: int = DEFAULT_WATCHDOG_PATIENCE) -> None:
        self.threshold, self.patience = threshold, patience
        self.violations = 0
        self.tripped: dict[str, Any] | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
        """Count consecutive high losses among the training-loss logs."""
        if not logs or "loss" not in logs:
            return control
        loss = float(logs["loss"])
        if math.isnan(loss) or loss > self.threshold:
            self.violations += 1
        else:
            self.violations = 0
        if self.violations >= self.patience and self.tripped is None:
            self.tripped = {"step": state.global_step, "loss": loss}
            control.should_training_stop = True
        return control

    def error(self, output_dir: str) -> TrainingAborted:
        """The one-paragraph error for the abort, naming the checkpoint to resume from."""
        assert self.tripped is not None
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        kept = (
            f"the last checkpoint is kept in {last}; resume from it with "
            f"`resume_from_checkpoint: {last}` after lowering `learning_rate`"
            if last
            else "no checkpoint had been written (set `save_steps` to keep some); "
            "lower `learning_rate` and train again"
        )
        return TrainingAborted(
            f"training aborted at step {self.tripped['step']}: the logged training loss was "
            f"above `loss_watchdog_threshold: {self.threshold}` for {self.patience} logs in a row "
            f"(`loss_watchdog_patience`; last loss {self.tripped['loss']:.4g}), so learning has "
            f"broken down and no final model was saved; {kept}"
        )


class CheckpointDataCallback(TrainerCallback):
    """Write the prepared-data fingerprint into every checkpoint (checked on resume)."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Record which prepared data this checkpoint was trained on."""
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                (folder / RESUME_FILE).write_text(json.dumps({"data": self.fingerprint}))
        return control


def build_callbacks(config: NewtuneConfig, fingerprint: str) -> list[TrainerCallback]:
    """The callbacks the config asks for."""
    callbacks: list[TrainerCallback] = [CheckpointDataCallback(fingerprint)]
    if config.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(config.early_stopping_patience))
    if config.loss_watchdog_threshold is not None:
        patience = config.loss_watchdog_patience or DEFAULT_WATCHDOG_PATIENCE
        callbacks.append(LossWatchdogCallback(config.loss_watchdog_threshold, patience))
    return callbacks


def resume_checkpoint(config: NewtuneConfig) -> str | None:
    """The checkpoint to resume from: `resume_from_checkpoint`, or the newest in output_dir
    with `auto_resume_from_checkpoints`; None to start fresh."""
    if config.resume_from_checkpoint:
        folder = Path(config.resume_from_checkpoint)
        if not folder.is_dir():
            raise ConfigError(
                f"`resume_from_checkpoint: {config.resume_from_checkpoint}` is not a folder; "
                f"point it at a `{PREFIX_CHECKPOINT_DIR}-N` folder a previous run wrote into its "
                "output_dir, or remove the key to start from the base model"
            )
        if not (folder / "trainer_state.json").is_file():
            raise ConfigError(
                f"`resume_from_checkpoint: {folder}` holds no trainer_state.json, so it is not a "
                f"training checkpoint; use a `{PREFIX_CHECKPOINT_DIR}-N` folder from output_dir"
            )
        return str(folder)
    if config.auto_resume_from_checkpoints and Path(config.output_dir).is_dir():
        last = get_last_checkpoint(config.output_dir)
        if last is not None:
            log.info("auto_resume_from_checkpoints: resuming from %s", last)
            return last
        log.info(
            "auto_resume_from_checkpoints: no checkpoint in %s; starting fresh", config.output_dir
        )
    return None


def check_resume_data(checkpoint: str, fingerprint: str) -> None:
    """Refuse to resume on prepared data other than the checkpoint was trained on."""
    record = Path(checkpoint) / RESUME_FILE
    if not record.is_file():
        return  # a checkpoint from another tool: nothing to compare
    trained_on = json.loads(record.read_text()).get("data")
    if trained_on and trained_on != fingerprint:
        raise ConfigError(
            f"`resume_from_checkpoint`: {checkpoint} was trained on prepared data {trained_on}, "
            f"but this config prepares {fingerprint}; the data order would differ. Resume "
            "with the config of the interrupted run (same datasets, sequence_len, tokenizer "
            "and seed), or start fresh without resuming"
        )
