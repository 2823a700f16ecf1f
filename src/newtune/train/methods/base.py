"""What every training method provides, and the pieces preference methods share.

A `Method` names its prepared row columns, builds its collator (padded or packed), computes
its loss and metrics from a batch, and lists the metric names it logs. `train.run`,
`train.evaluate`, `StepTrainer` and the CLI ask the method; nothing else looks at `rl`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from newtune.errors import DataError
from newtune.train.methods.preference import (
    IGNORE_INDEX,
    SequenceStats,
    labelled_sequence_logps,
    packed_segments,
    packed_sequence_logps,
    segment_logps,
    sequence_logps,
)
from newtune.train.trainer import head_can_skip

Metrics = dict[str, torch.Tensor]
Collator = Callable[[list[dict[str, Any]]], dict[str, Any]]


class Method:
    """A training method: row schema, collator, loss and metrics (subclasses fill these in)."""

    name: str = "sft"
    columns: tuple[str, ...] = ("input_ids", "labels")
    metric_names: tuple[str, ...] = ()
    needs_reference: bool = False
    sequence_classification: bool = False
    ref_columns: tuple[str, ...] = ()  # precomputed reference log-prob columns
    rows: Metrics | None = None  # a dict here gets the next loss's per-row values (keep_rows)

    @property
    def is_preference(self) -> bool:
        """True for every method but SFT."""
        return self.name != "sft"

    def describe(self) -> str:
        """How the config named this method, for messages (e.g. `rl: dpo`)."""
        return self.name

    def check_data(self, data: Any) -> None:
        """Refuse prepared rows this method cannot train on (SFT rows for `rl:`, and the reverse)."""
        for split, ds in data.items():
            missing = [c for c in self.columns if c not in ds.column_names]
            if missing:
                raise DataError(self._wrong_rows(split, ds.column_names, missing))

    def _wrong_rows(self, split: str, present: list[str], missing: list[str]) -> str:
        have = ", ".join(c for c in present if not c.startswith("_")) or "none"
        if self.is_preference:
            return (
                f"`{self.describe()}` trains on preference rows with the columns "
                f"{', '.join(self.columns)}, but the prepared `{split}` split has {have} "
                f"(missing {', '.join(missing)}): its datasets are SFT formats. Give each "
                "entry of `datasets` a preference `type` (for example `chat_template.default`, "
                "`chatml.intel` or `preference`), or remove `rl`/`reward_model` to train SFT."
            )
        return (
            f"SFT trains on rows with the columns {', '.join(self.columns)}, but the prepared "
            f"`{split}` split has {have}: its datasets are preference formats. Set `rl` (dpo, "
            "ipo, simpo, orpo, kto) or `reward_model: true` to train on them, or use SFT "
            "dataset types."
        )

    def prepare_rows(self, ds: Any, micro_batch_size: int) -> Any:
        """Columns derived from the prepared rows before training (none by default)."""
        return ds

    def lengths(self, ds: Any) -> list[int]:
        """Tokens of each row as a batch holds it (for `group_by_length`)."""
        return [len(ids) for ids in ds["input_ids"]]


# -- forward passes ---------------------------------------------------------------------------


def is_packed(batch: dict[str, Any]) -> bool:
    """True for a packed batch (several sequences per row)."""
    return "sequence_index" in batch


def num_sequences(batch: dict[str, Any]) -> int:
    """How many sequences a padded or packed batch holds."""
    if is_packed(batch):
        return int((batch["sequence_index"] >= 0).sum())
    return int(batch["input_ids"].shape[0])


def model_inputs(batch: dict[str, Any], model: Any = None) -> dict[str, Any]:
    """What the model reads: ids and the attention mask, the restarting positions, or both.

    Packed rows carry no mask (transformers isolates sequences from the positions), except the
    shared-prompt layout's 4-D boolean mask, which eager attention gets as an additive one.
    """
    if not is_packed(batch):
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    mask = batch.get("attention_mask")
    if mask is not None:
        config = getattr(unwrap(model), "config", None)
        if getattr(config, "_attn_implementation", "sdpa") == "eager":
            dtype = unwrap(model).get_input_embeddings().weight.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        inputs["attention_mask"] = mask
    return inputs


def mask_attention(model: Any, attention: str | None) -> str | None:
    """`attention`, or None where a custom 4-D mask would not be exact (no shared prompts):
    models with sliding-window, chunked or non-attention layers, which transformers would
    otherwise run under the one full causal mask given."""
    config = getattr(unwrap(model), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if types:
        local = any(t != "full_attention" for t in types)
    else:
        keys = ("sliding_window", "attention_chunk_size")
        local = any(getattr(text, key, None) is not None for key in keys)
    return None if local else attention


ATTENTION_LAYERS = ("full_attention", "sliding_attention", "chunked_attention")


def mask_readers(model: Any) -> tuple[Any, list[str], bool]:
    """For methods that replace the causal mask by their own 4-D mask: the text config, the
    layer kinds that do not read a mask (linear attention, state-space, ...) and whether some
    layers are windowed or chunked (they then run under the whole mask, window not applied)."""
    config = unwrap(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = list(getattr(text, "layer_types", None) or [])
    other = sorted({t for t in types if t not in ATTENTION_LAYERS})
    local = any(t != "full_attention" for t in types) or any(
        getattr(text, key, None) for key in ("sliding_window", "attention_chunk_size")
    )
    return text, other, local


def forward_stats(
    model: Any, batch: dict[str, Any], labels: str = "labels", extras: bool = True
) -> SequenceStats:
    """Per-sequence log-prob stats of a padded or packed batch, in the collator's order.

    When the model takes a `logits_to_keep` mask, the output head runs only at the positions
    that predict a trained token (prompts and padding skip the vocabulary projection).
    """
    inputs = model_inputs(batch, model)
    if not head_can_skip(unwrap(model)):
        logits = model(**inputs, use_cache=False).logits
        return stats_of(logits, batch, labels, extras)
    targets = batch[labels][:, 1:]
    keep = targets != IGNORE_INDEX
    positions = torch.nn.functional.pad(keep, (0, 1), value=False)  # p predicts label p + 1
    logits = model(**inputs, logits_to_keep=positions, use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1])
    if "label_sequence" in batch:  # shared prompts: each label names its sequence
        index = batch["label_sequence"].to(targets.device)
    elif is_packed(batch):
        position_ids = batch["position_ids"]
        if (batch[labels][position_ids == 0] != IGNORE_INDEX).any():
            raise ValueError("a packed sequence's first label must be -100")
        index = batch["sequence_index"].to(targets.device)[packed_segments(position_ids)]
    else:
        rows = torch.arange(targets.shape[0], device=targets.device)
        index = rows.unsqueeze(1).expand(-1, targets.shape[1] + 1)
    sequence = index[:, 1:][keep]
    if (sequence < 0).any():
        raise ValueError("a padding segment has trained labels")
    return segment_logps(logits, targets[keep], sequence, num_sequences(batch), extras=extras)


def stats_of(
    logits: torch.Tensor, batch: dict[str, Any], labels: str = "labels", extras: bool = True
) -> SequenceStats:
    """Per-sequence stats from logits already computed for the batch."""
    if "label_sequence" in batch:
        return labelled_sequence_logps(
            logits, batch[labels], batch["label_sequence"], num_sequences(batch), extras=extras
        )
    if is_packed(batch):
        return packed_sequence_logps(
            logits,
            batch[labels],
            batch["position_ids"],
            batch["sequence_index"],
            num_sequences(batch),
            extras=extras,
        )
    return sequence_logps(logits, batch[labels], extras=extras)


def unwrap(model: Any) -> Any:
    """The model inside DDP/DeepSpeed wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


