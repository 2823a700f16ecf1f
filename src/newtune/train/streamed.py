"""Training on a stream (`pretraining_dataset`, `streaming: true`): no prepared copy on disk.

Each rank reads its own part of the stream (`data.streaming.TokenStream`). Every checkpoint
holds `stream_position.json`: each rank's position after the checkpoint's last micro-batch,
so a resumed run reads on from there (Trainer's own skipping, which would re-read the
stream from its start, is off).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets
from torch.utils.data import DataLoader

from newtune.config.load import LoadedConfig
from newtune.config.resolve import RunPlan
from newtune.config.schema import NewtuneConfig
from newtune.data.collate import PackedCollator
from newtune.data.packing import Packing
from newtune.data.prepare import PreparedData
from newtune.data.streaming import (
    POSITION_FILE,
    StreamPosition,
    TokenStream,
    read_position,
    write_position,
)
from newtune.errors import ConfigError
from newtune.models.tokenizer import load_tokenizer
from newtune.train.trainer import NewtuneTrainer

log = logging.getLogger(__name__)


def stream_packing(config: NewtuneConfig, attn: str) -> Packing:
    """Rows of a streamed micro-batch: multipack's layout when packing, else sequence_len rows."""
    pad = bool(config.pad_to_sequence_len)
    if config.sample_packing:
        return Packing.for_run(config.sequence_len, config.micro_batch_size, attn, pad)
    return Packing(config.sequence_len, config.micro_batch_size, pad)


class StreamTrainer(NewtuneTrainer):
    """NewtuneTrainer reading a TokenStream; checkpoints save every rank's stream position."""

    def __init__(self, *args: Any, stream: TokenStream, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream = stream

    def get_train_dataloader(self) -> DataLoader:
        """This rank's own stream, `rows` bins per micro-batch (not sharded again)."""
        return DataLoader(self.stream, batch_size=self.stream.rows, collate_fn=self.data_collator)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The checkpoint, with the stream position of every rank after this step."""
        batches = self.state.global_step * self.args.gradient_accumulation_steps
        mark = self.stream.marks[batches].as_json()
        marks = [mark]
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            marks = gather_object([mark])
        positions = [StreamPosition.from_json(m) for m in marks]
        self.checkpoint_files[POSITION_FILE] = write_position(positions, self.state.global_step)
        super()._save_checkpoint(model, trial)


def start_of(checkpoint: str | None, plan: RunPlan) -> StreamPosition:
    """Where this rank's stream starts: the checkpoint's saved position, or the beginning."""
    if checkpoint is None:
        return StreamPosition()
    path = Path(checkpoint) / POSITION_FILE
    if not path.is_file():
        raise ConfigError(
            f"`resume_from_checkpoint: {checkpoint}` has no {POSITION_FILE}: it was not saved "
            "by a streamed run, so the position in the stream is unknown; resume from a "
            "checkpoint of this run or start without resume_from_checkpoint"
        )
    return read_position(path.read_text(), plan.rank, plan.world_size, str(path))


def train_streamed(loaded: LoadedConfig, plan: RunPlan, checkpoint: str | None) -> Path:
    """Train on the stream, save the outputs (stats.json `stream`: rows read, packing)."""
    from newtune.train.args import build_training_args, schedule_for
    from newtune.train.callbacks import build_callbacks
    from newtune.train.eaft import loss_func
    from newtune.train.kernels import fused_head
    from newtune.train.report import tracker_environment
    from newtune.train.run import _checkpoint_step, _raise_if_aborted, finish_run, training_model
    from newtune.train.seed_features import attach

    config = loaded.config
    tokenizer, new_ids = load_tokenizer(config)
    packing = stream_packing(config, plan.attn_implementation)
    start = start_of(checkpoint, plan)
    step = (_checkpoint_step(checkpoint) or 0) if checkpoint else 0
    args = build_training_args(config, plan, False, int(config.max_steps or 1))
    args.ignore_data_skip = True  # the stream opens at the saved position instead
    stream = TokenStream(
        config,
        tokenizer,
        tokenizer.chat_template,
        packing,
        rank=plan.rank,
        world_size=plan.world_size,
        start=start,
        first_batch=step * args.gradient_accumulation_steps,
    )
    model = training_model(config, plan, tokenizer, new_ids)
    callbacks = build_callbacks(config)
    with tracker_environment(config):
        trainer = StreamTrainer(
            model=model,
            args=args,
            train_dataset=stream,
            data_collator=PackedCollator(tokenizer.pad_token_id, None),
            processing_class=tokenizer,
            callbacks=callbacks,
            schedule=schedule_for(config),
            fused_head=fused_head(config),
            compute_loss_func=loss_func(config),  # use_eaft
            stream=stream,
        )
        attach(trainer, config, tokenizer)  # ReLoRA, jagged lr, LoRA+, LISA
        if checkpoint is not None:
            log.info("resuming from %s (step %s) at stream position %s", checkpoint, step, start)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        _raise_if_aborted(callbacks, config.output_dir)
    report = stream.stats.report()
    log.info(
        "stream: %s rows read, %s samples -> %s rows of %s tokens (efficiency %.1f%%)",
        report["rows_read"],
        report["samples"],
        report["packed_rows"],
        report["row_capacity"],
        100 * report["efficiency"],
    )
    stats = {"stream": report, "total_tokens": report["tokens"]}
    prepared = PreparedData(Path(config.output_dir), datasets.DatasetDict(), stats, reused=False)
    return finish_run(trainer, tokenizer, loaded, prepared, dict(result.metrics))
