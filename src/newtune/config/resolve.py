"""Derive the run plan from a validated config. Validation checks; this step derives."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from newtune.config.schema import NewtuneConfig


@dataclass(frozen=True)
class RunPlan:
    """Values derived from the config and the environment, fixed for the whole run."""

    world_size: int
    rank: int
    local_rank: int
    effective_batch_size: int
    dtype: str  # "bfloat16" | "float16" | "float32"
    mixed_precision: str  # "bf16" | "fp16" | "no"
    device: str  # "cuda" | "mps" | "cpu"
    train_mode: str  # "lora" | "full"

    @property
    def is_main_process(self) -> bool:
        """True on the process that prepares data, logs and saves."""
        return self.rank == 0

    def as_dict(self) -> dict[str, Any]:
        """The plan as plain values (for printing)."""
        return asdict(self)


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _bf16_supported(device: str) -> bool:
    import torch

    return device == "cuda" and torch.cuda.is_bf16_supported()


def resolve(config: NewtuneConfig, env: dict[str, str] | None = None) -> RunPlan:
    """Compute world size, batch size, precision and device for this config."""
    env = dict(os.environ) if env is None else env
    world_size = int(env.get("WORLD_SIZE", "1"))
    device = _device()
    use_bf16 = _bf16_supported(device) if config.bf16 == "auto" else bool(config.bf16)
    if use_bf16:
        dtype, mixed = "bfloat16", "bf16"
    elif config.fp16:
        dtype, mixed = "float16", "fp16"
    else:
        dtype, mixed = "float32", "no"
    return RunPlan(
        world_size=world_size,
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        effective_batch_size=(
            config.micro_batch_size * config.gradient_accumulation_steps * world_size
        ),
        dtype=dtype,
        mixed_precision=mixed,
        device=device,
        train_mode="lora" if config.adapter == "lora" else "full",
    )
