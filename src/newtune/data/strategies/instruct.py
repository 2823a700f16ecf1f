"""Axolotl's instruction prompter: an optional system text, a turn template, then the response.

The prompt (system + turn) is masked unless train_on_inputs; the response is trained and
followed by EOS. The texts below are Axolotl's, character for character.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from newtune.config.schema import DatasetEntry
from newtune.data.strategies.base import (
    Segments,
    Strategy,
    optional_field,
    prompt_and_response,
    prompt_only,
    text_field,
)
from newtune.errors import ConfigError


@dataclass(frozen=True)
class PromptStyle:
    """How a prompt style lays out a turn with input, a turn without input, and the system text."""

    turn: str  # {instruction} and {input}
    turn_no_input: str  # {instruction}
    system: str  # {system}


STYLES: dict[str, PromptStyle] = {
    "instruct": PromptStyle(
        turn="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        turn_no_input="### Instruction:\n{instruction}\n\n### Response:\n",
        system="{system}\n\n",
    ),
    "chat": PromptStyle(
        turn="USER: {instruction}\n{input}\nASSISTANT:",
        turn_no_input="USER: {instruction}\nASSISTANT:",
        system="SYSTEM: {system}\n",
    ),
    "chatml": PromptStyle(
        turn="<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
        turn_no_input="<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
        system="<|im_start|>system\n{system}<|im_end|>\n",
    ),
    "phi": PromptStyle(
        turn="<|user|>\n{instruction}<|end|>{input}<|assistant|>",
        turn_no_input="<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
        system="<|system|>\n{system}<|end|>\n",
    ),
}

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def check_style(style: str, key: str) -> str:
    """`style` when it is a known prompt style; a ConfigError naming the entry `key` otherwise."""
    if style not in STYLES:
        raise ConfigError(f"`{key}: {style}` is not a prompt style; use one of {', '.join(STYLES)}")
    return style


class Instruct(Strategy):
    """An instruction row (instruction, optional input, output) laid out by a prompt style.

    Subclasses set the columns, the system texts and the default style; `type: name:style`
    picks another style where `styles` allows it.
    """

    default_style: ClassVar[str] = "instruct"
    system_prompt: ClassVar[str] = ALPACA_SYSTEM  # used when the row has an input
    system_no_input_prompt: ClassVar[str] = ALPACA_SYSTEM_NO_INPUT
    instruction_column: ClassVar[str] = "instruction"
    input_column: ClassVar[str | None] = "input"  # optional column; None: never an input
    output_column: ClassVar[str] = "output"
    system_column: ClassVar[str | None] = None  # the system text comes from this column

    def __init__(
        self, entry: DatasetEntry, train_on_inputs: bool, style: str | None = None
    ) -> None:
        super().__init__(entry, train_on_inputs, style)
        self.layout = self.prompt_style()

    def prompt_style(self) -> PromptStyle:
        """The layout of this format's prompts."""
        return STYLES[self.style or self.default_style]

    def required_columns(self) -> list[str]:
        columns = [self.instruction_column, self.output_column]
        return [*columns, self.system_column] if self.system_column else columns

    def fields(self, row: dict[str, Any]) -> tuple[str, str, str]:
        """(instruction, input, response) of a row; input is "" when there is none."""
        input_text = optional_field(row, self.input_column) if self.input_column else ""
        return (
            text_field(row, self.instruction_column),
            input_text,
            text_field(row, self.output_column),
        )

    def row_system(self, row: dict[str, Any]) -> str | None:
        """The row's own system text; None to use the format's system prompts."""
        return optional_field(row, self.system_column) if self.system_column else None

    def build_prompt(self, instruction: str, input_text: str, system: str | None = None) -> str:
        """The prompt text: [system] + turn (the turn with input when input_text is set)."""
        if system is None:
            system = self.system_prompt if input_text else self.system_no_input_prompt
        head = self.layout.system.format(system=system) if system and self.layout.system else ""
        if input_text:
            return head + self.layout.turn.format(instruction=instruction, input=input_text)
        return head + self.layout.turn_no_input.format(instruction=instruction)

    def sample(self, row: dict[str, Any]) -> Segments:
        instruction, input_text, response = self.fields(row)
        prompt = self.build_prompt(instruction, input_text, self.row_system(row))
        return prompt_and_response(prompt, response, self.train_on_inputs)

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Segments:
        """The prompt of `text` as the instruction, with no input (single turn: no history)."""
        system = "" if self.system_column else None
        return prompt_only(self.build_prompt(text, "", system))
