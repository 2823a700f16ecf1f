"""Reward models: a sequence classifier (one score) trained with the Bradley-Terry loss."""

from __future__ import annotations

from typing import Any

import torch

from newtune.train.methods.base import (
    Method,
    Metrics,
    Reference,
    is_packed,
    model_inputs,
    num_sequences,
    unwrap,
)
from newtune.train.methods.pairs import carried, layout
from newtune.train.methods.preference import reward_loss, sequence_end_index


class RewardCollator:
    """[chosen..., rejected...] full sequences, padded or packed, and any `margin`."""

    def __init__(self, pad_id: int, capacity: int | None, pad_to: int | None) -> None:
        self.pad_id, self.capacity, self.pad_to = pad_id, capacity, pad_to

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The collated batch (no token is trained: labels are all -100)."""
        sequences = [(list(r[k]), len(r[k])) for k in ("chosen_ids", "rejected_ids") for r in rows]
        batch = layout(sequences, self.pad_id, self.capacity, self.pad_to)
        batch.pop("labels")
        return {**batch, **carried(rows, ("margin",))}


def score_head(model: Any) -> Any:
    """The classification head (`score`, or `classifier`) of a sequence classifier."""
    inner = unwrap(model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    for name in ("score", "classifier"):
        head = getattr(inner, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise TypeError(f"{type(inner).__name__} has no `score` head")


def sequence_rewards(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The score at each sequence's last token, in the collator's order."""
    captured: list[torch.Tensor] = []
    hook = score_head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(**model_inputs(batch), use_cache=False)
    finally:
        hook.remove()
    scores = captured[-1][..., 0]  # [rows, width]
    if is_packed(batch):
        n = num_sequences(batch)
        ends = sequence_end_index(batch["position_ids"], batch["sequence_index"], n)
        return scores.flatten()[ends]
    last = batch["attention_mask"].sum(dim=1) - 1  # right padding
    return scores[torch.arange(scores.shape[0], device=scores.device), last]


class RewardMethod(Method):
    """`reward_model: true`: `-log sigmoid(r_chosen - r_rejected [- margin])`."""

    name = "reward"
    columns = ("chosen_ids", "rejected_ids")
    sequence_classification = True
    metric_names = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")

    def __init__(self, config: Any) -> None:
        self.center = getattr(config, "center_rewards_coefficient", None)

    def describe(self) -> str:
        """`reward_model: true`."""
        return "reward_model: true"

    def lengths(self, ds: Any) -> list[int]:
        """The longer sequence of each pair."""
        return [
            max(len(c), len(r)) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"], strict=True)
        ]

    def collator(
        self, pad_id: int, capacity: int | None, pad_to: int | None, attention: str | None = None
    ) -> RewardCollator:
        """Reward batches, packed when `capacity` is set (full sequences: no shared prompt)."""
        return RewardCollator(pad_id, capacity, pad_to)

    def batch_rows(self, batch: dict[str, Any]) -> int:
        """Pairs in a batch."""
        return num_sequences(batch) // 2

    def loss(
        self, model: Any, batch: dict[str, Any], reference: Reference
    ) -> tuple[torch.Tensor, Metrics]:
        """The batch's Bradley-Terry loss and metrics."""
        rewards = sequence_rewards(model, batch)
        n = rewards.shape[0] // 2
        return reward_loss(
            rewards[:n],
            rewards[n:],
            margin=batch.get("margin"),
            center_rewards_coefficient=self.center,
        )
