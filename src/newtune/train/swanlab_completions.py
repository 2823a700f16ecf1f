"""SwanLab completion table (`swanlab_log_completions`): the preference rows trained on.

Axolotl's SwanLab plugin documents a table `rlhf_completions` for DPO/KTO/ORPO training: each
row a prompt with its chosen and rejected completions (KTO: its completion and label) and the
rewards the loss computed, logged every `swanlab_completion_log_interval` steps from a buffer
holding the newest `swanlab_completion_max_buffer` rows, the rest logged when training ends.

Here the rows are the micro-batches actually trained on. The train split gets a row-number
column that `RowNumberCollator` turns into a batch tensor; `PreferenceTrainer.compute_loss`
hands each training batch and the loss's per-row values (`preference.keep_rows`: rewards,
log-probs, ORPO's log-odds) to `CompletionTableCallback.record`; the buffer keeps row numbers
and values, and the texts (the row's token ids decoded, special tokens kept: exactly what the
model saw) are decoded only when a table is logged. Only rank 0 records: swanlab runs there.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from transformers import TrainerCallback

from newtune.config.compat2 import swanlab_completions
from newtune.config.schema import NewtuneConfig

log = logging.getLogger(__name__)

TABLE = "rlhf_completions"
ROW_COLUMN = "_completion_row"  # train split column: the row's number
ROW_KEY = "completion_row"  # batch key: the row numbers of the batch
DEFAULT_INTERVAL = 100  # Axolotl's defaults
DEFAULT_BUFFER = 128
PAIR_VALUES = ("reward_chosen", "reward_rejected", "logps_chosen", "logps_rejected")
ORPO_VALUES = ("log_odds_ratio", "log_odds_chosen")
KTO_VALUES = ("reward", "logps")


class RowNumberCollator:
    """The method's collator, plus the batch's row numbers under `completion_row`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The inner collator's batch with the rows' numbers."""
        import torch

        batch = self.inner(rows)
        batch[ROW_KEY] = torch.tensor([int(r[ROW_COLUMN]) for r in rows], dtype=torch.long)
        return batch


class CompletionTableCallback(TrainerCallback):
    """Buffers the trained rows (newest `max_buffer`) and logs them to SwanLab as a table
    every `interval` steps and at the end of training."""

    def __init__(
        self, dataset: Any, tokenizer: Any, unpaired: bool, interval: int, max_buffer: int
    ) -> None:
        self.dataset, self.tokenizer, self.unpaired = dataset, tokenizer, unpaired
        self.interval = interval
        self.buffer: deque[tuple[int, int, dict[str, float]]] = deque(maxlen=max_buffer)
        self.step = 1  # the optimizer step the next batches belong to
        self.last_logged = 0
        self.tables = 0  # tables logged so far

    def record(self, batch: dict[str, Any], values: dict[str, Any] | None) -> None:
        """Buffer a training batch's rows with their per-row values (PreferenceTrainer's sink)."""
        numbers = batch[ROW_KEY].tolist()
        values = values or {}
        for i, number in enumerate(numbers):
            row = {k: float(v[i]) for k, v in values.items() if i < len(v)}
            self.buffer.append((self.step, int(number), row))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The batches from now on belong to step global_step + 1."""
        self.step = state.global_step + 1

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Log a table once `interval` steps have passed since the last one."""
        if state.global_step - self.last_logged >= self.interval:
            self.flush(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Log the rows buffered since the last table."""
        self.flush(state.global_step)

    def headers(self) -> list[str]:
        """The table's columns (Axolotl's names, plus each side's reward and log-prob)."""
        if self.unpaired:
            return ["step", "prompt", "completion", "label", *KTO_VALUES]
        extra = [k for k in ORPO_VALUES if any(k in values for _, _, values in self.buffer)]
        return [
            "step",
            "prompt",
            "chosen",
            "rejected",
            "reward_chosen",
            "reward_rejected",
            "reward_diff",
            "logps_chosen",
            "logps_rejected",
            *extra,
        ]

    def table_rows(self, headers: list[str]) -> list[list[Any]]:
        """The buffered rows as table rows under `headers`, texts decoded from token ids."""
        out = []
        for step, number, values in self.buffer:
            data = self.dataset[number]
            prompt = self.decode(data["prompt_ids"])
            if self.unpaired:
                label = "desirable" if data["label"] else "undesirable"
                texts = [prompt, self.decode(data["completion_ids"]), label]
            else:
                texts = [prompt, self.decode(data["chosen_ids"]), self.decode(data["rejected_ids"])]
                if "reward_chosen" in values and "reward_rejected" in values:
                    values = {
                        **values,
                        "reward_diff": values["reward_chosen"] - values["reward_rejected"],
                    }
            out.append([step, *texts, *(values.get(h) for h in headers[len(texts) + 1 :])])
        return out

    def decode(self, ids: list[int]) -> str:
        """The text of token ids, special tokens (template markers, EOS) kept."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def flush(self, step: int) -> None:
        """Log the buffered rows as one table at `step` and empty the buffer."""
        if not self.buffer:
            return
        import swanlab

        if not _run_active(swanlab):
            log.warning("swanlab_log_completions: no active SwanLab run; the table is not logged")
        else:
            headers = self.headers()
            table = swanlab.echarts.Table().add(headers, self.table_rows(headers))
            swanlab.log({TABLE: table}, step=step)
            self.tables += 1
            log.info("logged %d rows to the SwanLab table %s", len(self.buffer), TABLE)
        self.buffer.clear()
        self.last_logged = step


def _run_active(swanlab: Any) -> bool:
    """A SwanLab run is active (swanlab >= 0.10 has `has_run`; its `get_run` raises without)."""
    if hasattr(swanlab, "has_run"):
        return bool(swanlab.has_run())
    try:
        return swanlab.get_run() is not None
    except RuntimeError:
        return False


def attach_completions(trainer: Any, config: NewtuneConfig, tokenizer: Any) -> None:
    """On rank 0 of a preference run with the completion table on: number the train rows,
    wrap the collator, and add the callback as the trainer's completion sink."""
    if not swanlab_completions(config) or not hasattr(trainer, "completion_sink"):
        return
    if not trainer.is_world_process_zero():
        return
    dataset = trainer.train_dataset
    if ROW_COLUMN not in dataset.column_names:
        dataset = dataset.add_column(ROW_COLUMN, list(range(len(dataset))))
    trainer.train_dataset = dataset
    trainer.data_collator = RowNumberCollator(trainer.data_collator)
    callback = CompletionTableCallback(
        dataset,
        tokenizer,
        unpaired=trainer.method.name == "kto",
        interval=config.swanlab_completion_log_interval or DEFAULT_INTERVAL,
        max_buffer=config.swanlab_completion_max_buffer or DEFAULT_BUFFER,
    )
    trainer.completion_sink = callback.record
    trainer.add_callback(callback)