# -- reference model --------------------------------------------------------------------------


class Reference:
    """Where reference log-probs come from: the policy with its LoRA adapter disabled, a frozen
    copy of the base, or columns precomputed once and carried by the batch."""

    def __init__(self, kind: str, model: Any = None) -> None:
        if kind not in ("adapter", "model", "precomputed", "none"):
            raise ValueError(f"unknown reference kind {kind!r}")
        self.kind, self.model = kind, model

    @contextlib.contextmanager
    def scoring(self, policy: Any) -> Iterator[Any]:
        """The module that scores as the reference, without gradients."""
        with torch.no_grad():
            if self.kind == "adapter":
                inner = unwrap(policy)
                # FSDP gathers the shards in its own forward: run through the wrapper there;
                # DDP/DeepSpeed hold whole weights, so the inner model runs without collectives
                sharded = "FullyShardedDataParallel" in type(policy).__name__
                with inner.disable_adapter():
                    yield policy if sharded else inner
            elif self.kind == "model":
                yield self.model
            else:
                raise ValueError(f"a {self.kind} reference has no model to run")

    def to(self, device: Any) -> Reference:
        """Move a frozen copy to `device` (the others live with the policy)."""
        if self.kind == "model":
            self.model.to(device)
        return self


# -- metrics over logging intervals and ranks -----------------------------------------------


class MetricLog:
    """Per-micro-batch metric values, averaged at log time over the interval and the ranks."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.sums = dict.fromkeys(names, 0.0)
        self.counts = dict.fromkeys(names, 0)

    def add(self, metrics: Metrics, weight: float = 1.0) -> None:
        """Record one batch's metrics (`weight`: how much this batch counts)."""
        for name in self.names:
            if name in metrics:
                self.sums[name] += float(metrics[name]) * weight
                self.counts[name] += weight

    def pop(self, device: Any = None) -> dict[str, float]:
        """Means since the last pop, over every rank; names no batch had are left out."""
        values = torch.tensor(
            [[self.sums[n], float(self.counts[n])] for n in self.names],
            dtype=torch.float64,
            device=device,
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)
        self.sums = dict.fromkeys(self.names, 0.0)
        self.counts = dict.fromkeys(self.names, 0)
        return {
            n: float(values[i, 0] / values[i, 1])
            for i, n in enumerate(self.names)
            if values[i, 1] > 0
        }


def evaluate_batches(
    method: Any, model: Any, reference: Reference, batches: Any, device: Any
) -> dict[str, float]:
    """Mean loss and metrics over batches (each batch weighted by its rows), across ranks."""
    log = MetricLog(("loss", *method.metric_names))
    was_training = model.training
    model.eval()
    rows = 0
    with torch.no_grad():
        for batch in batches:
            batch = to_device(batch, device)
            loss, metrics = method.loss(model, batch, reference)
            n = method.batch_rows(batch)
            rows += n
            log.add({"loss": loss, **metrics}, n)
    model.train(was_training)
    out = log.pop(device)
    if "loss" not in out:
        raise DataError("the evaluated split has no rows")
    return out


def to_device(batch: Any, device: Any) -> Any:
    """A batch (nested mappings of tensors) on `device`."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch
