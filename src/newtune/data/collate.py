"""Batch collation: right-pad to the longest row; padded labels are ignored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from newtune.data.tokenize import IGNORE_INDEX


@dataclass
class PadCollator:
    """Pads `input_ids` with `pad_id`, `labels` with -100 and `attention_mask` with 0."""

    pad_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor(
                [list(r[key]) + [value] * (width - len(r[key])) for r in rows], dtype=torch.long
            )

        return {
            "input_ids": pad("input_ids", self.pad_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
        }
