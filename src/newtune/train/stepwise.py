"""A step-wise trainer for iterative SFT: one optimizer step per call, on texts or tensors.

What TRL's former IterativeSFTTrainer offered: the caller does its own work between steps
(generate, score, filter) and hands each step its batch. The model, adapter, optimizer and
schedule come from the config exactly as `newtune train` builds them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers.integrations.neftune import activate_neftune

from newtune.config.given import ConfigLike, load_given
from newtune.config.resolve import resolve
from newtune.data.collate import PadCollator
from newtune.data.strategies.base import Segment, Segments
from newtune.data.tokenize import IGNORE_INDEX, Engine
from newtune.errors import ConfigError
from newtune.fileio import atomic_dir
from newtune.models.tokenizer import load_tokenizer
from newtune.train.args import build_training_args, schedule_for
from newtune.train.eaft import loss_func
from newtune.train.kernels import fused_head
from newtune.train.methods import method_for
from newtune.train.precision import tf32_scope
from newtune.train.run import CONFIG_FILE, training_model, write_model_files
from newtune.train.trainer import NewtuneTrainer

log = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_start", "keep_end")
HORIZON_FREE = ("constant", "constant_with_warmup")  # schedules that need no step count
SAVE_MARKERS = ("config.json", "adapter_config.json", CONFIG_FILE)

Row = dict[str, list[int]]


def _bad(message: str) -> ConfigError:
    return ConfigError(f"StepTrainer.step: {message}")


def _int_rows(value: Any, name: str, mask: bool = False) -> list[list[int]]:
    """A 2-D tensor/array or a list of 1-D rows (tensors or int lists) as lists of ints.

    With `mask`, any numbers or booleans are read as 1 (attend) or 0 (padding).
    """
    if hasattr(value, "tolist") and not isinstance(value, list):
        dim = value.dim() if isinstance(value, torch.Tensor) else getattr(value, "ndim", None)
        if dim != 2:
            raise _bad(
                f"`{name}` must be 2-D (batch, length) or a list of 1-D rows, but it has "
                f"{dim} dimension(s); wrap a single sequence in a list."
            )
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise _bad(f"`{name}` must be a tensor or a list of rows, not {type(value).__name__}.")
    kinds = int | float | bool if mask else int
    rows = []
    for i, row in enumerate(value):
        row = row.tolist() if hasattr(row, "tolist") else row
        if not isinstance(row, list | tuple) or not all(isinstance(x, kinds) for x in row):
            what = "numbers" if mask else "integers"
            raise _bad(f"`{name}` row {i} is not a sequence of {what}.")
        rows.append([int(x != 0) if mask else int(x) for x in row])
    return rows


def _real_span(mask: list[int], i: int) -> tuple[int, int]:
    """The one contiguous run of attention_mask 1s in row i (its padding is on either side)."""
    ones = [j for j, m in enumerate(mask) if m]
    if not ones:
        raise _bad(f"row {i} has no token with attention_mask 1; drop the row.")
    start, stop = ones[0], ones[-1] + 1
    if len(ones) != stop - start:
        raise _bad(
            f"row {i}'s attention_mask has zeros between its ones; only padding (zeros at the "
            "start or the end of a row) can be masked. Mask tokens from the loss with "
            "labels -100 instead."
        )
    return start, stop


class StepTrainer:
    """Trains one optimizer step per `.step(...)` call with the config's model and optimizer.

    `truncation_mode`: rows longer than `sequence_len` keep their first (`keep_start`) or
    last (`keep_end`, the default) `sequence_len` tokens.
    """

    def __init__(
        self, config: ConfigLike, truncation_mode: str = "keep_end", **overrides: Any
    ) -> None:
        if truncation_mode not in TRUNCATION_MODES:
            raise ConfigError(
                f"StepTrainer: truncation_mode `{truncation_mode}` is not one of "
                f"{', '.join(TRUNCATION_MODES)}; `keep_end` keeps a long row's last tokens."
            )
        self.truncation_mode = truncation_mode
        self.loaded = load_given(config, **overrides)
        self.config = cfg = self.loaded.config
        method = method_for(cfg)
        if method.name == "diffusion":
            raise ConfigError(
                "StepTrainer trains next-token SFT steps, but the config lists DiffusionPlugin "
                "(masked-diffusion training); use `newtune train` (or newtune.train) for it, or "
                "remove the plugin from the config given to StepTrainer."
            )
        if method.is_preference:
            raise ConfigError(
                f"StepTrainer trains SFT steps only, but the config sets `{method.describe()}`. "
                "Use `newtune train` (or newtune.train) for preference and reward training, or "
                "remove `rl`/`reward_model` from the config given to StepTrainer."
            )
        self.plan = resolve(cfg)
        if self.plan.world_size > 1:
            raise ConfigError(
                f"StepTrainer runs in one process, but WORLD_SIZE is {self.plan.world_size}; "
                "run it without a launcher, or use `newtune train` for multi-process training."
            )
        self.tokenizer, new_ids = load_tokenizer(cfg)
        with tf32_scope(cfg.tf32):  # torch's switches are the caller's again after each call
            model = training_model(cfg, self.plan, self.tokenizer, new_ids)
            self._trainer = NewtuneTrainer(
                model=model,
                args=build_training_args(cfg, self.plan, has_eval=False),
                processing_class=self.tokenizer,
                schedule=schedule_for(cfg),
                fused_head=fused_head(cfg),
                compute_loss_func=loss_func(cfg),  # use_eaft
            )
            self._model = self._prepare()
        pad_to = cfg.sequence_len if cfg.pad_to_sequence_len else None
        self._collate = PadCollator(self.tokenizer.pad_token_id, pad_to)
        self._engine = Engine(self.tokenizer)
        self.global_step = 0

    def _prepare(self) -> Any:
        """Optimizer, device/precision wrapping and schedule, in the order Trainer.train uses."""
        trainer, args = self._trainer, self._trainer.args
        scheduler = args.lr_scheduler_type.value
        ratio_warmup = 0 < args.warmup_steps < 1
        needs_horizon = self._trainer.schedule is not None or scheduler not in HORIZON_FREE
        if self.config.max_steps is None and (needs_horizon or ratio_warmup):
            why = (
                "`warmup_ratio`" if ratio_warmup else f"`lr_scheduler: {self.config.lr_scheduler}`"
            )
            raise ConfigError(
                f"StepTrainer: {why} needs the number of optimizer steps; set `max_steps` to the "
                "number of .step() calls you plan, or use `lr_scheduler: constant`."
            )
        trainer.create_optimizer()
        model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.create_scheduler(num_training_steps=self.config.max_steps or 1)
        if scheduler in ("reduce_lr_on_plateau", "greedy"):
            raise ConfigError(
                f"StepTrainer: `lr_scheduler: {self.config.lr_scheduler}` steps on eval metrics, "
                "which step() does not compute; choose a step-based scheduler."
            )
        if args.neftune_noise_alpha is not None:
            trainer.neftune_hook_handle = activate_neftune(
                trainer.model, args.neftune_noise_alpha, trainer.accelerator
            )
        return model

    @property
    def model(self) -> Any:
        """The model being trained (a peft model with `adapter: lora|qlora`)."""
        return self._trainer.model

    @property
    def optimizer(self) -> Any:
        """The optimizer the config names."""
        return self._trainer.optimizer

    @property
    def lr_scheduler(self) -> Any:
        """The learning-rate scheduler the config names."""
        return self._trainer.lr_scheduler

    # -- inputs -----------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> list[Row]:
        """Rows of texts as completion data: BOS + text + EOS, every token trained, truncated."""
        if isinstance(texts, str) or not isinstance(texts, list | tuple):
            raise _bad("`texts` must be a list of strings; wrap a single text in a list.")
        if not all(isinstance(t, str) for t in texts):
            raise _bad("every item of `texts` must be a string.")
        samples = [Segments((Segment(t, True),), bos=True, eos=True) for t in texts]
        rows = [r[0] for r in self._engine.tokenize_many(samples)]
        return [self._truncate(r.input_ids, [1] * len(r.input_ids), r.labels) for r in rows]

    def _truncate(self, ids: list[int], mask: list[int], labels: list[int]) -> Row:
        n = self.config.sequence_len
        cut = slice(0, n) if self.truncation_mode == "keep_start" else slice(-n, None)
        if len(ids) > n:
            ids, mask, labels = ids[cut], mask[cut], labels[cut]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _tensor_rows(self, input_ids: Any, attention_mask: Any, labels: Any) -> list[Row]:
        ids = _int_rows(input_ids, "input_ids")
        masks = (
            _int_rows(attention_mask, "attention_mask", mask=True)
            if attention_mask is not None
            else None
        )
        labs = _int_rows(labels, "labels") if labels is not None else None
        for name, other in (("attention_mask", masks), ("labels", labs)):
            if other is None:
                continue
            if len(other) != len(ids) or any(
                len(a) != len(b) for a, b in zip(ids, other, strict=True)
            ):
                shape = [len(r) for r in other]
                raise _bad(
                    f"`{name}` must have the shape of `input_ids`: row lengths "
                    f"{[len(r) for r in ids]} vs {shape}."
                )
        vocab = self.model.get_input_embeddings().num_embeddings
        rows = []
        for i, row in enumerate(ids):
            bad = [t for t in row if not 0 <= t < vocab]
            if bad:
                raise _bad(f"`input_ids` row {i} has token id {bad[0]}, outside 0..{vocab - 1}.")
            start, stop = _real_span(masks[i], i) if masks is not None else (0, len(row))
            label_row = labs[i] if labs is not None else row
            rows.append(
                self._truncate(row[start:stop], [1] * (stop - start), label_row[start:stop])
            )
        return rows

    def _rows(self, texts: Any, input_ids: Any, attention_mask: Any, labels: Any) -> list[Row]:
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        given = [k for k, v in tensors.items() if v is not None]
        if texts is not None and given:
            raise _bad(
                f"pass either `texts` or `input_ids` (with optional attention_mask/labels), not "
                f"both: `texts` and `{given[0]}` were given."
            )
        if texts is None and input_ids is None:
            what = f"`{given[0]}` alone is not a batch: " if given else ""
            raise _bad(f"{what}pass `texts=[...]` or `input_ids=...` (a batch to train on).")
        rows = self.tokenize(texts) if texts is not None else self._tensor_rows(**tensors)
        if not rows:
            raise _bad("the batch is empty; pass at least one text or row.")
        return rows

    # -- training ---------------------------------------------------------------------------

    def step(
        self,
        texts: list[str] | None = None,
        *,
        input_ids: Any = None,
        attention_mask: Any = None,
        labels: Any = None,
    ) -> dict[str, float | int]:
        """One optimizer step on the batch; returns loss, trained tokens, lr, grad norm, step."""
        rows = self._rows(texts, input_ids, attention_mask, labels)
        with tf32_scope(self.config.tf32):
            return self._step(rows)

    def _step(self, rows: list[Row]) -> dict[str, float | int]:
        """The optimizer step of `step` on rows already checked and truncated."""
        trained = sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in rows)
        if trained == 0:
            raise _bad(
                "no token of the batch is trained (every label after the first position is "
                "-100), so there is no loss to step on; keep some labels."
            )
        max_steps = self.config.max_steps
        if max_steps is not None and self.global_step >= max_steps:
            raise ConfigError(
                f"StepTrainer: `max_steps: {max_steps}` steps are done and the learning-rate "
                "schedule has ended; create the StepTrainer with a larger `max_steps`."
            )
        trainer, args = self._trainer, self._trainer.args
        size = self.config.micro_batch_size
        micro = [self._collate(rows[i : i + size]) for i in range(0, len(rows), size)]
        trainer.current_gradient_accumulation_steps = len(micro)  # used only without token counts
        count = torch.tensor(trained, device=args.device)
        loss = torch.zeros((), device=args.device)
        self._model.train()
        for batch in micro:
            loss += trainer.training_step(self._model, batch, num_items_in_batch=count)
        limit = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
        grad_norm = trainer.accelerator.clip_grad_norm_(self._model.parameters(), limit)
        learning_rate = trainer.lr_scheduler.get_last_lr()[0]
        trainer.optimizer.step()
        if not trainer.accelerator.optimizer_step_was_skipped:
            trainer.lr_scheduler.step()
        self._model.zero_grad(set_to_none=True)
        self.global_step += 1
        trainer.state.global_step = self.global_step
        return {
            "loss": float(loss),
            "trained_tokens": trained,
            "learning_rate": float(learning_rate),
            "grad_norm": float(grad_norm),
            "step": self.global_step,
        }

    def generate(self, prompts: list[str], max_new_tokens: int = 64, **kwargs: Any) -> list[str]:
        """Completions of text prompts (BOS + prompt, as completion data); greedy by default."""
        if isinstance(prompts, str) or not prompts:
            raise ConfigError("StepTrainer.generate: pass a non-empty list of prompt strings.")
        samples = [Segments((Segment(p, False),), bos=True, eos=False) for p in prompts]
        rows = [r[0].input_ids for r in self._engine.tokenize_many(samples)]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self._device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        was_training = self._model.training
        self._model.eval()
        kwargs = {"do_sample": False, "use_cache": True, "pad_token_id": pad, **kwargs}
        try:
            with torch.no_grad(), tf32_scope(self.config.tf32):
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask.to(self._device),
                    max_new_tokens=max_new_tokens,
                    **kwargs,
                )
        finally:
            self._model.train(was_training)
        return self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)

    @property
    def _device(self) -> torch.device:
        return self._trainer.args.device

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the model (or adapter), tokenizer and config to a temp folder, then rename it."""
        out = Path(directory)
        if out.exists() and (
            not out.is_dir()
            or (any(out.iterdir()) and not any((out / m).is_file() for m in SAVE_MARKERS))
        ):
            raise ConfigError(
                f"StepTrainer.save: {out} exists and is not a saved model; pass a new folder "
                "(or one written by a previous save, which is replaced)."
            )
        model = self._trainer.accelerator.unwrap_model(self._model)
        with atomic_dir(out) as tmp:  # a temp folder beside `out`, renamed over it when whole
            write_model_files(tmp, model, self.tokenizer, self.config)
        log.info("saved step %s to %s", self.global_step, out)
        return out
