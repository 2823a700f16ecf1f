"""The one tokenization engine: BOS/EOS, label masks, chat templates and chunking.

Strategies describe a sample (segments or chat messages); this module alone turns a
sample into `input_ids` and `labels` (-100 where no loss is taken).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from newtune.data.strategies.base import Conversation, Sample, Segments
from newtune.errors import DataError

IGNORE_INDEX = -100
EOT_WINDOW = 3  # an end-of-turn token must follow the content within this many tokens
_SENTINEL = "\u2063NEWTUNE_CONTENT\u2063"
_START, _END = "\ue000", "\ue001"  # private-use characters that wrap contents in one render

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedRow:
    """One training row."""

    input_ids: list[int]
    labels: list[int]


class Engine:
    """Tokenizes samples for one tokenizer and chat template."""

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str | None = None,
        roles_to_train: tuple[str, ...] = ("assistant",),
        train_on_eos: str = "turn",
        train_on_inputs: bool = False,
        sequence_len: int | None = None,
    ) -> None:
        self.tok = tokenizer
        self.chat_template = chat_template
        self.roles_to_train = set(roles_to_train)
        self.train_on_eos = train_on_eos
        self.train_on_inputs = train_on_inputs
        self.sequence_len = sequence_len
        self.eos_id = tokenizer.eos_token_id
        self.eot_ids = {self.eos_id} if self.eos_id is not None else set()

    # -- public -----------------------------------------------------------------------------

    def tokenize(self, sample: Sample) -> list[TokenizedRow]:
        """The training rows of a sample (several when a long completion is chunked)."""
        if isinstance(sample, Segments):
            row = self._segments(sample)
            if sample.chunk and self.sequence_len and len(row.input_ids) > self.sequence_len:
                n = self.sequence_len
                return [
                    TokenizedRow(row.input_ids[i : i + n], row.labels[i : i + n])
                    for i in range(0, len(row.input_ids), n)
                ]
            return [row]
        return [self._conversation(sample)]

    def prompt_ids(self, sample: Sample) -> list[int]:
        """Token ids of an inference prompt (no labels, no trailing EOS)."""
        if isinstance(sample, Segments):
            return self._segments(sample).input_ids
        text = self.render(
            list(sample.messages), add_generation_prompt=sample.add_generation_prompt
        )
        return self._encode(text)

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tools: list | None = None,
    ) -> str:
        """Render messages (and tool definitions) with the chat template to text."""
        if self.chat_template is None and not getattr(self.tok, "chat_template", None):
            raise DataError(
                "this tokenizer has no chat template; set `chat_template:` in the config "
                "(e.g. `chat_template: chatml`) to choose one"
            )
        return self.tok.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **({"tools": tools} if tools else {}),
        )

    # -- segments ---------------------------------------------------------------------------

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _segments(self, sample: Segments) -> TokenizedRow:
        ids: list[int] = []
        labels: list[int] = []
        for i, seg in enumerate(sample.segments):
            seg_ids = self._encode(seg.text, special=sample.bos and i == 0)
            if i == 0 and sample.bos and seg_ids and seg_ids[-1] == self.eos_id:
                seg_ids = seg_ids[:-1]  # tokenizers whose post-processor appends EOS
            ids += seg_ids
            labels += seg_ids if seg.label else [IGNORE_INDEX] * len(seg_ids)
        if sample.eos and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
            last_trained = bool(sample.segments) and sample.segments[-1].label
            labels.append(self.eos_id if last_trained else IGNORE_INDEX)
        return TokenizedRow(ids, labels)

    # -- conversations ----------------------------------------------------------------------

    def _conversation(self, conv: Conversation) -> TokenizedRow:
        messages = list(conv.messages)
        tools = getattr(conv, "tools", None)
        text, spans = self._render_with_spans(messages, tools)
        ids, char_to_token = self._encode_with_offsets(text)
        labels = [IGNORE_INDEX] * len(ids)
        last_eot = -1
        for i, msg in enumerate(messages):
            forced = conv.train[i] if i < len(conv.train) else None
            train = (
                forced
                if forced is not None
                else (self.train_on_inputs or msg["role"] in self.roles_to_train)
            )
            if (not train and self.train_on_eos != "all") or spans[i] is None:
                continue
            start, end = char_to_token(*spans[i])
            if train:
                labels[start:end] = ids[start:end]
            eot = self._find_eot(ids, end)
            if eot != -1:
                last_eot = eot
                if self.train_on_eos == "all" or (self.train_on_eos == "turn" and train):
                    labels[eot] = ids[eot]
        if self.train_on_eos == "last" and last_eot != -1:
            labels[last_eot] = ids[last_eot]
        return TokenizedRow(ids, labels)

    def _render_with_spans(
        self, messages: list[dict], tools: list | None
    ) -> tuple[str, list[tuple[int, int] | None]]:
        """The rendered conversation and each message's content span, from two renders.

        Contents are wrapped in private-use marker characters and rendered once; removing
        the markers must give exactly the plain rendering, and the marker positions give
        the spans (linear in the conversation length). Templates that rewrite content (e.g.
        `| trim`) fail that check and fall back to one prefix render per message.
        """
        text = self.render(messages, tools=tools)
        marked_msgs = [
            {**m, "content": f"{_START}{m['content']}{_END}"} if m["content"] else m
            for m in messages
        ]
        marked = self.render(marked_msgs, tools=tools)
        spans: list[tuple[int, int] | None] = []
        plain: list[str] = []
        pos = cursor = 0  # pos: in `marked`; cursor: length of the unmarked text so far
        for m in messages:
            if not m["content"]:
                spans.append(None)
                continue
            start = marked.find(_START, pos)
            end = marked.find(_END, start + 1)
            if start == -1 or end == -1:
                break
            plain.append(marked[pos:start])
            cursor += start - pos
            inner = marked[start + 1 : end]
            spans.append((cursor, cursor + len(inner)))
            plain.append(inner)
            cursor += len(inner)
            pos = end + 1
        plain.append(marked[pos:])
        if len(spans) == len(messages) and "".join(plain) == text:
            return text, spans
        return text, [self._content_span(messages, i, text, tools) for i in range(len(messages))]

    def _content_span(
        self, messages: list[dict], i: int, text: str, tools: list | None = None
    ) -> tuple[int, int] | None:
        """Character span of message i's content, from a render of the prefix (fallback)."""
        content = messages[i]["content"]
        if not content:
            return None
        dummy = [*messages[:i], {**messages[i], "content": _SENTINEL}]
        rendered = self.render(dummy, tools=tools)
        pos = rendered.find(_SENTINEL)
        if pos == -1 or not text.startswith(rendered[:pos]):
            # The template does not render prefixes stably; fall back to searching forward
            # from the end of the previous messages' rendering.
            pos = len(self.render(messages[:i], tools=tools)) if i else 0
            pos = text.find(content.strip(), pos)
            if pos == -1:
                log.warning("message %d: content not found in the rendered template", i)
                return None
            return pos, pos + len(content.strip())
        for candidate in (content, content.strip()):
            at = text.find(candidate, pos)
            if at != -1 and not text[pos:at].strip():
                return at, at + len(candidate)
        log.warning("message %d: the template changed the content; its tokens are not trained", i)
        return None

    def _find_eot(self, ids: list[int], start: int) -> int:
        for j in range(start, min(len(ids), start + EOT_WINDOW + 1)):
            if ids[j] in self.eot_ids:
                return j
        return -1

    def _encode_with_offsets(self, text: str) -> tuple[list[int], Callable[[int, int], tuple]]:
        """Token ids of text and a function from a char span to the token span covering it."""
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            starts = [s for s, _ in enc["offset_mapping"]]
            ends = [e for _, e in enc["offset_mapping"]]

            def span(a: int, b: int) -> tuple[int, int]:
                # tokens overlapping [a, b): the first whose end is past a, up to the last
                # whose start is before b
                first, stop = bisect.bisect_right(ends, a), bisect.bisect_left(starts, b)
                return (first, stop) if stop > first else (0, 0)

            return ids, span
        ids = self._encode(text)

        def prefix_span(a: int, b: int) -> tuple[int, int]:
            return len(self._encode(text[:a])), len(self._encode(text[:b]))

        return ids, prefix_span
