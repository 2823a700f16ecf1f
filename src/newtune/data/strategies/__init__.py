"""Prompt strategies: one small class per dataset format, registered by name."""

from newtune.data.strategies.base import Conversation, Sample, Segment, Segments, Strategy
from newtune.data.strategies.registry import get_strategy, known_types, register

__all__ = [
    "Conversation",
    "Sample",
    "Segment",
    "Segments",
    "Strategy",
    "get_strategy",
    "known_types",
    "register",
]
