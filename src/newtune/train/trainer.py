"""newtune's Trainer: multipack batches, and an eval loss that is the trained-token mean."""

from __future__ import annotations

import inspect
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from newtune.data.collate import BinDataset, PackedCollator, PadCollator
from newtune.data.packing import MultipackBatchSampler, Packing, sample_lengths
from newtune.data.tokenize import IGNORE_INDEX
from newtune.errors import ModelError
from newtune.fileio import replace_dir, temp_name
from newtune.train.schedules import Schedule, build_scheduler

log = logging.getLogger(__name__)


def packed_loader(
    dataset: Any,
    packing: Packing,
    pad_id: int,
    *,
    seed: int,
    shuffle: bool,
    num_replicas: int = 1,
    rank: int = 0,
    epochs: int = 1,
    group_size: int | None = None,
) -> DataLoader:
    """A DataLoader of packed micro-batches for one rank (evenly dealt when shuffled)."""
    sampler = MultipackBatchSampler(
        sample_lengths(dataset),
        packing.capacity,
        packing.rows,
        seed=seed,
        shuffle=shuffle,
        num_replicas=num_replicas,
        rank=rank,
        epochs=epochs,
        even=shuffle,  # training needs equal batch counts per rank; eval needs no repeats
        in_order=packing.in_order,  # curriculum_sampling
        next_fit=packing.next_fit,  # sample_packing_sequentially
        **({"group_size": group_size} if group_size else {}),
    )
    collate = PackedCollator(pad_id, packing.capacity if packing.pad_to_capacity else None)
    return DataLoader(BinDataset(dataset), batch_sampler=sampler, collate_fn=collate)


def padded_loader(
    dataset: Any,
    batch_size: int,
    pad_id: int,
    pad_to: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader:
    """Sequential padded batches for one rank (rank r takes batches r, r + W, ...)."""
    starts = list(range(0, len(dataset), batch_size))[rank::num_replicas]
    batches = [list(range(s, min(s + batch_size, len(dataset)))) for s in starts]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=PadCollator(pad_id, pad_to))


def token_loss(model: Any, batches: Any, device: Any) -> tuple[float, int]:
    """Summed cross-entropy over trained tokens, and their count (labels shifted by one)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits
            for row in range(logits.shape[0]):  # row by row: float32 logits of one row at a time
                target = labels[row, 1:]
                total += torch.nn.functional.cross_entropy(
                    logits[row, :-1].float(), target, ignore_index=-100, reduction="sum"
                ).double()
                count += (target != -100).sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    model.train(was_training)
    return float(total), int(count)


def head_can_skip(model: Any) -> bool:
    """True when the causal LM's forward takes `logits_to_keep`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def trained_positions_only(inputs: dict[str, Any]) -> dict[str, Any]:
    """Inputs that make the model project to the vocabulary only at trained positions.

    Position p predicts token p + 1, so p is kept where `labels[p + 1]` is trained. The model
    gets a boolean `logits_to_keep` mask and the matching targets as `shift_labels`: the summed
    loss is the same, and the head's matmul and the softmax skip prompts and padding.
    """
    labels = inputs["labels"]
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = target != IGNORE_INDEX
    kept = target[keep]
    return {**inputs, "labels": kept, "shift_labels": kept, "logits_to_keep": keep}


def loss_metrics(total: float, count: int, prefix: str = "eval") -> dict[str, float]:
    """`{prefix}_loss` (trained-token mean), `{prefix}_perplexity`, `{prefix}_tokens`."""
    loss = total / count if count else float("nan")
    return {
        f"{prefix}_loss": loss,
        f"{prefix}_perplexity": math.exp(min(loss, 700.0)) if count else float("nan"),
        f"{prefix}_tokens": count,
    }


