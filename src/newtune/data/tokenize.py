"""The one tokenization engine: BOS/EOS, label masks, chat templates and chunking.

Strategies describe a sample (segments or chat messages); this module alone turns a
sample into `input_ids` and `labels` (-100 where no loss is taken).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from newtune.chat_templates import content_only_printed
from newtune.data.strategies.base import (
    Conversation,
    Messages,
    Preference,
    Render,
    Sample,
    Segments,
    Unpaired,
)
from newtune.errors import DataError

IGNORE_INDEX = -100
SKELETON_CACHE = 4096  # conversation shapes whose placeholder render is kept
EOT_WINDOW = 3  # an end-of-turn token must follow the content within this many tokens
_SENTINEL = "\u2063NEWTUNE_CONTENT\u2063"
_START, _END = "\ue000", "\ue001"  # private-use characters that wrap contents in one render

log = logging.getLogger(__name__)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a block; its previous state returns, even on errors.

    A batch allocates many small objects and frees none of them in cycles: pausing the
    collector saves its repeated scans of everything alive.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class TokenizedRow:
    """One training row."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class PairRow:
    """A preference row in TRL 1.x's columns: completion ids follow the prompt's."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class UnpairedRow:
    """A KTO row in TRL 1.x's columns."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool


@dataclass(frozen=True)
class RewardRow:
    """A reward-model row: the two full sequences (and the pair's margin, if any)."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None


@dataclass(frozen=True)
class _Plan:
    """Texts to encode for one preference sample: the prompt alone (None for reward rows)
    and prompt+completion per completion; `special`: with the tokenizer's special tokens."""

    prompt: str | None
    full: list[str]
    special: bool


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    """Leading tokens two id lists share (TRL's common_prefix_length)."""
    n = 0
    for a, b in zip(ids, other, strict=False):
        if a != b:
            break
        n += 1
    return n


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
        eot_tokens: tuple[str, ...] = (),
        system_message: str | None = None,
    ) -> None:
        self.tok = tokenizer
        self.system_message = system_message
        self.chat_template = chat_template
        self.roles_to_train = set(roles_to_train)
        self.train_on_eos = train_on_eos
        self.train_on_inputs = train_on_inputs
        self.sequence_len = sequence_len
        self.eos_id = tokenizer.eos_token_id
        self.eot_ids = {self.eos_id} if self.eos_id is not None else set()
        if eot_tokens:
            self.eot_ids = {self._single_token(t) for t in eot_tokens}

    # -- public -----------------------------------------------------------------------------

    def tokenize(self, sample: Sample) -> list[TokenizedRow]:
        """The training rows of a sample (several when a long completion is chunked)."""
        return self.tokenize_many([sample])[0]

    def tokenize_many(self, samples: list[Sample]) -> list[list[TokenizedRow]]:
        """Tokenize a batch of samples with one tokenizer call per kind of text."""
        with gc_paused():
            return self._tokenize_many(samples)

    def _tokenize_many(self, samples: list[Sample]) -> list[list[TokenizedRow]]:
        pieces: list[tuple[str, bool]] = []  # segment texts and whether they get special tokens
        convs: list[Conversation] = []
        for sample in samples:
            if isinstance(sample, Segments):
                pieces += [
                    (seg.text, sample.bos and i == 0) for i, seg in enumerate(sample.segments)
                ]
            else:
                convs.append(self._with_system(sample))
        renders = dict(enumerate(self._render_many_with_spans(convs)))
        for k, conv in enumerate(convs):  # reasoning traces train with their message
            if conv.thinking_key:
                renders[k] = with_thinking(conv, *renders[k])
        encoded = iter(self._encode_pieces(pieces))
        convs = iter(self._encode_conversations([renders[k] for k in sorted(renders)]))
        out: list[list[TokenizedRow]] = []
        for sample in samples:
            if isinstance(sample, Conversation):
                sample = self._with_system(sample)
            if isinstance(sample, Segments):
                row = self._segments(sample, [next(encoded) for _ in sample.segments])
                out.append(self._chunk(row) if sample.chunk else [row])
            else:
                out.append([self._conversation(sample, *next(convs))])
        return out

    def _with_system(self, conv: Conversation) -> Conversation:
        """The conversation with `default_system_message` first when it has no system turn."""
        if not self.system_message or (conv.messages and conv.messages[0].get("role") == "system"):
            return conv
        train = (False, *conv.train) if conv.train else ()
        system = {"role": "system", "content": self.system_message}
        return dataclasses.replace(conv, messages=(system, *conv.messages), train=train)

    def _chunk(self, row: TokenizedRow) -> list[TokenizedRow]:
        n = self.sequence_len
        if not n or len(row.input_ids) <= n:
            return [row]
        return [
            TokenizedRow(row.input_ids[i : i + n], row.labels[i : i + n])
            for i in range(0, len(row.input_ids), n)
        ]

    def _encode_pieces(self, pieces: list[tuple[str, bool]]) -> list[list[int]]:
        """Token ids of each (text, special) piece, in order, batched per special flag."""
        result: list[list[int]] = [[] for _ in pieces]
        for special in (True, False):
            idx = [i for i, (_, sp) in enumerate(pieces) if sp is special]
            if idx:
                enc = self.tok([pieces[i][0] for i in idx], add_special_tokens=special)["input_ids"]
                for i, ids in zip(idx, enc, strict=True):
                    result[i] = list(ids)
        return result

    def prompt_ids(self, sample: Sample) -> list[int]:
        """Token ids of an inference prompt (no labels, no trailing EOS)."""
        if isinstance(sample, Segments):
            return self.tokenize(sample)[0].input_ids
        sample = self._with_system(sample)
        text = self.render(
            list(sample.messages),
            add_generation_prompt=sample.add_generation_prompt,
            tools=getattr(sample, "tools", None),
        )
        return self._encode(text)

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tools: list | None = None,
    ) -> str:
        """Render messages (and tool definitions) with the chat template to text."""
        self._check_template()
        return self.tok.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **({"tools": tools} if tools else {}),
        )

    def _single_token(self, token: str) -> int:
        ids = self._encode(token)
        if len(ids) != 1:
            raise DataError(
                f"eot_tokens: `{token}` is not a single token of this tokenizer (it encodes to "
                f"{len(ids)} tokens); list the template's real end-of-turn token"
            )
        return ids[0]

    def _check_template(self) -> None:
        if self.chat_template is None and not getattr(self.tok, "chat_template", None):
            raise DataError(
                "this tokenizer has no chat template; set `chat_template:` in the config "
                "(e.g. `chat_template: chatml`) to choose one"
            )

    # -- preference rows ----------------------------------------------------------------------
    # TRL 1.16's layouts (DPOTrainer, KTOTrainer, RewardTrainer `_prepare_dataset`): a text row
    # gets the EOS token's text appended to each completion unless it ends with it, and is
    # tokenized with the tokenizer's special tokens (BOS); a conversation is rendered by the chat
    # template (the prompt with the generation prompt) and tokenized without them. The prompt
    # is tokenized alone; a completion is the ids of prompt+completion after the longest prefix
    # shared with the prompt's ids (the shortest over a row's completions).

    def tokenize_preference(self, samples: list[Preference]) -> list[PairRow]:
        """DPO/ORPO rows: prompt_ids, chosen_ids, rejected_ids."""
        plans = [self._plan(s.prompt, (s.chosen, s.rejected), s.render, s.tools) for s in samples]
        out = []
        for prompt, (chosen, rejected) in self._split_prompts(plans):
            out.append(PairRow(prompt, chosen, rejected))
        return out

    def tokenize_unpaired(self, samples: list[Unpaired | Preference]) -> list[UnpairedRow]:
        """KTO rows: prompt_ids, completion_ids, label; a Preference gives two rows, its chosen
        (label true) then its rejected (label false) completion, as TRL unpairs them."""
        items: list[Unpaired] = []
        for s in samples:
            if isinstance(s, Preference):
                items.append(Unpaired(s.prompt, s.chosen, True, s.render, s.tools))
                items.append(Unpaired(s.prompt, s.rejected, False, s.render, s.tools))
            else:
                items.append(s)
        plans = [self._plan(u.prompt, (u.completion,), u.render, u.tools) for u in items]
        return [
            UnpairedRow(prompt, completion, u.label)
            for u, (prompt, (completion,)) in zip(items, self._split_prompts(plans), strict=True)
        ]

    def tokenize_reward(self, samples: list[Preference]) -> list[RewardRow]:
        """Reward rows: the full chosen and rejected sequences (prompt + completion)."""
        plans = [
            dataclasses.replace(
                self._plan(s.prompt, (s.chosen, s.rejected), s.render, s.tools), prompt=None
            )
            for s in samples
        ]
        encoded = iter(self._encode_plans(plans))
        return [RewardRow(*next(encoded)[1], margin=s.margin) for s in samples]

    def _split_prompts(self, plans: list[_Plan]) -> list[tuple[list[int], list[list[int]]]]:
        """(prompt ids, completion ids per completion) of each plan."""
        out = []
        for prompt, fulls in self._encode_plans(plans):
            n = min(common_prefix_length(prompt, f) for f in fulls)
            out.append((prompt[:n], [f[n:] for f in fulls]))
        return out

    def _encode_plans(self, plans: list[_Plan]) -> list[tuple[list[int], list[list[int]]]]:
        """Encode every text of the plans, batched per special-token flag."""
        pieces = []
        for plan in plans:
            if plan.prompt is not None:
                pieces.append((plan.prompt, plan.special))
            pieces += [(text, plan.special) for text in plan.full]
        encoded = iter(self._encode_pieces(pieces))
        out = []
        for plan in plans:
            prompt = next(encoded) if plan.prompt is not None else []
            out.append((prompt, [next(encoded) for _ in plan.full]))
        return out

    def _plan(
        self,
        prompt: str | Messages,
        completions: tuple[str | Messages, ...],
        render: Render,
        tools: list | None,
    ) -> _Plan:
        """The texts one preference sample is tokenized from."""
        if isinstance(prompt, str):
            if not all(isinstance(c, str) for c in completions):
                raise DataError("the prompt is text but a completion is a message list")
            texts = [self._with_eos(str(c)) for c in completions]
            return _Plan(prompt, [prompt + c for c in texts], special=True)
        if any(isinstance(c, str) for c in completions):
            raise DataError("the prompt is a message list but a completion is text")
        messages = self._prompt_messages(prompt)
        if render == "chat":
            return _Plan(
                self.render(messages, add_generation_prompt=True, tools=tools),
                [self.render([*messages, *c], tools=tools) for c in completions],  # type: ignore[misc]
                special=False,
            )
        prompt_text = self.render(messages, add_generation_prompt=True)
        if render == "dpo_text":
            texts = [self._axolotl_dpo_completion(c[-1]) for c in completions]  # type: ignore[index]
        else:  # orpo_text: the full render after the prompt's characters
            texts = [
                self.render([*messages, *c])[len(prompt_text) :]  # type: ignore[misc]
                for c in completions
            ]
        return self._plan(prompt_text, tuple(texts), "chat", None)

    def _axolotl_dpo_completion(self, message: dict[str, Any]) -> str:
        """Axolotl's DPO chat_template completion: the render of [dummy user, message] from
        the first occurrence of the content on, right-stripped."""
        dummy = {"role": "user", "content": "[[dummy_message]]"}
        rendered = self.render([dummy, message])
        return rendered[rendered.find(message["content"]) :].rstrip()

    def _with_eos(self, text: str) -> str:
        eos = self.tok.eos_token
        return text if not eos or text.endswith(eos) else text + eos

    def _prompt_messages(self, prompt: Messages) -> list[dict[str, Any]]:
        """The prompt messages, `default_system_message` first when they have no system turn."""
        messages = list(prompt)
        if self.system_message and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": self.system_message})
        return messages

    # -- segments ---------------------------------------------------------------------------

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _segments(self, sample: Segments, encoded: list[list[int]]) -> TokenizedRow:
        ids: list[int] = []
        labels: list[int] = []
        for i, (seg, seg_ids) in enumerate(zip(sample.segments, encoded, strict=True)):
            if i == 0 and sample.bos and seg_ids and seg_ids[-1] == self.eos_id:
                seg_ids = seg_ids[:-1]  # tokenizers whose post-processor appends EOS
            ids += seg_ids
            labels += seg_ids if seg.label else [IGNORE_INDEX] * len(seg_ids)
        wanted = int(sample.eos)  # True -> 1; metharme asks for more
        if wanted and self.eos_id is not None:
            missing = wanted - (1 if ids and ids[-1] == self.eos_id else 0)
            last_trained = bool(sample.segments) and sample.segments[-1].label
            ids += [self.eos_id] * missing
            labels += [self.eos_id if last_trained else IGNORE_INDEX] * missing
        return TokenizedRow(ids, labels)

    # -- conversations ----------------------------------------------------------------------

    def _encode_conversations(self, renders: list[tuple[str, list]]) -> list[tuple]:
        """(ids, char span -> token span, content spans) per rendered conversation."""
        if not renders:
            return []
        texts = [text for text, _ in renders]
        if not getattr(self.tok, "is_fast", False):
            return [
                (*self._encode_with_offsets(t), spans)
                for t, (_, spans) in zip(texts, renders, strict=True)
            ]
        out: list[tuple | None] = [None] * len(texts)
        if self._byte_lengths is not None:
            encoded = self.tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            for i, (text, enc) in enumerate(zip(texts, encoded, strict=True)):
                finder = _byte_span_finder(text, enc.ids, self._byte_lengths, renders[i][1])
                if finder is not None:
                    out[i] = (enc.ids, finder, renders[i][1])
        rest = [i for i, row in enumerate(out) if row is None]
        if rest:
            enc = self.tok(
                [texts[i] for i in rest], add_special_tokens=False, return_offsets_mapping=True
            )
            for i, ids, offsets in zip(rest, enc["input_ids"], enc["offset_mapping"], strict=True):
                out[i] = (list(ids), _span_finder(offsets), renders[i][1])
        return out  # type: ignore[return-value]

    @functools.cached_property
    def _byte_lengths(self) -> np.ndarray | None:
        """Bytes per token id, for byte-level BPE tokenizers (token spans without offsets).

        In a byte-level BPE vocabulary every character of a token stands for one byte, so a
        token's length is its byte count; added tokens count their UTF-8 bytes. Each row is
        checked (the lengths must add up to the text's bytes) and falls back to offsets if not.
        """
        backend = getattr(self.tok, "backend_tokenizer", None)
        if (
            backend is None
            or backend.normalizer is not None
            or "ByteLevel" not in repr(backend.pre_tokenizer)
            or type(backend.model).__name__ != "BPE"
            or not hasattr(backend, "encode_batch_fast")
        ):
            return None
        vocab = backend.get_vocab(with_added_tokens=True)
        lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
        for token, idx in vocab.items():
            lengths[idx] = len(token)
        for idx, added in backend.get_added_tokens_decoder().items():
            lengths[idx] = len(added.content.encode("utf-8"))
        return lengths

    def _conversation(
        self, conv: Conversation, ids: list[int], char_to_token: Callable, spans: list
    ) -> TokenizedRow:
        messages = list(conv.messages)
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

    def _render_many(self, conversations: list[list[dict]], tools: list) -> list[str]:
        """Render many conversations; one batched template call when none has tools."""
        if any(tools) or len(conversations) < 2:
            return [self.render(c, tools=t) for c, t in zip(conversations, tools, strict=True)]
        self._check_template()
        return list(
            self.tok.apply_chat_template(
                conversations, chat_template=self.chat_template, tokenize=False
            )
        )

    def _render_many_with_spans(
        self, convs: list[Conversation]
    ) -> list[tuple[str, list[tuple[int, int] | None]]]:
        """Each conversation's text and content spans: from a cached skeleton when the
        template only prints contents, else from marked (and plain) renders."""
        out: list[tuple[str, list] | None] = [None] * len(convs)
        if self._single_render:
            for i, conv in enumerate(convs):
                out[i] = self._from_skeleton(conv)
        rest = [i for i, r in enumerate(out) if r is None]
        for i, rendered in zip(rest, self._render_marked([convs[i] for i in rest]), strict=True):
            out[i] = rendered
        return out  # type: ignore[return-value]

    def _from_skeleton(self, conv: Conversation) -> tuple[str, list] | None:
        """Text and spans by filling contents into the rendering of the conversation's shape.

        A template that only prints contents renders the same text around them whatever
        they are, so conversations of one shape (roles and every field but the content,
        which contents are empty, the tools) share one render with numbered placeholders;
        the contents are then joined in. None when this does not apply to `conv`.
        """
        messages = conv.messages
        tools = getattr(conv, "tools", None)
        contents = [m["content"] for m in messages]
        if any(not isinstance(c, str) or _START in c or _END in c for c in contents):
            return None
        try:
            key = json.dumps(
                [
                    [[k, v] for k, v in m.items() if k != "content"] + [bool(m["content"])]
                    for m in messages
                ]
                + [tools],
                sort_keys=True,
            )
        except (TypeError, ValueError):
            return None
        if key not in self._skeletons:
            if len(self._skeletons) >= SKELETON_CACHE:
                self._skeletons.clear()
            self._skeletons[key] = self._skeleton(list(messages), tools)
        skeleton = self._skeletons[key]
        if skeleton is None:
            return None
        literals, order = skeleton
        spans: list[tuple[int, int] | None] = [None] * len(messages)
        parts = [literals[0]]
        at = len(literals[0])
        for idx, literal in zip(order, literals[1:], strict=True):
            text = contents[idx]
            spans[idx] = (at, at + len(text))
            parts += (text, literal)
            at += len(text) + len(literal)
        return "".join(parts), spans

    def _skeleton(self, messages: list[dict], tools: list | None) -> tuple | None:
        """(literal texts, message index of each gap) of a placeholder render, or None."""
        shaped = [
            {**m, "content": f"{_START}{i}{_END}"} if m["content"] else m
            for i, m in enumerate(messages)
        ]
        rendered = self._render_many([shaped], [tools])[0]
        pieces = re.split(f"{_START}(\\d+){_END}", rendered)
        literals, order = pieces[0::2], [int(x) for x in pieces[1::2]]
        if len(set(order)) != len(order) or any(_START in t or _END in t for t in literals):
            return None  # a content printed twice, or a marker mangled: use full renders
        return literals, order

    @functools.cached_property
    def _skeletons(self) -> dict[str, tuple | None]:
        return {}

    def _render_marked(
        self, convs: list[Conversation]
    ) -> list[tuple[str, list[tuple[int, int] | None]]]:
        """Each conversation's text and content spans, from two (batched) renders.

        Contents are wrapped in private-use marker characters and rendered once; removing
        the markers must give exactly the plain rendering, and the marker positions give
        the spans (linear in the conversation length). Templates that rewrite content (e.g.
        `| trim`) fail that check and fall back to one prefix render per message.
        """
        if not convs:
            return []
        messages = [list(c.messages) for c in convs]
        tools = [getattr(c, "tools", None) for c in convs]
        marked = [
            [{**m, "content": f"{_START}{m['content']}{_END}"} if m["content"] else m for m in ms]
            for ms in messages
        ]
        marked_texts = self._render_many(marked, tools)
        if self._single_render:
            return [
                self._spans(ms, None, mtext, tool)
                for ms, mtext, tool in zip(messages, marked_texts, tools, strict=True)
            ]
        texts = self._render_many(messages, tools)
        return [
            self._spans(ms, text, mtext, tool)
            for ms, text, mtext, tool in zip(messages, texts, marked_texts, tools, strict=True)
        ]

    @functools.cached_property
    def _single_render(self) -> bool:
        """Whether one marked render suffices (the template only prints contents)."""
        template = self.chat_template or getattr(self.tok, "chat_template", None)
        return isinstance(template, str) and content_only_printed(template)

    def _spans(
        self, messages: list[dict], text: str | None, marked: str, tools: list | None
    ) -> tuple[str, list[tuple[int, int] | None]]:
        """Content spans from the marked rendering, checked against the plain one if given."""
        spans: list[tuple[int, int] | None] = []
        parts = marked.split(_START)
        plain = [parts[0]]
        cursor = len(parts[0])  # length of the unmarked text so far
        contents = iter(parts[1:])
        complete = len(parts) - 1 == sum(1 for m in messages if m["content"])
        for m in messages if complete else ():
            if not m["content"]:
                spans.append(None)
                continue
            inner, *after = next(contents).split(_END)
            if len(after) != 1 or inner != m["content"]:
                complete = False  # a marker lost, repeated, or a content moved or rewritten
                break
            spans.append((cursor, cursor + len(inner)))
            plain += (inner, after[0])
            cursor += len(inner) + len(after[0])
        unmarked = "".join(plain)
        if complete and (text is None or unmarked == text):
            return unmarked, spans
        if text is None:  # not expected for a template that only prints contents
            text = self._render_many([messages], [tools])[0]
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
            return list(enc["input_ids"]), _span_finder(enc["offset_mapping"])
        ids = self._encode(text)

        def prefix_span(a: int, b: int) -> tuple[int, int]:
            return len(self._encode(text[:a])), len(self._encode(text[:b]))

        return ids, prefix_span


