"""A user-defined instruction format: `type:` as a mapping of templates and column names."""

from __future__ import annotations

from typing import Any

from newtune.config.schema import DatasetEntry
from newtune.config.schema.formats import USER_DEFINED_KEYS, UserDefinedFormat
from newtune.config.schema.formats import parse_format as _parse
from newtune.data.strategies.base import Segments, as_text, optional_field, prompt_only, text_field
from newtune.data.strategies.instruct import Instruct, PromptStyle
from newtune.data.strategies.registry import register
from newtune.errors import ConfigError


def parse_format(spec: dict[str, Any]) -> UserDefinedFormat:
    """Validate a user-defined format; ConfigError naming the bad key."""
    try:
        return _parse(spec)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@register("user_defined")
class UserDefined(Instruct):
    """Axolotl's user-defined format: [system_format] + format (or no_input_format) + output.

    `type:` is a mapping of the keys, or `type: user_defined` with the same keys on the entry.
    """

    def __init__(
        self, entry: DatasetEntry, train_on_inputs: bool, style: str | None = None
    ) -> None:
        if isinstance(entry.type, dict):
            spec = entry.type
        else:
            spec = {k: getattr(entry, k) for k in USER_DEFINED_KEYS}
        self.spec = parse_format(spec)
        super().__init__(entry, train_on_inputs, style)
        self.instruction_column = self.spec.field_instruction
        self.input_column = self.spec.field_input
        self.output_column = self.spec.field_output

    def prompt_style(self) -> PromptStyle:
        return PromptStyle(self.spec.format, self.spec.no_input_format, self.spec.system_format)

    def required_columns(self) -> list[str]:
        return [self.spec.field_instruction]

    def fields(self, row: dict[str, Any]) -> tuple[str, str, str]:
        return (
            text_field(row, self.spec.field_instruction),
            optional_field(row, self.spec.field_input),
            optional_field(row, self.spec.field_output),
        )

    def row_system(self, row: dict[str, Any]) -> str:
        """The row's system column; when missing or null, `system_prompt`."""
        key = self.spec.field_system
        value = row.get(key)
        return self.spec.system_prompt if value is None else as_text(value, f"column `{key}`")

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Segments:
        return prompt_only(self.build_prompt(text, "", self.spec.system_prompt))
