"""SFT of a vision-language model: cached chat rows become tokens and pixels in the collator.

Chosen for SFT when the config is multimodal (`processor_type`). The prepared rows hold
messages with image references (`data.prepare_vision`); each batch is rendered, expanded and
masked by `data.vision.VisionCollator` (unpadded rows: padded to the batch's longest), and the
Trainer passes every processor output (`pixel_values`, `image_grid_thw`, ...) to the model.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from newtune.config.schema import NewtuneConfig
from newtune.data.prepare_vision import decode_row
from newtune.data.vision import VisionCollator
from newtune.errors import DataError
from newtune.train.methods.sft import SFTMethod
from newtune.train.trainer import NewtuneTrainer

log = logging.getLogger(__name__)


class VisionMethod(SFTMethod):
    """SFT on cached image rows (`messages`, `train`, `origin`, `base_dir` columns)."""

    columns = ("messages",)

    def _wrong_rows(self, split: str, present: list[str], missing: list[str]) -> str:
        return (
            f"the prepared `{split}` split has {', '.join(present)}, not the image rows of a "
            "vision-language config; run `newtune preprocess` again with this config"
        )

    def lengths(self, ds: Any) -> list[int]:
        """Not known before the processor runs: image rows cannot be grouped by length."""
        raise DataError("`group_by_length` is not available for image rows")


class CachedRowsCollator:
    """Decodes cached rows and hands them to a VisionCollator."""

    def __init__(self, collator: VisionCollator) -> None:
        self.collator = collator

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch of these cached rows."""
        return self.collator([decode_row(r) for r in rows])


def vision_collator(config: NewtuneConfig, processor: Any) -> VisionCollator:
    """The collator for this config: sequence_len, image sizing, role_boundaries, and the
    first dataset entry's masking keys (the default of rows cached without their own)."""
    entry = config.datasets[0]
    size = config.image_size
    return VisionCollator(
        processor,
        roles_to_train=tuple(entry.roles_to_train or ("assistant",)),
        train_on_eos=entry.train_on_eos or "turn",
        train_on_inputs=bool(config.train_on_inputs),
        eot_tokens=tuple(config.eot_tokens or ()),
        max_length=config.sequence_len,
        image_size=(size, size) if isinstance(size, int) else (tuple(size) if size else None),
        resample=config.image_resize_algorithm or "bilinear",
        role_boundaries=tuple(config.role_boundaries or ()),
    )


class VisionTrainer(NewtuneTrainer):
    """NewtuneTrainer for image rows: the vision collator for training and eval batches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._trained_only = False  # the full head: VLM forwards differ in logits_to_keep

    def eval_loader(self, dataset: Any) -> DataLoader:
        """Sequential batches of this rank (rank r takes batches r, r + W, ...)."""
        size = self.args.per_device_eval_batch_size
        starts = list(range(0, len(dataset), size))[self.args.process_index :: self.args.world_size]
        batches = [list(range(s, min(s + size, len(dataset)))) for s in starts]
        return DataLoader(dataset, batch_sampler=batches, collate_fn=self.data_collator)


def eval_batches(config: NewtuneConfig, processor: Any, dataset: Any) -> DataLoader:
    """Sequential eval batches of image rows (for `newtune evaluate`)."""
    size = config.eval_batch_size or config.micro_batch_size
    batches = [list(range(s, min(s + size, len(dataset)))) for s in range(0, len(dataset), size)]
    collate = CachedRowsCollator(vision_collator(config, processor))
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate)


def vision_trainer(
    config: NewtuneConfig,
    plan: Any,
    model: Any,
    processor: Any,
    prepared: Any,
    callbacks: list[Any],
) -> VisionTrainer:
    """The Trainer of a vision-language SFT run (padded batches, no packing)."""
    from newtune.train.args import build_training_args, schedule_for
    from newtune.train.callbacks import resume_record

    train_ds, eval_ds = prepared.data["train"], prepared.data.get("test")
    batches = math.ceil(len(train_ds) / (config.micro_batch_size * plan.world_size))
    steps_per_epoch = max(1, math.ceil(batches / plan.gradient_accumulation_steps))
    fingerprint = str(prepared.stats.get("fingerprint") or prepared.path.name)
    return VisionTrainer(
        model=model,
        args=build_training_args(config, plan, eval_ds is not None, steps_per_epoch),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=CachedRowsCollator(vision_collator(config, processor)),
        processing_class=processor,
        callbacks=callbacks,
        schedule=schedule_for(config),
        checkpoint_files=resume_record(fingerprint),
    )


def train_vision(loaded: Any, plan: Any, checkpoint: str | None) -> Path:
    """`newtune train` for a multimodal config: processor, image rows, VLM, and the outputs."""
    from newtune.data.prepare import prepare
    from newtune.models.processor import build_vlm, load_processor
    from newtune.train import run
    from newtune.train.callbacks import build_callbacks, check_resume_data
    from newtune.train.report import tracker_environment

    config = loaded.config
    method = VisionMethod(config)
    processor, new_ids = load_processor(config)
    tokenizer = processor.tokenizer
    prepared = prepare(config, tokenizer, processor.chat_template)
    log.info("prepared data: %s (%s)", prepared.path, "reused" if prepared.reused else "new")
    method.check_data(prepared.data)
    if checkpoint is not None:
        check_resume_data(checkpoint, str(prepared.stats.get("fingerprint")))
    from transformers import set_seed

    set_seed(config.seed)
    model = build_vlm(config, plan, tokenizer, new_ids)
    callbacks = build_callbacks(config)
    with tracker_environment(config):
        trainer = vision_trainer(config, plan, model, processor, prepared, callbacks)
        metrics = run.train_and_evaluate(trainer, callbacks, config, checkpoint)
    # the processor: saves the tokenizer, processor config and chat template
    return run.finish_run(trainer, processor, loaded, prepared, metrics)
