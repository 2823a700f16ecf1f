"""Trainer callbacks (loss watchdog, early stopping) and checkpoints: completeness, resume, data."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

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
        last = newest_complete_checkpoint(Path(output_dir)) if Path(output_dir).is_dir() else None
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


def resume_record(fingerprint: str) -> dict[str, str]:
    """The files NewtuneTrainer writes into every checkpoint: the prepared-data fingerprint,
    checked on resume (`check_resume_data`)."""
    return {RESUME_FILE: json.dumps({"data": fingerprint})}


def build_callbacks(config: NewtuneConfig) -> list[TrainerCallback]:
    """The callbacks the config asks for."""
    callbacks: list[TrainerCallback] = []
    if config.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(config.early_stopping_patience))
    if config.loss_watchdog_threshold is not None:
        patience = config.loss_watchdog_patience or DEFAULT_WATCHDOG_PATIENCE
        callbacks.append(LossWatchdogCallback(config.loss_watchdog_threshold, patience))
    from newtune.train.compat2 import callbacks2

    callbacks += callbacks2(config)  # qat: fake quantization switch and final conversion
    return callbacks


# A checkpoint holds weights in one of these forms: safetensors (whole, sharded, adapter),
# torch .bin files, FSDP sharded folders, or DeepSpeed's global_step folders.
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "adapter_model.*",
    "pytorch_model_fsdp*",
    "global_step*",
)
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_missing(folder: Path) -> list[str]:
    """What a checkpoint folder lacks to resume from ([] when complete)."""
    missing = []
    state = folder / TRAINER_STATE
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        missing.append(TRAINER_STATE)
    except (OSError, ValueError):
        missing.append(f"a readable {TRAINER_STATE} (it is truncated or not JSON)")
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing.append("model weights (model.safetensors, adapter_model.safetensors, ...)")
    return missing


def newest_complete_checkpoint(output_dir: Path) -> str | None:
    """The `checkpoint-N` in output_dir with the highest N that is complete; incomplete ones
    (a run killed while writing them) are skipped with a warning naming what they lack."""
    found = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    for _, folder in sorted(found, reverse=True):
        missing = checkpoint_missing(folder)
        if not missing:
            return str(folder)
        log.warning(
            "skipping incomplete checkpoint %s (it lacks %s; a run was probably killed while "
            "writing it)",
            folder,
            " and ".join(missing),
        )
    return None


def resume_checkpoint(config: NewtuneConfig) -> str | None:
    """The checkpoint to resume from: `resume_from_checkpoint`, or the newest complete one in
    output_dir with `auto_resume_from_checkpoints`; None to start fresh."""
    if config.resume_from_checkpoint:
        folder = Path(config.resume_from_checkpoint)
        if not folder.is_dir():
            raise ConfigError(
                f"`resume_from_checkpoint: {config.resume_from_checkpoint}` is not a folder; "
                f"point it at a `{PREFIX_CHECKPOINT_DIR}-N` folder a previous run wrote into its "
                "output_dir, or remove the key to start from the base model"
            )
        missing = checkpoint_missing(folder)
        if missing:
            raise ConfigError(
                f"`resume_from_checkpoint: {folder}` is not a complete training checkpoint: it "
                f"lacks {' and '.join(missing)} (a run killed while writing it leaves such a "
                f"folder). Point it at a complete `{PREFIX_CHECKPOINT_DIR}-N` folder from "
                "output_dir (an earlier one), or remove the key to start from the base model"
            )
        return str(folder)
    out = Path(config.output_dir)
    if config.auto_resume_from_checkpoints and out.is_dir():
        last = newest_complete_checkpoint(out)
        if last is not None:
            log.info("auto_resume_from_checkpoints: resuming from %s", last)
            return last
        log.info(
            "auto_resume_from_checkpoints: no complete checkpoint in %s; starting fresh",
            config.output_dir,
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
