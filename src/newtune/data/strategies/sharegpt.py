"""Deprecated `type: sharegpt`: from/value conversations, read as chat_template messages."""

from __future__ import annotations

import logging
from typing import Any

from newtune.chat_templates import NAMED_TEMPLATES
from newtune.config.schema import DatasetEntry
from newtune.data.strategies.base import Conversation
from newtune.data.strategies.chat_template import DEFAULT_ROLES, ChatTemplate
from newtune.data.strategies.registry import register
from newtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)
DEPRECATED = (
    "`type: sharegpt` is deprecated (Axolotl removed it); newtune reads it as `type: "
    "chat_template` with `field_messages: conversations` and `message_property_mappings: "
    "{role: from, content: value}`, rendered with the configured `chat_template`. "
    "Write that instead"
)
_warned = False


def warn_deprecated() -> None:
    """Log the sharegpt deprecation warning, once per process."""
    global _warned
    if not _warned:
        _warned = True
        log.warning(DEPRECATED)


@register("sharegpt")
class ShareGPT(ChatTemplate):
    """`conversations: [{from, value}, ...]`; `field_human` / `field_model` name the two roles.

    `conversation:` (a FastChat template name) must be a chat template newtune has
    (chatml, llama3); it is offered as `chat_template` for rendering. A turn with
    `weight: 0` is not trained.
    """


    def __init__(
        self, entry: DatasetEntry, train_on_inputs: bool, style: str | None = None
    ) -> None:
        super().__init__(entry, train_on_inputs, style)
        warn_deprecated()
        self.field_messages = entry.field_messages or "conversations"
        self.detect_keys = not entry.message_property_mappings
        if not entry.roles:
            human, model = entry.field_human or "human", entry.field_model or "gpt"
            self.roles = {**DEFAULT_ROLES, human: "user", model: "assistant"}
        self.chat_template = entry.conversation
        if entry.conversation and entry.conversation not in NAMED_TEMPLATES:
            raise ConfigError(
                f"`conversation: {entry.conversation}` is a FastChat template newtune does not "
                f"have; use one of {', '.join(NAMED_TEMPLATES)}, or remove `conversation` and "
                "set the top-level `chat_template:` (a name, tokenizer_default or jinja)"
            )

    def keys_of(self, first: dict[str, Any]) -> tuple[str, str]:
        """The role and content keys: Axolotl's lenient detection from the first turn."""
        if not self.detect_keys:
            return self.role_key, self.content_key
        role = "role" if "role" in first else "from"
        content = next((k for k in ("text", "content") if k in first), "value")
        return role, content

    def sample(self, row: dict[str, Any]) -> Conversation:
        raw = row.get(self.field_messages)
        if not isinstance(raw, list) or not raw or not isinstance(raw[0], dict):
            raise DataError(
                f"column `{self.field_messages}` must hold a non-empty list of "
                f"{{from, value}} turns, got {type(raw).__name__}"
            )
        messages = self.messages(row, keys=self.keys_of(raw[0]))
        train = tuple(False if isinstance(t, dict) and t.get("weight") == 0 else None for t in raw)
        return Conversation(tuple(messages), train=train if False in train else ())
