"""Conversations rendered with a chat template (OpenAI-style messages lists)."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from newtune.config.schema import DatasetEntry
from newtune.data.strategies.base import Conversation, Strategy, as_text
from newtune.data.strategies.registry import register
from newtune.errors import DataError


def tools_of(row: dict[str, Any], column: str = "tools") -> list[dict[str, Any]] | None:
    """Tool definitions in a row's column (JSON schemas, or their JSON text); None when absent."""
    tools = row.get(column)
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise DataError(f"column `{column}` is not valid JSON: {exc}") from None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"column `{column}` must hold a list of tool definitions (JSON objects)")
    return tools


def parts_of(content: list[Any], what: str) -> list[dict[str, Any]]:
    """A content that is a list of parts (`{type: text, text}`, `{type: image, ...}`), checked."""
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "image", "image_url"):
            raise DataError(
                f"{what} part {j} must be `{{type: text, text: ...}}` or `{{type: image, "
                f"path|url|base64|image: ...}}`, got {str(part)[:80]}"
            )
        out.append({k: v for k, v in part.items() if v is not None})
    return out


DEFAULT_ROLES = {
    "human": "user",
    "user": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
}


@register("chat_template")
class ChatTemplate(Strategy):
    """Map a row's message list onto `role`/`content` dicts; the engine renders and masks."""

    chat: ClassVar[bool] = True
    keep_extra_keys: ClassVar[bool] = False  # pass other message keys (tool_calls, ...) through
    parts: bool = False  # contents may be lists of parts (set for multimodal configs)

    def __init__(
        self, entry: DatasetEntry, train_on_inputs: bool, style: str | None = None
    ) -> None:
        super().__init__(entry, train_on_inputs, style)
        self.field_messages = entry.field_messages or "messages"
        mapping = entry.message_property_mappings or {}
        self.role_key = mapping.get("role", entry.message_field_role or "role")
        self.content_key = mapping.get("content", entry.message_field_content or "content")
        self.training_key = entry.message_field_training
        self.tools_column = entry.field_tools or "tools"
        # Axolotl maps template_thinking_key <- field_thinking (both default reasoning_content)
        # when message_property_mappings is not given; an explicit key always applies
        explicit = entry.field_thinking or entry.template_thinking_key
        self.thinking: tuple[str, str] | None = (
            (
                entry.field_thinking or "reasoning_content",
                entry.template_thinking_key or "reasoning_content",
            )
            if explicit or not mapping
            else None
        )
        if entry.roles:
            self.roles = {src: dst for dst, srcs in entry.roles.items() for src in srcs}
        else:
            self.roles = dict(DEFAULT_ROLES)

    def required_columns(self) -> list[str]:
        return [self.field_messages]

    def messages(
        self,
        row: dict[str, Any],
        column: str | None = None,
        keys: tuple[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """The row's messages as role/content dicts.

        `column` defaults to field_messages, `keys` (role key, content key) to the mapping.
        """
        column = column or self.field_messages
        role_key, content_key = keys or (self.role_key, self.content_key)
        raw = row.get(column)
        if not isinstance(raw, list) or not raw:
            raise DataError(
                f"column `{column}` must hold a non-empty list of messages, "
                f"got {type(raw).__name__}"
            )
        messages = []
        for i, msg in enumerate(raw):
            if not isinstance(msg, dict) or role_key not in msg or content_key not in msg:
                found = list(msg) if isinstance(msg, dict) else type(msg).__name__
                raise DataError(
                    f"message {i} of `{column}` needs keys `{role_key}` and "
                    f"`{content_key}` but has {found}; set `message_property_mappings` "
                    "(e.g. {role: from, content: value}) to name them"
                )
            role = self.roles.get(msg[role_key], msg[role_key])
            content = msg[content_key]
            what = f"message {i} of `{column}`: `{content_key}`"
            if self.parts and isinstance(content, list):  # a multimodal config: text/image parts
                out = {"role": role, "content": parts_of(content, what)}
            else:
                out = {"role": role, "content": "" if content is None else as_text(content, what)}
            if self.thinking and msg.get(self.thinking[0]) is not None:
                trace = msg[self.thinking[0]]
                out[self.thinking[1]] = as_text(
                    trace, f"message {i} of `{column}`: `{self.thinking[0]}`"
                )
            if self.keep_extra_keys:
                extra = {
                    k: v
                    for k, v in msg.items()
                    if k not in (role_key, content_key) and v is not None
                }
                out = {**extra, **out}
            messages.append(out)
        return messages

    def sample(self, row: dict[str, Any]) -> Conversation:
        raw = row.get(self.field_messages) or []
        messages = self.messages(row)
        train: list[bool | None] = [None] * len(messages)
        if self.training_key:
            train = [
                None
                if not isinstance(m, dict) or m.get(self.training_key) is None
                else bool(m[self.training_key])
                for m in raw
            ]
        if self.entry.drop_system_message and messages and messages[0]["role"] == "system":
            messages, train = messages[1:], train[1:]
        tools = tools_of(row, self.tools_column) if self.tools_column in row else None
        thinking = self.thinking[1] if self.thinking else None
        return Conversation(tuple(messages), tuple(train), tools=tools, thinking_key=thinking)

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Conversation:
        messages = [*(history or []), {"role": "user", "content": text}]
        return Conversation(tuple(messages), add_generation_prompt=True)
