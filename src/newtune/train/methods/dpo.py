"""DPO and its loss family (IPO, hinge, ..., TRL 1.16's loss types), and SimPO/CPO."""

from __future__ import annotations

from typing import Any

import torch

from newtune.errors import ConfigError
from newtune.train.methods.base import Method, Metrics, Reference, forward_stats, num_sequences
from newtune.train.methods.pairs import PairCollator
from newtune.train.methods.preference import DPOSettings, cpo_loss, dpo_loss

SHARED_PROMPT_ATTENTION = ("sdpa", "eager")  # the ones that read a custom 4-D mask
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
REWARD_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
TOKEN_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


def beta_of(config: Any, default: float = 0.1) -> float:
    """`rl_beta`, or TRL's default."""
    beta = getattr(config, "rl_beta", None)
    return default if beta is None else float(beta)


class PairMethod(Method):
    """Methods trained on (prompt, chosen, rejected) rows."""

    columns = PAIR_COLUMNS
    full_labels = False

    def __init__(self, config: Any) -> None:
        self.rl = getattr(config, "rl", None)

    def describe(self) -> str:
        """`rl: <value>` as the config set it."""
        return f"rl: {self.rl}"

    def collator(
        self, pad_id: int, capacity: int | None, pad_to: int | None, attention: str | None = None
    ) -> PairCollator:
        """Pair batches, packed when `capacity` is set; packed under sdpa/eager `attention`
        (which take a 4-D mask), each pair's prompt runs once for both completions."""
        share = attention in SHARED_PROMPT_ATTENTION and not self.full_labels
        return PairCollator(
            pad_id, capacity, pad_to, full_labels=self.full_labels, share_prompt=share
        )

    def batch_rows(self, batch: dict[str, Any]) -> int:
        """Pairs in a batch."""
        return num_sequences(batch) // 2

    def lengths(self, ds: Any) -> list[int]:
        """Prompt + longer completion of each pair."""
        return [
            len(p) + max(len(c), len(r))
            for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)
        ]


class DPOMethod(PairMethod):
    """`rl: dpo | ipo | simpo`: DPOTrainer's losses against a reference, or SimPO (none)."""

    name = "dpo"
    ref_columns = ("ref_chosen_logps", "ref_rejected_logps")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if getattr(config, "dpo_use_liger_kernel", None):
            raise ConfigError(
                "`dpo_use_liger_kernel: true` is not implemented: newtune computes the DPO "
                "loss from per-sequence log-probs (padded or packed) in plain torch. Remove "
                "the key; the loss is the same."
            )
        self.simpo = self.rl == "simpo"
        smoothing = float(getattr(config, "dpo_label_smoothing", None) or 0.0)
        if self.simpo:
            alpha = getattr(config, "cpo_alpha", None)
            gamma = getattr(config, "simpo_gamma", None)
            self.cpo = {
                "loss_type": "simpo",
                "beta": beta_of(config),
                "label_smoothing": smoothing,
                "cpo_alpha": 1.0 if alpha is None else float(alpha),
                "simpo_gamma": 0.5 if gamma is None else float(gamma),
            }
            self.needs_reference = False
            self.metric_names = (*REWARD_METRICS, "nll_loss")
            return
        types = getattr(config, "dpo_loss_type", None) or (["ipo"] if self.rl == "ipo" else None)
        weights = getattr(config, "dpo_loss_weights", None)
        self.settings = DPOSettings(
            loss_types=tuple(types or ("sigmoid",)),
            loss_weights=tuple(float(w) for w in weights) if weights else None,
            beta=beta_of(config),
            label_smoothing=smoothing,
            use_weighting=bool(getattr(config, "dpo_use_weighting", None)),
        )
        self.needs_reference = True
        self.metric_names = (*REWARD_METRICS, *TOKEN_METRICS)

    def loss(
        self, model: Any, batch: dict[str, Any], reference: Reference
    ) -> tuple[torch.Tensor, Metrics]:
        """The batch's loss and metrics."""
        stats = forward_stats(model, batch, extras=not self.simpo)
        chosen, rejected = stats.halves()
        if self.simpo:
            return cpo_loss(chosen, rejected, **self.cpo, rows=self.rows)
        ref_chosen, ref_rejected = self.reference_logps(model, batch, reference)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.settings, self.rows)

    def reference_logps(
        self, model: Any, batch: dict[str, Any], reference: Reference
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of chosen and rejected: precomputed, or scored now."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with reference.scoring(model) as ref:
            chosen, rejected = forward_stats(ref, batch, extras=False).halves()
        return chosen.logps, rejected.logps

    def reference_columns(self, ref: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The reference log-prob columns of a batch, for `precompute_ref_log_probs`."""
        chosen, rejected = forward_stats(ref, batch, extras=False).halves()
        return {"ref_chosen_logps": chosen.logps, "ref_rejected_logps": rejected.logps}
