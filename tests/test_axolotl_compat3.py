"""Axolotl keys of issue 16, part 3: reasoning traces, data order, kernels, quantization."""

from __future__ import annotations

from typing import Any

import pytest

from newtune.config.schema import DatasetEntry
from newtune.data.strategies import get_strategy
from newtune.data.tokenize import IGNORE_INDEX, Engine

THINK = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get(KEY) %}<think>{{ m[KEY] }}</think>{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def _engine(tok: Any, template: str) -> Engine:
    return Engine(tok, chat_template=template, roles_to_train=("assistant",))


def _trained(ids: list[int], labels: list[int], tok: Any) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


ROW = {
    "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "thinking": "greet back"},
    ]
}


def test_field_thinking_reaches_the_template_under_template_thinking_key(chat_tokenizer) -> None:
    """gpt-oss's layout: the row's `thinking` is rendered by a template reading `thinking`;
    the trace's tokens are in input_ids and trained with the assistant's content."""
    tok = chat_tokenizer
    entry = DatasetEntry(
        path="x", type="chat_template", field_thinking="thinking", template_thinking_key="thinking"
    )
    conv = get_strategy(entry, 0, False).sample(ROW)
    assert conv.messages[1] == {"role": "assistant", "content": "hello", "thinking": "greet back"}
    assert conv.thinking_key == "thinking"
    template = THINK.replace("KEY", "'thinking'")
    row = _engine(tok, template).tokenize(conv)[0]
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>greet back</think>hello<|im_end|>\n"
    assert row.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert _trained(row.input_ids, row.labels, tok) == "greet back</think>hello<|im_end|>"


def test_thinking_defaults_to_reasoning_content(chat_tokenizer) -> None:
    """Axolotl's defaults: reasoning_content in the data, reasoning_content in the template."""
    tok = chat_tokenizer
    row = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "reasoning_content": "why"},
        ]
    }
    conv = get_strategy(DatasetEntry(path="x", type="chat_template"), 0, False).sample(row)
    assert conv.messages[1]["reasoning_content"] == "why"
    out = _engine(tok, THINK.replace("KEY", "'reasoning_content'")).tokenize(conv)[0]
    assert "<think>why</think>hello" in tok.decode(out.input_ids)
    # a data key under another name, with the template's key named: mapped across
    entry = DatasetEntry(path="x", type="chat_template", field_thinking="thinking")
    conv = get_strategy(entry, 0, False).sample(ROW)
    assert conv.messages[1]["reasoning_content"] == "greet back"
    assert "thinking" not in conv.messages[1]


def test_without_thinking_keys_a_mapped_dataset_keeps_role_and_content_only() -> None:
    """Axolotl adds the thinking mapping only when message_property_mappings is not given."""
    entry = DatasetEntry(
        path="x",
        type="chat_template",
        message_property_mappings={"role": "role", "content": "content"},
    )
    row = {"messages": [{"role": "user", "content": "a", "reasoning_content": "r"}]}
    conv = get_strategy(entry, 0, False).sample(row)
    assert conv.messages == ({"role": "user", "content": "a"},)
    assert conv.thinking_key is None
