"""Legacy Axolotl spellings and how they map onto newtune's canonical keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Legacy:
    """A legacy key: `true` sets `canonical` to `value` (None: to the legacy key's own value)."""

    canonical: str
    value: Any = None


LEGACY_KEYS: dict[str, Legacy] = {
    "flash_attention": Legacy("attn_implementation", "flash_attention_2"),
    "sdp_attention": Legacy("attn_implementation", "sdpa"),
    "bfloat16": Legacy("bf16"),
    "evaluation_strategy": Legacy("eval_strategy"),
    "model_config": Legacy("overrides_of_model_config"),
    "sequence_parallel_degree": Legacy("context_parallel_size"),
    "relora_steps": Legacy("jagged_restart_steps"),
    "relora_warmup_steps": Legacy("jagged_restart_warmup_steps"),
    "relora_anneal_steps": Legacy("jagged_restart_anneal_steps"),
}


def is_off(value: object) -> bool:
    """True when a value asks for nothing (null, false, empty)."""
    return value is None or value is False or value in ("", [], {})