def with_thinking(conv: Conversation, text: str, spans: list) -> tuple[str, list]:
    """Content spans widened back to the start of each message's reasoning trace (the
    `thinking_key` value rendered before the content), as Axolotl trains the whole turn."""
    out = list(spans)
    previous = 0
    for i, msg in enumerate(conv.messages):
        span = out[i]
        if span is None:
            continue
        trace = msg.get(conv.thinking_key or "")
        if isinstance(trace, str) and trace.strip():
            at = text.rfind(trace.strip(), previous, span[0])
            if at != -1:
                out[i] = span = (at, span[1])
        previous = span[1]
    return text, out


def _byte_span_finder(
    text: str, ids: list[int], byte_lengths: np.ndarray, spans: list | None = None
) -> Callable[[int, int], tuple[int, int]] | None:
    """Like `_span_finder`, from per-token byte lengths; None when they do not tile the text.

    The char `spans` known in advance are looked up in one vectorised search.
    """
    sizes = byte_lengths[np.asarray(ids, dtype=np.int64)]
    ends = np.cumsum(sizes)
    ascii_text = text.isascii()
    total = len(text) if ascii_text else len(text.encode("utf-8"))
    if (ends[-1] if len(ends) else 0) != total:
        return None
    starts = ends - sizes

    def to_bytes(a: int) -> int:
        return a if ascii_text else len(text[:a].encode("utf-8"))

    def lookup(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        first = np.searchsorted(ends, a, side="right")
        stop = np.searchsorted(starts, b, side="left")
        empty = stop <= first
        return np.where(empty, 0, first), np.where(empty, 0, stop)

    known: dict[tuple[int, int], tuple[int, int]] = {}
    wanted = [sp for sp in spans or () if sp is not None]
    if wanted:
        firsts, stops = lookup(
            np.array([to_bytes(a) for a, _ in wanted]), np.array([to_bytes(b) for _, b in wanted])
        )
        known = dict(zip(wanted, zip(firsts.tolist(), stops.tolist(), strict=True), strict=True))

    def span(a: int, b: int) -> tuple[int, int]:
        if (a, b) in known:
            return known[(a, b)]
        first, stop = lookup(np.array([to_bytes(a)]), np.array([to_bytes(b)]))
        return int(first[0]), int(stop[0])

    return span


def _span_finder(offsets: list[tuple[int, int]]) -> Callable[[int, int], tuple[int, int]]:
    """A function from a char span to the tokens overlapping it (binary search on offsets)."""
    starts = [s for s, _ in offsets]
    ends = [e for _, e in offsets]

    def span(a: int, b: int) -> tuple[int, int]:
        first, stop = bisect.bisect_right(ends, a), bisect.bisect_left(starts, b)
        return (first, stop) if stop > first else (0, 0)

    return span
