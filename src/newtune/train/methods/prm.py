"""Process reward models: a token classifier trained on per-step labels (TRL's PRMTrainer).

Rows come from `type: stepwise_supervised` (data.strategies.stepwise_supervised) in SFT's
columns: `labels` holds a class id (0 wrong, 1 right) at the last token of each step's
separator and -100 everywhere else. The model is an AutoModelForTokenClassification
(`num_labels: 2`); the loss is the cross-entropy of its logits at the labelled positions (the
mean over a micro-batch's labelled steps), and `accuracy` is the share of labelled steps whose
argmax class is the label. As TRL's PRMConfig (disable_dropout), the classifier head's own
dropout (transformers' default 0.1 for token classifiers) is off; the model's configured
dropouts and `lora_dropout` are left as the config sets them.
"""

from __future__ import annotations

from typing import Any

import torch

from newtune.errors import DataError
from newtune.train.methods.base import Method, Metrics, Reference, unwrap

IGNORE_INDEX = -100


class StepCollator:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 at the padding)."""

    def __init__(self, pad_id: int, pad_to: int | None) -> None:
        self.pad_id, self.pad_to = pad_id, pad_to

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The collated batch (one row per sequence; process reward rows are never packed)."""
        width = max(max(len(r["input_ids"]) for r in rows), self.pad_to or 0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def classifier(model: Any) -> Any:
    """The token classifier inside DDP/DeepSpeed and peft wrappers."""
    inner = unwrap(model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def head_dropout_off(model: Any) -> None:
    """Set the classifier head's dropout (the `dropout` before `score`) to 0, as TRL's PRM does."""
    head = getattr(classifier(model), "dropout", None)
    if isinstance(head, torch.nn.Dropout):
        head.p = 0.0


def step_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The classifier's logits at every position: [rows, width, num_labels]."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return model(**inputs, use_cache=False).logits


def step_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Mean cross-entropy over the labelled positions, and the step accuracy."""
    keep = labels != IGNORE_INDEX
    picked, targets = logits[keep].float(), labels[keep]
    if targets.numel() == 0:  # no labelled step (prepare drops such rows): a zero loss
        zero = logits.sum() * 0.0
        return zero, {}
    loss = torch.nn.functional.cross_entropy(picked, targets)
    accuracy = (picked.argmax(dim=-1) == targets).float().mean()
    return loss, {"accuracy": accuracy.detach()}


class PRMMethod(Method):
    """`process_reward_model: true`: per-step classification at the separator tokens."""

    name = "prm"
    columns = ("input_ids", "labels")
    metric_names = ("accuracy",)

    def __init__(self, config: Any) -> None:
        self.num_labels = getattr(config, "num_labels", None) or 2

    def describe(self) -> str:
        """`process_reward_model: true`."""
        return "process_reward_model: true"

    def _wrong_rows(self, split: str, present: list[str], missing: list[str]) -> str:
        have = ", ".join(c for c in present if not c.startswith("_")) or "none"
        return (
            f"`process_reward_model: true` trains on step-labelled rows with the columns "
            f"input_ids, labels, but the prepared `{split}` split has {have}. Give each entry "
            "of `datasets` `type: stepwise_supervised` (columns prompt, completions, labels)."
        )

    def collator(
        self, pad_id: int, capacity: int | None, pad_to: int | None, attention: str | None = None
    ) -> StepCollator:
        """Padded batches; packing is refused at validate (`sample_packing`)."""
        if capacity is not None:
            raise ValueError("process reward rows are not packed")
        return StepCollator(pad_id, pad_to)

    def batch_rows(self, batch: dict[str, Any]) -> int:
        """Labelled steps in a batch: eval means are over steps, as TRL's accuracy is."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(
        self, model: Any, batch: dict[str, Any], reference: Reference
    ) -> tuple[torch.Tensor, Metrics]:
        """The batch's step cross-entropy and accuracy."""
        head_dropout_off(model)
        logits = step_logits(model, batch)
        if logits.shape[-1] != self.num_labels:
            raise DataError(
                f"the model scores {logits.shape[-1]} classes per token, and "
                f"`process_reward_model: true` trains {self.num_labels} (num_labels); load it "
                "as AutoModelForTokenClassification with `num_labels: 2`"
            )
        labels = batch["labels"].to(logits.device)
        if bool((labels >= self.num_labels).any()):
            raise DataError(f"a step label is not below num_labels={self.num_labels}")
        return step_loss(logits, labels)
