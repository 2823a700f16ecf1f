"""Conversations rendered with a chat template (OpenAI-style messages lists)."""

from __future__ import annotations

from typing import Any

from newtune.data.strategies.base import Conversation, Strategy
from newtune.data.strategies.registry import register
from newtune.errors import DataError

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

    def __init__(self, entry, train_on_inputs: bool) -> None:  # noqa: ANN001
        super().__init__(entry, train_on_inputs)
        self.field_messages = entry.field_messages or "messages"
        mapping = entry.message_property_mappings or {}
        self.role_key = mapping.get("role", "role")
        self.content_key = mapping.get("content", "content")
        if entry.roles:
            self.roles = {src: dst for dst, srcs in entry.roles.items() for src in srcs}
        else:
            self.roles = dict(DEFAULT_ROLES)

    def required_columns(self) -> list[str]:
        return [self.field_messages]

    def sample(self, row: dict[str, Any]) -> Conversation:
        raw = row[self.field_messages]
        if not isinstance(raw, list) or not raw:
            raise DataError(
                f"column `{self.field_messages}` must hold a non-empty list of messages, "
                f"got {type(raw).__name__}"
            )
        messages = []
        for i, msg in enumerate(raw):
            if not isinstance(msg, dict) or self.role_key not in msg or self.content_key not in msg:
                keys = list(msg) if isinstance(msg, dict) else type(msg).__name__
                raise DataError(
                    f"message {i} of `{self.field_messages}` needs keys `{self.role_key}` and "
                    f"`{self.content_key}` but has {keys}; set `message_property_mappings` "
                    "(e.g. {role: from, content: value}) to name them"
                )
            role = self.roles.get(msg[self.role_key], msg[self.role_key])
            content = msg[self.content_key]
            messages.append({"role": role, "content": "" if content is None else str(content)})
        return Conversation(tuple(messages))

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Conversation:
        messages = [*(history or []), {"role": "user", "content": text}]
        return Conversation(tuple(messages), add_generation_prompt=True)
