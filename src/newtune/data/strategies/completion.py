"""Raw text completion: every token is trained; long texts are split into rows."""

from __future__ import annotations

from typing import Any

from newtune.data.strategies.base import Segment, Segments, Strategy, text_field
from newtune.data.strategies.registry import register


@register("completion")
class Completion(Strategy):
    """The text of column `field` (default `text`), with BOS and EOS, chunked to sequence_len."""

    @property
    def field(self) -> str:
        return self.entry.field or "text"

    def required_columns(self) -> list[str]:
        return [self.field]

    def sample(self, row: dict[str, Any]) -> Segments:
        return Segments(
            (Segment(text_field(row, self.field), True),), bos=True, eos=True, chunk=True
        )

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Segments:
        return Segments((Segment(text, False),), bos=True, eos=False)