class NewtuneTrainer(Trainer):
    """A transformers Trainer with multipack batches and a token-exact eval loss.

    The training loss is already normalised by the trained tokens of the whole accumulated
    step across ranks: Trainer counts them (`num_items_in_batch`) and the model divides its
    summed loss by that count, so packing and micro-batch re-splits do not change gradients.

    `fused_head`: a fused kernel (liger) owns the output head and loss, so the head is not
    restricted to trained positions. `checkpoint_files`: name -> text written into every
    checkpoint. Checkpoints are written to a temp folder and renamed to `checkpoint-N` when
    complete (`_save_checkpoint`), so a killed run never leaves a `checkpoint-N` that is half
    written.
    """

    def __init__(
        self,
        *args: Any,
        packing: Packing | None = None,
        eval_packing: Packing | None = None,
        pad_to: int | None = None,
        epochs: int = 1,
        packed_train: DataLoader | None = None,
        schedule: Schedule | None = None,
        fused_head: bool = False,
        checkpoint_files: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.packing, self.eval_packing = packing, eval_packing
        self.pad_to, self.epochs = pad_to, epochs
        self._packed_train = packed_train
        self.schedule = schedule
        self.fused_head = fused_head
        self.checkpoint_files = dict(checkpoint_files or {})

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The training loss, with the output head applied only where a label is trained."""
        if model.training and not return_outputs and self._head_on_trained_only(model):
            inputs = trained_positions_only(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _head_on_trained_only(self, model: Any) -> bool:
        if getattr(self, "_trained_only", None) is None:
            self._trained_only = (
                self.label_smoother is None
                and self.compute_loss_func is None
                and not self.fused_head
                and head_can_skip(self.accelerator.unwrap_model(model))
            )
        return self._trained_only

    # -- checkpoints: written whole, then renamed ----------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Trainer's checkpoint (weights, optimizer, scheduler, RNG, trainer state), written to a
        temp folder beside `checkpoint-N` and renamed when complete; then hub push and rotation.

        The steps are those of transformers 5's `Trainer._save_checkpoint`, in its order.
        """
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        tmp = self._checkpoint_temp(final)
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(str(tmp), _internal_call=True)
        best = self.state.best_global_step
        if self.args.save_strategy in ("steps", "epoch", "best") and best:
            best_dir = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{best}"
            if best == self.state.global_step or best_dir.exists():
                self.state.best_model_checkpoint = str(best_dir)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(tmp))
            self._save_scaler(str(tmp))
            self._save_rng_state(str(tmp))
        if self.args.should_save:
            for callback in [*self.callback_handler.callbacks, self.control]:
                if isinstance(callback, ExportableState):
                    name, state = type(callback).__name__, callback.state()
                    if isinstance(self.state.stateful_callbacks[name], list):
                        self.state.stateful_callbacks[name].append(state)
                    else:
                        self.state.stateful_callbacks[name] = state
            for name, text in self.checkpoint_files.items():
                (tmp / name).write_text(text)
            self.state.save_to_json(str(tmp / "trainer_state.json"))  # written last
        self._publish_checkpoint(tmp, final)
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(final))
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _checkpoint_temp(self, final: Path) -> Path:
        """The temp folder every rank writes this checkpoint into (named by the main process)."""
        names = [str(temp_name(final)) if self.args.process_index == 0 else ""]
        if self.args.process_index == 0:
            shutil.rmtree(names[0], ignore_errors=True)
        if self.args.world_size > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(names, from_process=0)
        tmp = Path(names[0])
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def _publish_checkpoint(self, tmp: Path, final: Path) -> None:
        """Rename the finished temp folder to `checkpoint-N` once every rank has written it.

        The main process renames first; on machines that do not share output_dir, each
        node's first process then renames its own copy.
        """
        wait = self.accelerator.wait_for_everyone
        wait()
        if self.args.process_index == 0:
            replace_dir(tmp, final)
        wait()
        if self.args.process_index != 0 and self.args.local_process_index == 0 and tmp.is_dir():
            replace_dir(tmp, final)
        if self.args.world_size > 1:
            wait()

    # -- hub ----------------------------------------------------------------------------------

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create or reach `hub_model_id` before training; failures are ModelErrors."""
        try:
            super().init_hf_repo(token, private)
        except Exception as exc:  # noqa: BLE001 - any hub failure is the same user problem
            raise ModelError(
                f"`hub_model_id: {self.args.hub_model_id}`: the hub repo cannot be created or "
                f"reached ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "set HF_TOKEN (or run `hf auth login`) with write access and check the network, "
                "or remove hub_model_id to train without pushing"
            ) from exc

    def create_optimizer(self, model: Any = None) -> Any:
        """Trainer's optimizer, or peft's LoRA+ parameter groups (`loraplus_lr_ratio`)."""
        plus = getattr(self, "loraplus", None)
        if plus is not None and self.optimizer is None:
            from newtune.train.seed_features import loraplus_optimizer

            self.optimizer = loraplus_optimizer(self, plus)
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The scheduler below, times the jagged restart factor when `jagged_restart_steps`."""
        created = self.lr_scheduler is None
        scheduler = self._create_scheduler(num_training_steps, optimizer)
        jagged = getattr(self, "jagged", None)
        if jagged is not None and created:
            from newtune.train.relora import jagged_scheduler

            opt = optimizer if optimizer is not None else self.optimizer
            self.lr_scheduler = scheduler = jagged_scheduler(scheduler, opt, jagged)
        return scheduler

    def _create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """transformers' scheduler, or newtune's (one_cycle, cosine variants) when configured."""
        if self.schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = build_scheduler(
            self.schedule,
            optimizer if optimizer is not None else self.optimizer,
            num_training_steps,
            self.args.get_warmup_steps(num_training_steps),
            self.args.learning_rate,
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    @property
    def _pad_id(self) -> int:
        return self.processing_class.pad_token_id

    def get_train_dataloader(self) -> DataLoader:
        """Packed batches when `sample_packing`, else Trainer's own (padded) loader."""
        if self.packing is None:
            return super().get_train_dataloader()
        loader = self.packed_train_loader()
        prepared = self.accelerator.prepare(loader)
        # The sampler already gives this rank its own batches; accelerate's shard wrapper
        # would shard them again, so make it a pass-through (as Trainer does for its own
        # rank-aware BatchRebalanceSampler).
        wrapper = getattr(prepared, "batch_sampler", None)
        if wrapper is not None and getattr(wrapper, "batch_sampler", None) is loader.batch_sampler:
            wrapper.num_processes, wrapper.process_index = 1, 0
        return prepared

    def packed_train_loader(self) -> DataLoader:
        """This rank's packed training loader (packed once, reused by every call)."""
        if self._packed_train is None:
            self._packed_train = packed_loader(
                self.train_dataset,
                self.packing,
                self._pad_id,
                seed=self.args.seed,
                shuffle=True,
                num_replicas=self.args.world_size,
                rank=self.args.process_index,
                epochs=self.epochs,
            )
        return self._packed_train

    def eval_loader(self, dataset: Any) -> DataLoader:
        """This rank's eval batches: packed if `eval_sample_packing`, else padded; no repeats."""
        if self.eval_packing is not None:
            return packed_loader(
                dataset,
                self.eval_packing,
                self._pad_id,
                seed=self.args.seed,
                shuffle=False,
                num_replicas=self.args.world_size,
                rank=self.args.process_index,
            )
        return padded_loader(
            dataset,
            self.args.per_device_eval_batch_size,
            self._pad_id,
            self.pad_to,
            self.args.world_size,
            self.args.process_index,
        )

    def eval_metrics(self, dataset: Any, prefix: str) -> dict[str, float]:
        """Eval loss as the mean over trained tokens (packing-independent)."""
        total, count = token_loss(self.model, self.eval_loader(dataset), self.args.device)
        return loss_metrics(total, count, prefix)

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """The eval split's metrics (`eval_metrics`), logged and handed to the callbacks as usual."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        metrics = self.eval_metrics(dataset, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics
