"""ORPO: odds-ratio preference optimisation, no reference model (TRL's ORPOTrainer loss)."""

from __future__ import annotations

from typing import Any

import torch

from newtune.train.methods.base import Metrics, Reference, model_inputs, stats_of
from newtune.train.methods.dpo import REWARD_METRICS, PairMethod
from newtune.train.methods.preference import orpo_loss, token_nll


class ORPOMethod(PairMethod):
    """`rl: orpo`: NLL of the whole chosen sequence minus `orpo_alpha` x log sigmoid(log odds)."""

    name = "orpo"
    full_labels = True
    needs_reference = False
    metric_names = (*REWARD_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        alpha = getattr(config, "orpo_alpha", None)
        self.beta = 0.1 if alpha is None else float(alpha)

    def loss(
        self, model: Any, batch: dict[str, Any], reference: Reference
    ) -> tuple[torch.Tensor, Metrics]:
        """The batch's loss and metrics, from one forward pass."""
        logits = model(**model_inputs(batch), use_cache=False).logits
        chosen, rejected = stats_of(logits, batch, "labels", extras=False).halves()
        whole_chosen, _ = stats_of(logits, batch, "nll_labels", extras=False).halves()
        nll = token_nll(whole_chosen)
        return orpo_loss(chosen, rejected, nll, beta=self.beta, rows=self.rows)
