"""Batch collation: padded rows, or packed rows whose samples cannot see each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from newtune.data.tokenize import IGNORE_INDEX


def _width(longest: int, pad_to: int | None) -> int:
    return max(longest, pad_to or 0)


@dataclass
class PadCollator:
    """Pads `input_ids` with `pad_id`, `labels` with -100 and `attention_mask` with 0.

    `pad_to` fixes the width (`pad_to_sequence_len`); otherwise rows pad to the longest.
    """

    pad_id: int
    pad_to: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = _width(max(len(r["input_ids"]) for r in rows), self.pad_to)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor(
                [list(r[key]) + [value] * (width - len(r[key])) for r in rows], dtype=torch.long
            )

        return {
            "input_ids": pad("input_ids", self.pad_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
        }


@dataclass
class PackedCollator:
    """One row per bin: its samples concatenated, `position_ids` restarting at 0 for each.

    No attention mask is returned: transformers reads sample boundaries from the restarting
    `position_ids` (flash-attention varlen, or a block-diagonal causal mask under sdpa/eager),
    so no sample attends to another. Each sample's first label is -100, so no sample's first
    token is predicted from the previous sample: the loss counts exactly the tokens it counts
    unpacked. Padding (to the longest row, or to `pad_to`) is a sample of its own with
    labels -100.
    """

    pad_id: int
    pad_to: int | None = None

    def __call__(self, bins: list[list[dict[str, Any]]]) -> dict[str, torch.Tensor]:
        lengths = [sum(len(s["input_ids"]) for s in b) for b in bins]
        width = _width(max(lengths), self.pad_to)
        ids = torch.full((len(bins), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(bins), width), dtype=torch.long)
        for row, samples in enumerate(bins):
            at = 0
            for sample in samples:
                n = len(sample["input_ids"])
                ids[row, at : at + n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
                labels[row, at + 1 : at + n] = torch.as_tensor(
                    sample["labels"][1:], dtype=torch.long
                )
                positions[row, at : at + n] = torch.arange(n)
                at += n
            positions[row, at:] = torch.arange(width - at)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


class BinDataset(torch.utils.data.Dataset):
    """A map-style view whose batches are lists of bins: one bulk read per batch."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[index]

    def __getitems__(self, bins: list[list[int]]) -> list[list[dict[str, Any]]]:
        flat = [i for b in bins for i in b]
        columns = self.dataset.select_columns(["input_ids", "labels"])[flat]
        rows = [
            {"input_ids": ids, "labels": lab}
            for ids, lab in zip(columns["input_ids"], columns["labels"], strict=True)
        ]
        out, at = [], 0
        for b in bins:
            out.append(rows[at : at + len(b)])
            at += len(b)
        return out
