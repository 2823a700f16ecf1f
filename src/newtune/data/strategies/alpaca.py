"""The alpaca instruction format (instruction, input, output)."""

from __future__ import annotations

from typing import Any

from newtune.data.strategies.base import Segment, Segments, Strategy, text_field
from newtune.data.strategies.registry import register

SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
)
SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
TURN_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TURN_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def alpaca_prompt(instruction: str, input_text: str | None) -> str:
    """Axolotl's standard alpaca prompt; an empty input uses the no-input variant."""
    if input_text:
        return SYSTEM_WITH_INPUT + TURN_WITH_INPUT.format(instruction=instruction, input=input_text)
    return SYSTEM_NO_INPUT + TURN_NO_INPUT.format(instruction=instruction)


@register("alpaca")
class Alpaca(Strategy):
    """Prompt (masked unless train_on_inputs) + response + EOS."""

    def required_columns(self) -> list[str]:
        return ["instruction", "output"]

    def sample(self, row: dict[str, Any]) -> Segments:
        prompt = alpaca_prompt(text_field(row, "instruction"), row.get("input"))
        return Segments(
            (Segment(prompt, self.train_on_inputs), Segment(text_field(row, "output"), True)),
            bos=True,
            eos=True,
        )

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Segments:
        return Segments((Segment(alpaca_prompt(text, None), False),), bos=True, eos=False)
