"""The Trainer of preference methods: the method's loss and metrics, TRL's metric names logged."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from newtune.train.methods.base import MetricLog, Reference, evaluate_batches
from newtune.train.trainer import NewtuneTrainer


def sequential_loader(
    dataset: Any, batch_size: int, collate: Any, num_replicas: int = 1, rank: int = 0
) -> DataLoader:
    """Sequential batches for one rank (rank r takes batches r, r + W, ...)."""
    starts = list(range(0, len(dataset), batch_size))[rank::num_replicas]
    batches = [list(range(s, min(s + batch_size, len(dataset)))) for s in starts]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate)


class PreferenceTrainer(NewtuneTrainer):
    """NewtuneTrainer whose loss is the method's (a batch mean, divided over accumulation).

    Metrics (`rewards/chosen`, ... as the method names them) are recorded per micro-batch and
    logged beside `loss` as their mean over the logging interval and the ranks; eval logs
    `eval_loss` and `eval_<metric>` the same way.
    """

    completion_sink: Any = None  # (batch, per-row values) -> None: train.swanlab_completions

    def __init__(
        self, *args: Any, method: Any, reference: Reference, eval_collator: Any, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.method, self.reference = method, reference
        self.eval_collator = eval_collator
        self.model_accepts_loss_kwargs = False  # the loss is a batch mean: Trainer divides it
        self._train_metrics = MetricLog(method.metric_names)
        reference.to(self.args.device)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The method's loss on the batch; its metrics are kept for the next log, and its
        per-row values go to `completion_sink` (the SwanLab completion table) when set."""
        sink = self.completion_sink if model.training else None
        self.method.rows = {} if sink is not None else None
        loss, metrics = self.method.loss(model, inputs, self.reference)
        if sink is not None:
            sink(inputs, self.method.rows)
            self.method.rows = None
        if model.training:
            self._train_metrics.add(metrics)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs get the method's metrics averaged since the last log."""
        if "loss" in logs:
            logs = {**logs, **self._train_metrics.pop(self.args.device)}
        super().log(logs, start_time)

    def eval_loader(self, dataset: Any) -> DataLoader:
        """This rank's eval batches, in order, with the method's eval collator."""
        return sequential_loader(
            dataset,
            self.args.per_device_eval_batch_size,
            self.eval_collator,
            self.args.world_size,
            self.args.process_index,
        )

    def eval_metrics(self, dataset: Any, prefix: str) -> dict[str, float]:
        """Mean loss and metrics over the eval split (each batch weighted by its rows)."""
        values = evaluate_batches(
            self.method, self.model, self.reference, self.eval_loader(dataset), self.args.device
        )
        return {f"{prefix}_{k}": v for k, v in values.items()}
