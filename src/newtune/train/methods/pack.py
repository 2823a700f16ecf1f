"""Preference batches: the sequences of a micro-batch of pairs, padded one per row or packed.

A preference row (TRL 1.x columns `prompt_ids`, `chosen_ids`, `rejected_ids`) gives two
sequences, prompt+chosen and prompt+rejected, whose completion tokens are trained. Sequences are
numbered as TRL's DataCollatorForPreference stacks them: every row's chosen sequence, then every
row's rejected one, so `SequenceStats.halves()` splits them into chosen and rejected.

Packed, the sequences of one micro-batch share rows: best-fit decreasing into rows of `capacity`
tokens, `position_ids` restarting at 0 for each sequence (no attention mask: transformers isolates
the sequences from the restarting positions), each sequence's first label -100, and
`sequence_index` naming the original sequence of every segment (-1 for padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from newtune.data.packing import pack
from newtune.train.methods.preference import IGNORE_INDEX

Scored = tuple[Sequence[int], int]  # (token ids, how many leading tokens are untrained)


def pair_sequences(rows: Sequence[dict[str, Any]]) -> list[Scored]:
    """prompt+chosen of every row, then prompt+rejected of every row, with the prompt length."""
    chosen = [(list(r["prompt_ids"]) + list(r["chosen_ids"]), len(r["prompt_ids"])) for r in rows]
    rejected = [
        (list(r["prompt_ids"]) + list(r["rejected_ids"]), len(r["prompt_ids"])) for r in rows
    ]
    return chosen + rejected


def _labels(ids: Sequence[int], untrained: int) -> list[int]:
    return [IGNORE_INDEX] * untrained + list(ids[untrained:])


def pad_sequences(
    sequences: Sequence[Scored], pad_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """One right-padded row per sequence: `input_ids`, `attention_mask`, `labels` (-100 untrained)."""
    width = max(max(len(ids) for ids, _ in sequences), pad_to or 0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (seq, untrained) in enumerate(sequences):
        n = len(seq)
        ids[row, :n] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, :n] = 1
        labels[row, :n] = torch.as_tensor(_labels(seq, untrained), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_sequences(
    sequences: Sequence[Scored], pad_id: int, capacity: int, pad_to_capacity: bool = False
) -> dict[str, torch.Tensor]:
    """Sequences packed into rows of at most `capacity` tokens (best-fit decreasing).

    Returns `input_ids`, `labels`, `position_ids` ([rows, width]) and `sequence_index`
    ([segments], row-major; -1 marks a row's trailing padding).
    """
    lengths = np.array([len(ids) for ids, _ in sequences], dtype=np.int64)
    bins = pack(lengths, capacity).as_lists()
    used = [int(lengths[b].sum()) for b in bins]
    width = capacity if pad_to_capacity else max(used)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    order: list[int] = []
    for row, members in enumerate(bins):
        at = 0
        for index in members:
            seq, untrained = sequences[index]
            n = len(seq)
            ids[row, at : at + n] = torch.as_tensor(list(seq), dtype=torch.long)
            row_labels = _labels(seq, max(untrained, 1))  # the first token is never predicted
            labels[row, at : at + n] = torch.as_tensor(row_labels, dtype=torch.long)
            positions[row, at : at + n] = torch.arange(n)
            order.append(index)
            at += n
        if at < width:
            positions[row, at:] = torch.arange(width - at)
            order.append(-1)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "sequence_index": torch.tensor(order, dtype=torch.long),
    }


def _ref_logps(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Precomputed reference log-probs carried by the rows, if any."""
    out = {}
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in rows[0]:
            out[key] = torch.tensor([float(r[key]) for r in rows], dtype=torch.float32)
    return out


@dataclass
class PairPadCollator:
    """Padded pair batches, the layout of TRL's DataCollatorForPreference (labels for mask)."""

    pad_id: int
    pad_to: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """[chosen..., rejected...] rows, right-padded, with any reference log-probs."""
        return {**pad_sequences(pair_sequences(rows), self.pad_id, self.pad_to), **_ref_logps(rows)}


@dataclass
class PairPackCollator:
    """Packed pair batches: both sequences of every pair of the micro-batch, packed together."""

    pad_id: int
    capacity: int
    pad_to_capacity: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Packed rows with `sequence_index`, and any reference log-probs."""
        packed = pack_sequences(
            pair_sequences(rows), self.pad_id, self.capacity, self.pad_to_capacity
        )
        return {**packed, **_ref_logps(rows)}
