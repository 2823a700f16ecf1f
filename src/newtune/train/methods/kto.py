"""KTO: unpaired desirable/undesirable completions against a reference (TRL's KTOTrainer)."""

from __future__ import annotations

from typing import Any

import torch

from newtune.errors import ConfigError
from newtune.train.methods.base import Method, Metrics, Reference, forward_stats, num_sequences
from newtune.train.methods.dpo import beta_of
from newtune.train.methods.pairs import carried, layout
from newtune.train.methods.preference import kto_loss

KL_COLUMN = "kl_completion_ids"


def kl_completions(completions: list[list[int]], chunk: int) -> list[list[int]]:
    """Each row's mismatched completion: within chunks of `chunk` rows, row i takes row i-1's
    completion and the first row the chunk's last (TRL's rotation, chunk = batch size)."""
    out: list[list[int]] = []
    for start in range(0, len(completions), chunk):
        part = completions[start : start + chunk]
        out.extend([part[-1], *part[:-1]])
    return out


class KTOCollator:
    """`main` (prompt+completion) and `kl` (prompt+mismatched completion) sub-batches."""

    def __init__(self, pad_id: int, capacity: int | None, pad_to: int | None) -> None:
        self.pad_id, self.capacity, self.pad_to = pad_id, capacity, pad_to

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The collated batch, with `label` and any precomputed reference log-probs."""

        def sequences(key: str) -> list[tuple[list[int], int]]:
            return [(list(r["prompt_ids"]) + list(r[key]), len(r["prompt_ids"])) for r in rows]

        batch: dict[str, Any] = {
            "main": layout(sequences("completion_ids"), self.pad_id, self.capacity, self.pad_to),
            "label": torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool),
            **carried(rows, ("ref_logps", "ref_kl_logps")),
        }
        if KL_COLUMN in rows[0]:
            batch["kl"] = layout(sequences(KL_COLUMN), self.pad_id, self.capacity, self.pad_to)
        return batch


class KTOMethod(Method):
    """`rl: kto`: desirable and undesirable completions, with the batch KL term."""

    name = "kto"
    columns = ("prompt_ids", "completion_ids", "label")
    needs_reference = True
    ref_columns = ("ref_logps", "ref_kl_logps")
    metric_names = (
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "entropy",
        "logits/chosen",
        "logits/rejected",
    )

    def __init__(self, config: Any) -> None:
        self.beta = beta_of(config)
        self.desirable = float(getattr(config, "kto_desirable_weight", None) or 1.0)
        self.undesirable = float(getattr(config, "kto_undesirable_weight", None) or 1.0)
        if int(getattr(config, "micro_batch_size", 2) or 1) < 2:
            raise ConfigError(
                f"`rl: kto` needs `micro_batch_size` of 2 or more (it is "
                f"{config.micro_batch_size}): the KL term pairs each prompt with another row's "
                "completion in the same batch, as TRL's KTOTrainer does."
            )

    def describe(self) -> str:
        """`rl: kto`."""
        return "rl: kto"

    def prepare_rows(self, ds: Any, micro_batch_size: int) -> Any:
        """Add the mismatched completions of the KL term."""
        if KL_COLUMN in ds.column_names:
            return ds
        return ds.add_column(KL_COLUMN, kl_completions(ds["completion_ids"], micro_batch_size))

    def lengths(self, ds: Any) -> list[int]:
        """Prompt + completion of each row."""
        return [
            len(p) + len(c) for p, c in zip(ds["prompt_ids"], ds["completion_ids"], strict=True)
        ]

    def collator(
        self, pad_id: int, capacity: int | None, pad_to: int | None, attention: str | None = None
    ) -> KTOCollator:
        """KTO batches, packed when `capacity` is set (no shared prompts: rows are single)."""
        return KTOCollator(pad_id, capacity, pad_to)

    def batch_rows(self, batch: dict[str, Any]) -> int:
        """Rows in a batch."""
        return num_sequences(batch["main"])

    def loss(
        self, model: Any, batch: dict[str, Any], reference: Reference
    ) -> tuple[torch.Tensor, Metrics]:
        """The batch's loss and metrics."""
        policy = forward_stats(model, batch["main"])
        with torch.no_grad():
            kl_logps = forward_stats(model, batch["kl"], extras=False).logps
        if "ref_logps" in batch:
            ref_logps, ref_kl = batch["ref_logps"], batch["ref_kl_logps"]
        else:
            with reference.scoring(model) as ref:
                ref_logps, ref_kl = self._scores(ref, batch)
        return kto_loss(
            policy,
            ref_logps,
            batch["label"],
            kl_logps,
            ref_kl,
            beta=self.beta,
            desirable_weight=self.desirable,
            undesirable_weight=self.undesirable,
            rows=self.rows,
        )

    @staticmethod
    def _scores(ref: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        main = forward_stats(ref, batch["main"], extras=False).logps
        return main, forward_stats(ref, batch["kl"], extras=False).logps

    def reference_columns(self, ref: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The reference log-prob columns of a batch, for `precompute_ref_log_probs`."""
        main, kl = self._scores(ref, batch)
        return {"ref_logps": main, "ref_kl_logps": kl}
