"""TRL's dataset formats: prompt-completion (plain or conversational) and messages (+ tools)."""

from __future__ import annotations

from typing import Any, ClassVar

from newtune.data.strategies.base import Conversation, Sample, prompt_and_response, prompt_only
from newtune.data.strategies.chat_template import ChatTemplate, tools_of
from newtune.data.strategies.registry import register
from newtune.errors import DataError


@register("messages")
class Messages(ChatTemplate):
    """TRL's conversational format: `messages` (role, content, tool_calls, ...) and `tools`."""

    keep_extra_keys = True

    def sample(self, row: dict[str, Any]) -> Conversation:
        # a message's reasoning trace (field_thinking, default reasoning_content) is trained
        # with its content, as under `type: chat_template`
        thinking = self.thinking[1] if self.thinking else None
        return Conversation(
            tuple(self.messages(row)),
            tools=tools_of(row, self.tools_column),
            thinking_key=thinking,
        )


@register("prompt_completion")
class PromptCompletion(ChatTemplate):
    """TRL's prompt-completion format; the completion is trained, the prompt only with
    train_on_inputs.

    Plain (two strings): BOS + prompt + completion + EOS, as TRL tokenizes it. Conversational
    (two message lists): the messages rendered with the chat template, completion messages
    trained. Inference prompts are plain text, or a chat conversation when a history is given.
    """

    chat: ClassVar[bool] = False
    keep_extra_keys = True

    def required_columns(self) -> list[str]:
        return ["prompt", "completion"]

    def sample(self, row: dict[str, Any]) -> Sample:
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return prompt_and_response(prompt, completion, self.train_on_inputs)
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = self.messages(row, "prompt") + self.messages(row, "completion")
            train = (self.train_on_inputs,) * len(prompt) + (True,) * len(completion)
            return Conversation(
                tuple(messages), train=train, tools=tools_of(row, self.tools_column)
            )
        raise DataError(
            "columns `prompt` and `completion` must both be strings (plain) or both be "
            f"lists of messages (conversational), got {type(prompt).__name__} and "
            f"{type(completion).__name__}"
        )

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Sample:
        if history is None:
            return prompt_only(text)
        return super().prompt(text, history)
