"""DeepSpeed, FSDP and DDP options -> TrainingArguments keyword arguments."""

from __future__ import annotations

from typing import Any

from newtune.config.resolve import RunPlan
from newtune.config.schema import NewtuneConfig


def distributed_kwargs(config: NewtuneConfig, plan: RunPlan) -> dict[str, Any]:
    """TrainingArguments keyword arguments for the config's distributed keys."""
    return {}
