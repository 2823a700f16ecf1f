"""Prompt strategies: one small class per dataset format, registered by name."""

from newtune.data.strategies.base import Conversation, Sample, Segment, Segments, Strategy
from newtune.data.strategies.registry import (
    ENTRY_POINT_GROUP,
    get_strategy,
    known_types,
    register,
    type_problems,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Conversation",
    "Sample",
    "Segment",
    "Segments",
    "Strategy",
    "get_strategy",
    "known_types",
    "register",
    "type_problems",
]
