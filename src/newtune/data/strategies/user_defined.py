"""A user-defined instruction format: `type:` as a mapping of templates and column names."""

from __future__ import annotations

import difflib
import string
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from newtune.config.schema import DatasetEntry
from newtune.data.strategies.base import Segments, optional_field, prompt_only, text_field
from newtune.data.strategies.instruct import Instruct, PromptStyle
from newtune.data.strategies.registry import register
from newtune.errors import ConfigError


class UserDefinedFormat(BaseModel):
    """The keys of a `type:` mapping (Axolotl's defaults)."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str = ""
    system_format: str = "{system}"
    field_system: str = "system"
    field_instruction: str = "instruction"
    field_input: str = "input"
    field_output: str = "output"
    format: str = "{instruction} {input} "
    no_input_format: str = "{instruction} "


PLACEHOLDERS = {
    "format": {"instruction", "input"},
    "no_input_format": {"instruction"},
    "system_format": {"system"},
}
USER_DEFINED_KEYS = frozenset(UserDefinedFormat.model_fields)


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def parse_format(spec: dict[str, Any]) -> UserDefinedFormat:
    """Validate a user-defined format; ConfigError naming the bad key."""
    given = {k: v for k, v in spec.items() if v is not None}  # null keeps the default
    unknown = sorted(set(given) - USER_DEFINED_KEYS)
    if unknown:
        hints = []
        for key in unknown:
            match = difflib.get_close_matches(key, sorted(USER_DEFINED_KEYS), n=1, cutoff=0.6)
            hints.append(f"`{key}`" + (f" (did you mean `{match[0]}`?)" if match else ""))
        raise ConfigError(
            f"unknown key(s) {', '.join(hints)}; a user-defined format takes "
            f"{', '.join(sorted(USER_DEFINED_KEYS))}"
        )
    try:
        fmt = UserDefinedFormat.model_validate(given)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"`{first['loc'][0]}`: {first['msg']}") from None
    for key, allowed in PLACEHOLDERS.items():
        template = getattr(fmt, key)
        try:
            bad = sorted(_placeholders(template) - allowed)
        except ValueError as exc:
            raise ConfigError(f"`{key}: {template!r}` is not a valid template ({exc})") from None
        if bad:
            raise ConfigError(
                f"`{key}: {template!r}` uses {', '.join('{' + b + '}' for b in bad)}; "
                f"it may only use {', '.join('{' + a + '}' for a in sorted(allowed))} "
                "(write {{ and }} for literal braces)"
            )
    return fmt


@register("user_defined")
class UserDefined(Instruct):
    """Axolotl's user-defined format: [system_format] + format (or no_input_format) + output.

    `type:` is a mapping of the keys, or `type: user_defined` with the same keys on the entry.
    """

    entry_keys: ClassVar[frozenset[str] | None] = USER_DEFINED_KEYS

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
        value = row.get(self.spec.field_system)
        return self.spec.system_prompt if value is None else str(value)

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Segments:
        return prompt_only(self.build_prompt(text, "", self.spec.system_prompt))
