"""Checks that run before any data is prepared or a model is loaded: the output folder can be
written, and `sequence_len` fits the model and the machine.

`sequence_len` policy (relative to the model's context length, `max_position_embeddings` of
its config, read without loading weights):

- above the context length: a warning. Positions past it are ones the model never saw (RoPE
  models degrade, learned position tables fail), unless `rope_scaling` extends the context.
- padded batches that cannot fit in memory: an error. With `pad_to_sequence_len` every
  micro-batch holds `micro_batch_size x sequence_len` tokens whatever the data. Such a batch
  needs at least its index tensors (input_ids, labels, attention_mask, position_ids: 4 x 8
  bytes a token) plus one 16-bit hidden state per layer (what even gradient checkpointing keeps
  for backward). When this lower bound exceeds the memory of the training device (GPU memory,
  else RAM), allocation would fail after minutes of preparation, so the run is refused now.
  Without padding a long `sequence_len` only bounds truncation and costs nothing by itself.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from newtune.config.resolve import RunPlan
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError
from newtune.fileio import temp_name

log = logging.getLogger(__name__)

INDEX_BYTES_PER_TOKEN = 4 * 8  # input_ids, labels, attention_mask, position_ids as int64
HIDDEN_BYTES = 2  # one 16-bit hidden state per layer and token


def check_output_dir(value: str, key: str = "output_dir") -> None:
    """Refuse an output folder that is a file or cannot be written (nothing is created)."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"`{key}: {value}` is a file, not a folder; newtune writes the trained model, "
            f"checkpoints and logs into `{key}`. Point it at a folder (new or existing), or move "
            "the file away"
        )
    probe_dir = path
    while not probe_dir.exists():  # the nearest existing folder is where mkdir would start
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ConfigError(
            f"`{key}: {value}` cannot be created: {probe_dir} is a file, not a folder. Choose "
            f"an `{key}` whose parent folders are folders"
        )
    probe = temp_name(probe_dir / "write-check")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        what = value if probe_dir == path else f"{probe_dir} (where `{key}: {value}` is created)"
        hint = " (a read-only file system)" if exc.errno == errno.EROFS else ""
        raise ConfigError(
            f"`{key}`: cannot write into {what}: {reason}{hint}. Choose an `{key}` you can "
            "write to, or fix the folder's permissions"
        ) from None


@dataclass(frozen=True)
class ModelShape:
    """What the preflight needs from a model config: context length, width, depth."""

    context: int | None
    hidden_size: int | None
    layers: int | None


def model_shape(config: NewtuneConfig) -> ModelShape | None:
    """The base model's shape from its config (no weights, no remote code); None when it
    cannot be read here (loading the model reports why).

    The context is `max_position_embeddings`, as `overrides_of_model_config` sets it, times
    the `factor` of a `rope_scaling` override.
    """
    from transformers import AutoConfig

    from newtune.models.location import locate

    source = config.base_model_config or config.base_model
    try:
        loc = locate(source, "base_model_config" if config.base_model_config else "base_model")
        text = AutoConfig.from_pretrained(
            loc.name_or_path, revision=config.revision_of_model, **loc.kwargs()
        ).get_text_config()
    except Exception:  # noqa: BLE001 - any failure here is reported by the model load
        return None
    overrides = dict(config.overrides_of_model_config or {})

    def number(name: str) -> int | None:
        value = overrides.get(name, getattr(text, name, None))
        return value if isinstance(value, int) and value > 0 else None

    context = number("max_position_embeddings")
    scaling = overrides.get("rope_scaling")
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    if context and isinstance(factor, int | float) and factor > 1:
        context = int(context * factor)
    return ModelShape(context, number("hidden_size"), number("num_hidden_layers"))


def memory_bytes(plan: RunPlan) -> int | None:
    """Memory of the training device: the GPU's for CUDA, else this machine's RAM."""
    if plan.device == "cuda":
        import torch

        if torch.cuda.is_available():
            index = plan.local_rank if plan.local_rank < torch.cuda.device_count() else 0
            return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def padded_batch_bytes(config: NewtuneConfig, shape: ModelShape | None) -> int:
    """A lower bound of the memory one padded micro-batch of `sequence_len` rows needs."""
    per_token = INDEX_BYTES_PER_TOKEN
    if shape is not None and shape.hidden_size and shape.layers:
        per_token += shape.layers * shape.hidden_size * HIDDEN_BYTES
    return config.micro_batch_size * config.sequence_len * per_token


def _gib(value: float) -> str:
    return f"{value / 2**30:,.1f} GiB"


def check_sequence_len(config: NewtuneConfig, plan: RunPlan) -> None:
    """Warn when `sequence_len` exceeds the model's context; refuse padded batches that
    cannot fit in memory (see the module docstring)."""
    shape = model_shape(config)
    key = f"`sequence_len: {config.sequence_len}`"
    if shape is not None and shape.context and config.sequence_len > shape.context:
        log.warning(
            "%s is above the model's context length (max_position_embeddings: %s): rows longer "
            "than %s tokens use positions the model never saw. Lower sequence_len, or extend the "
            "context with `rope_scaling`",
            key,
            shape.context,
            shape.context,
        )
    if not config.pad_to_sequence_len:
        return
    need, have = padded_batch_bytes(config, shape), memory_bytes(plan)
    if have is not None and need > have:
        context = (
            f" (the model's context is {shape.context} tokens)" if shape and shape.context else ""
        )
        raise ConfigError(
            f"{key} with `pad_to_sequence_len: true` pads every micro-batch to "
            f"{config.micro_batch_size} x {config.sequence_len} tokens, which needs at least "
            f"{_gib(need)} while the {plan.device} device has {_gib(have)}; the run would fail "
            f"when allocating its first batch. Lower `sequence_len`{context} or "
            "`micro_batch_size`, or remove `pad_to_sequence_len`"
        )


def check_run(config: NewtuneConfig, plan: RunPlan) -> None:
    """Every preflight check of a training run."""
    check_output_dir(config.output_dir)
    check_sequence_len(config, plan)
