"""Template-free input/output: the row's own segments, each with a train flag, nothing added."""

from __future__ import annotations

from typing import Any

from newtune.data.strategies.base import Segment, Segments, Strategy
from newtune.data.strategies.registry import register
from newtune.errors import DataError


@register("input_output")
class InputOutput(Strategy):
    """`segments: [{text, label}, ...]`: each text tokenized alone, no BOS/EOS; label false -> -100.

    With train_on_inputs every segment is trained.
    """


    def required_columns(self) -> list[str]:
        return ["segments"]

    def sample(self, row: dict[str, Any]) -> Segments:
        raw = row.get("segments")
        if not isinstance(raw, list) or not raw:
            raise DataError("column `segments` must hold a non-empty list of {text, label}")
        pieces = []
        for i, seg in enumerate(raw):
            if not isinstance(seg, dict) or not isinstance(seg.get("text"), str):
                raise DataError(f"segment {i} needs a string `text` (and a boolean `label`)")
            label = seg.get("label")
            if not isinstance(label, bool):
                raise DataError(f"segment {i} needs a boolean `label`, got {label!r}")
            pieces.append(Segment(seg["text"], label or self.train_on_inputs))
        return Segments(tuple(pieces), bos=False, eos=False)

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Segments:
        """The text as is: no BOS, as in training."""
        return Segments((Segment(text, False),), bos=False, eos=False)
