"""Learning-rate schedules transformers does not have: one_cycle and the cosine variants."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from newtune.errors import ConfigError

ONE_CYCLE_DEFAULT_PCT_START = 0.3  # torch's default, used when no warmup is configured


@dataclass(frozen=True)
class Schedule:
    """A newtune-built schedule: `one_cycle`, or cosine with a quadratic warmup / constant tail."""

    kind: str  # "one_cycle" | "cosine"
    min_lr_ratio: float = 0.0
    constant_lr_ratio: float | None = None
    quadratic_warmup: bool = False
    div_factor: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def cosine_factor(
    step: int,
    *,
    warmup: int,
    total: int,
    min_ratio: float = 0.0,
    constant_ratio: float | None = None,
    quadratic: bool = False,
    num_cycles: float = 0.5,
) -> float:
    """Multiplier of the peak lr at `step`: warmup, cosine down to `min_ratio`, constant tail."""
    if step < warmup:
        rise = step / max(1, warmup)
        return rise * rise if quadratic else rise
    end = total if constant_ratio is None else max(warmup, int(total * constant_ratio))
    progress = (min(step, end) - warmup) / max(1, end - warmup)
    cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))
    return min_ratio + (1.0 - min_ratio) * cosine


def build_scheduler(
    schedule: Schedule, optimizer: Optimizer, total_steps: int, warmup_steps: int, peak_lr: float
) -> LRScheduler:
    """The torch scheduler of a newtune schedule over `total_steps` optimizer steps."""
    if schedule.kind == "one_cycle":
        kwargs: dict[str, Any] = {
            "pct_start": warmup_steps / total_steps
            if warmup_steps
            else ONE_CYCLE_DEFAULT_PCT_START,
            "anneal_strategy": "cos",
        }
        if schedule.div_factor is not None:
            kwargs["div_factor"] = schedule.div_factor
        kwargs.update(schedule.kwargs)
        try:
            return OneCycleLR(optimizer, max_lr=peak_lr, total_steps=total_steps, **kwargs)
        except TypeError as exc:
            raise ConfigError(
                f"`lr_scheduler_kwargs` {schedule.kwargs} does not fit `lr_scheduler: one_cycle` "
                f"(torch OneCycleLR): {exc}"
            ) from exc
    unknown = set(schedule.kwargs) - {"num_cycles"}
    if unknown:
        raise ConfigError(
            f"`lr_scheduler_kwargs` keys {sorted(unknown)} do not apply to the cosine schedule "
            "with `lr_quadratic_warmup` / `cosine_constant_lr_ratio`; only `num_cycles` does"
        )
    factor = partial(
        cosine_factor,
        warmup=warmup_steps,
        total=total_steps,
        min_ratio=schedule.min_lr_ratio,
        constant_ratio=schedule.constant_lr_ratio,
        quadratic=schedule.quadratic_warmup,
        num_cycles=float(schedule.kwargs.get("num_cycles", 0.5)),
    )
    return LambdaLR(optimizer, factor)
