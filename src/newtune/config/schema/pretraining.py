"""Streamed data: `pretraining_dataset`, `streaming: true`, and the prepared-data keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field

from newtune.config.schema.base import Section
from newtune.config.schema.compat import AXOLOTL_REMOVED, refused
from newtune.config.schema.data import DatasetEntry


class PretrainingEntry(DatasetEntry):
    """One entry of `pretraining_dataset:` (Axolotl's keys; `type` defaults to `pretrain`)."""

    type: str | dict[str, Any] | None = Field(
        default="pretrain",
        description="`pretrain` (raw text of `text_column`, chunked to sequence_len) or any "
        "`datasets:` format.",
    )
    text_column: str = Field(default="text", description="pretrain: the column holding the text.")
    skip: int | None = Field(
        default=None, ge=0, description="Rows of this source to skip before training."
    )


class PretrainingSection(Section):
    """Streamed training data: read, tokenized and packed on the fly, never written to disk."""

    pretraining_dataset: list[PretrainingEntry] | None = Field(
        default=None,
        min_length=1,
        description="Sources streamed for training (hub, local files, https) instead of "
        "`datasets`; needs `max_steps`. Rows are tokenized and packed while training "
        "reads them; a resumed run continues at the saved position of the stream.",
    )
    streaming: bool | None = Field(
        default=None,
        description="Stream the `datasets:` sources the same way (no prepared copy on "
        "disk; needs `max_steps`). Always on with `pretraining_dataset`.",
    )
    streaming_multipack_buffer_size: int = Field(
        default=10_000,
        gt=0,
        description="Rows read, tokenized and packed together from a stream.",
    )
    pretraining_sample_concatenation: bool | None = Field(
        default=None,
        description="Streams without `sample_packing`: fill each row of sequence_len with "
        "consecutive samples (they attend to each other) instead of one sample per row.",
    )
    push_dataset_to_hub: str | None = Field(
        default=None,
        description="Hub dataset repo the prepared (tokenized) data is pushed to after "
        "preprocessing (private, config name = the data fingerprint).",
    )
    dataset_keep_in_memory: bool | None = Field(
        default=None, description="Load the prepared rows into memory instead of memory-mapping."
    )
    gptq: Any = refused(
        "Load a GPTQ-quantized model (transformers' GPTQ integration).",
        "newtune cannot load GPTQ checkpoints here: transformers' GPTQ integration needs "
        "`gptqmodel` and `optimum`, and gptqmodel 7.x requires torch>=2.14.1 (newtune pins torch "
        "2.13) while 6.0.3, the last release for torch 2.13, pins numpy==2.2.6 (newtune has "
        "2.4) and builds only from source (`pypcre` and setuptools>=70.1 at build time)",
        "`load_in_4bit: true` with `adapter: qlora` (bitsandbytes), or dequantize the GPTQ "
        "checkpoint to a float model first",
    )
    gptq_disable_exllama: Any = refused(
        "Pre-2024 GPTQ kernel switch.",
        f"`gptq_disable_exllama` {AXOLOTL_REMOVED}; newtune does not load GPTQ models (`gptq`)",
        "`load_in_4bit: true` with `adapter: qlora`",
    )


def is_streamed(cfg: Any) -> bool:
    """Whether training reads a stream (`pretraining_dataset`, or `streaming: true`)."""
    return bool(getattr(cfg, "pretraining_dataset", None) or getattr(cfg, "streaming", None))


def streaming_rules(cfg: Any, names: Callable[[str], str] = str) -> list[str]:
    """What a streamed run needs, and what it cannot do (errors)."""
    out: list[str] = []
    if not cfg.datasets and not cfg.pretraining_dataset:
        out.append(
            "`datasets` is required but missing: add a `datasets:` list of training data "
            "(or `pretraining_dataset:` to stream pretraining text)"
        )
    if not is_streamed(cfg):
        return out
    key = "pretraining_dataset" if cfg.pretraining_dataset else "streaming"
    if cfg.pretraining_dataset and cfg.datasets:
        out.append(
            f"`{names('pretraining_dataset')}` and `{names('datasets')}` are both set; a run "
            "trains on one of them: keep `datasets` with `streaming: true`, or only "
            "`pretraining_dataset`"
        )
    if not cfg.max_steps:
        out.append(
            f"`{names(key)}` needs `max_steps`: a stream has no length, so the number of "
            "steps (and the learning-rate schedule) cannot come from epochs"
        )
    if cfg.val_set_size or cfg.test_datasets:
        out.append(
            f"`{names(key)}` with `val_set_size`/`test_datasets`: a streamed run has no eval "
            "split; remove them (or train from `datasets:` without streaming)"
        )
    if cfg.group_by_length:
        out.append(f"`{names(key)}` with `group_by_length`: a stream is not sorted by length")
    for other in ("rl", "reward_model", "process_reward_model"):
        if getattr(cfg, other, None):
            out.append(
                f"`{names(key)}` with `{names(other)}`: streaming is for SFT and pretraining "
                "data; preference and reward data are prepared (remove streaming)"
            )
    return out
