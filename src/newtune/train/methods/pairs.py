"""Collators for preference batches, padded or packed (layouts from `methods.pack`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from newtune.train.methods.pack import (
    Scored,
    pack_sequences,
    pack_shared_pairs,
    pad_sequences,
    pair_sequences,
)


def layout(
    sequences: Sequence[Scored], pad_id: int, capacity: int | None, pad_to: int | None
) -> dict[str, torch.Tensor]:
    """One padded row per sequence, or (with `capacity`) sequences packed into rows."""
    if capacity is None:
        return pad_sequences(sequences, pad_id, pad_to)
    longest = max(len(ids) for ids, _ in sequences)
    room = max(capacity, longest)
    return pack_sequences(sequences, pad_id, room, pad_to_capacity=pad_to is not None)


def float_column(rows: Sequence[dict[str, Any]], key: str) -> torch.Tensor:
    """A float column of the rows as a tensor."""
    return torch.tensor([float(r[key]) for r in rows], dtype=torch.float32)


def carried(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The float columns (precomputed reference log-probs, margins) the rows carry."""
    return {key: float_column(rows, key) for key in keys if key in rows[0]}


@dataclass
class PairCollator:
    """[prompt+chosen..., prompt+rejected...] of a micro-batch of pairs, padded or packed.

    `full_labels` adds `nll_labels`: the same sequences with the prompt trained too (ORPO's
    NLL term). Precomputed reference log-probs pass through. `share_prompt` (packed only,
    without `full_labels`) packs each pair as one shared-prompt unit (`pack_shared_pairs`).
    """

    pad_id: int
    capacity: int | None = None
    pad_to: int | None = None
    full_labels: bool = False
    carry: tuple[str, ...] = ("ref_chosen_logps", "ref_rejected_logps")
    share_prompt: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The collated batch."""
        if self.share_prompt and self.capacity is not None and not self.full_labels:
            shared = pack_shared_pairs(rows, self.pad_id, self.capacity, self.pad_to is not None)
            return {**shared, **carried(rows, self.carry)}
        sequences = pair_sequences(rows)
        batch = layout(sequences, self.pad_id, self.capacity, self.pad_to)
        if self.full_labels:
            whole = [(ids, 0) for ids, _ in sequences]
            batch["nll_labels"] = layout(whole, self.pad_id, self.capacity, self.pad_to)["labels"]
        return {**batch, **carried(rows, self.carry)}
