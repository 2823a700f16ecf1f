"""SFT: next-token loss on trained tokens (newtune's original method; Trainer computes it)."""

from __future__ import annotations

from typing import Any

from newtune.train.methods.base import Method


class SFTMethod(Method):
    """Rows `input_ids`/`labels`; the collators and loss of `train.trainer.NewtuneTrainer`."""

    name = "sft"
    columns = ("input_ids", "labels")

    def __init__(self, config: Any = None) -> None:
        pass
