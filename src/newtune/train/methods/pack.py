"""Preference batches: the sequences of a micro-batch of pairs, padded one per row or packed.

A preference row (TRL 1.x columns `prompt_ids`, `chosen_ids`, `rejected_ids`) gives two
sequences, prompt+chosen and prompt+rejected, whose completion tokens are trained. Sequences are
numbered as TRL's DataCollatorForPreference stacks them: every row's chosen sequence, then every
row's rejected one, so `SequenceStats.halves()` splits them into chosen and rejected.

Packed, the sequences of one micro-batch share rows: best-fit decreasing into rows of `capacity`
tokens, `position_ids` restarting at 0 for each sequence (no attention mask: transformers isolates
the sequences from the restarting positions), each sequence's first label -100, and
`sequence_index` naming the original sequence of every segment (-1 for padding).

Packed with a shared prompt (`pack_shared_pairs`, under sdpa/eager), a pair is one unit
`prompt | chosen | prompt[-1] | rejected`: the prompt runs once for both completions. A 4-D
attention mask keeps the rejected part from seeing the chosen one, the repeated last prompt
token (position len(prompt) - 1, attending to the prompt and itself) predicts the first rejected
token (the rejected part sees the prompt through it and the prompt's first len - 1 tokens),
and `label_sequence` names the sequence each trained label belongs to. Every token sees
exactly what it sees in its own unpacked sequence, so the per-sequence log-probs, the loss and
the gradients are those of the unshared layout (the prompt's gradient is the sum over its two
completions either way); only LoRA dropout draws one mask for the prompt instead of two.
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


def _packed_rows(
    lengths: np.ndarray, capacity: int, pad_to_capacity: bool, pad_id: int
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best-fit bins of `lengths` and their empty `input_ids`, `labels`, `position_ids`."""
    bins = pack(lengths, capacity).as_lists()
    width = capacity if pad_to_capacity else max(int(lengths[b].sum()) for b in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    return bins, ids, labels, positions


def pack_sequences(
    sequences: Sequence[Scored], pad_id: int, capacity: int, pad_to_capacity: bool = False
) -> dict[str, torch.Tensor]:
    """Sequences packed into rows of at most `capacity` tokens (best-fit decreasing).

    Returns `input_ids`, `labels`, `position_ids` ([rows, width]) and `sequence_index`
    ([segments], row-major; -1 marks a row's trailing padding).
    """
    lengths = np.array([len(ids) for ids, _ in sequences], dtype=np.int64)
    bins, ids, labels, positions = _packed_rows(lengths, capacity, pad_to_capacity, pad_id)
    width = ids.shape[1]
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


Unit = tuple[list[int], list[int], list[int], list[int], int, int]


def _shared_unit(row: dict[str, Any]) -> Unit:
    """(ids, positions, labels, owner, p, split) of one pair: owner 0 = chosen target, 1 =
    rejected target, -1 untrained; the rejected part from `split` on never sees [p - 1, split)."""
    prompt, chosen, rejected = (list(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    p, c = len(prompt), len(chosen)
    if p == 0:  # nothing to share: the rejected sequence starts over, its first token untrained
        bridge: list[int] = []
        rejected_positions = list(range(len(rejected)))
        rejected_labels = [IGNORE_INDEX, *rejected[1:]]
        rejected_owner = [-1] + [1] * (len(rejected) - 1)
        chosen_labels = [IGNORE_INDEX, *chosen[1:]]
        chosen_owner = [-1] + [0] * (c - 1)
    else:
        bridge = [prompt[-1]]
        rejected_positions = [p - 1, *range(p, p + len(rejected))]
        rejected_labels = [IGNORE_INDEX, *rejected]
        rejected_owner = [-1] + [1] * len(rejected)
        chosen_labels, chosen_owner = chosen, [0] * c
    ids = prompt + chosen + bridge + rejected
    positions = list(range(p + c)) + rejected_positions
    labels = [IGNORE_INDEX] * p + chosen_labels + rejected_labels
    owner = [-1] * p + chosen_owner + rejected_owner
    return ids, positions, labels, owner, p, p + c


def pack_shared_pairs(
    rows: Sequence[dict[str, Any]], pad_id: int, capacity: int, pad_to_capacity: bool = False
) -> dict[str, torch.Tensor]:
    """Pairs packed as `prompt | chosen | prompt[-1] | rejected` units (best-fit decreasing).

    Returns `input_ids`, `labels`, `position_ids`, `label_sequence` ([rows, width]: the
    sequence, numbered as `pair_sequences` orders them, whose target each label is; -1 for
    none), a boolean `attention_mask` [rows, 1, width, width] (True: may attend) and
    `sequence_index` (every sequence number, so that the batch counts as packed).
    """
    n = len(rows)
    units = [_shared_unit(r) for r in rows]
    lengths = np.array([len(u[0]) for u in units], dtype=np.int64)
    room = max(capacity, int(lengths.max()))
    bins, ids, labels, positions = _packed_rows(lengths, room, pad_to_capacity, pad_id)
    width = ids.shape[1]
    owner = torch.full((len(bins), width), -1, dtype=torch.long)
    mask = torch.zeros((len(bins), 1, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for row, members in enumerate(bins):
        at = 0
        for k in members:
            unit_ids, unit_pos, unit_labels, unit_owner, p, split = units[k]
            m = len(unit_ids)
            span = slice(at, at + m)
            ids[row, span] = torch.tensor(unit_ids)
            positions[row, span] = torch.tensor(unit_pos)
            labels[row, span] = torch.tensor(unit_labels)
            sides = torch.tensor(unit_owner)
            owner[row, span] = torch.where(sides < 0, -1, sides * n + k)
            block = causal[:m, :m].clone()
            # the rejected part sees neither the chosen one nor the last prompt token, which its
            # own copy (the bridge) stands in for
            block[split:, max(p - 1, 0) : split] = False
            mask[row, 0, span, span] = block
            at += m
        if at < width:  # trailing padding attends to itself only
            positions[row, at:] = torch.arange(width - at)
            mask[row, 0, at:, at:] = causal[: width - at, : width - at]
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "label_sequence": owner,
        "attention_mask": mask,
        "sequence_index": torch.arange(2 * n, dtype=torch.long),
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
