"""Metharme (Pygmalion): the prompt column verbatim, the generation, then three EOS tokens."""

from __future__ import annotations

from typing import Any

from newtune.data.strategies.base import Segment, Segments, Strategy, prompt_only, text_field
from newtune.data.strategies.registry import register

EOS_TOKENS = 3


@register("metharme")
class Metharme(Strategy):
    """prompt (masked unless train_on_inputs) + generation + 3 x EOS (trained)."""


    def required_columns(self) -> list[str]:
        return ["prompt", "generation"]

    def sample(self, row: dict[str, Any]) -> Segments:
        return Segments(
            (
                Segment(text_field(row, "prompt"), self.train_on_inputs),
                Segment(text_field(row, "generation"), True),
            ),
            bos=True,
            eos=EOS_TOKENS,
        )

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Segments:
        return prompt_only(text)
