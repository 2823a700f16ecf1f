"""The vision collator: chat rows with image parts to processor inputs and exact label masks.

A row is `{"messages": [...], "images": [...]?, "train": [...]?}`. A message's content is a
string or a list of parts: `{type: text, text}` and `{type: image, image|path|url|base64}`
(or OpenAI's `{type: image_url, image_url: {url}}`). TRL's vision format is accepted too:
an `images` column whose images fill the `{type: image}` parts that carry none, or, when
every content is a string, go before the first user message's text.

Masks follow the text engine (`data.tokenize`): the text of trained turns (`roles_to_train`,
`train_on_inputs`, per-message `train`) and, per `train_on_eos`, the end-of-turn token after
it. Spans come from one render whose text parts are wrapped in private-use markers (checked
against the plain render), are moved past the processor's image expansions (its
`text_replacement_offsets`) and are mapped to tokens by the tokenizer's offsets. Image
tokens, and everything else a processor inserts for an image, are never trained.

With `role_boundaries` (Axolotl's multimodal key) the trained spans come instead from the
tokens: each declared role's start marker opens a turn that runs to its end marker (or the
end of the sequence); the turns of trained roles are labelled, their end markers per
`train_on_eos` and `include_end`. A row in which a declared role's marker is not found is
an error naming the row. Each row may carry its dataset entry's masking keys (`MASK_KEY`).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from newtune.data.images import ImageLimits, load_image
from newtune.data.tokenize import EOT_WINDOW, IGNORE_INDEX
from newtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_START, _END = "\ue000", "\ue001"  # private-use characters that wrap text parts in one render
IMAGE_KEYS = ("image", "path", "url", "base64")  # where an image part holds its reference
ORIGIN_KEY = "_origin"  # a row's place in its data file (`data.jsonl row 3`), for errors
BASE_DIR_KEY = "_base_dir"  # the folder relative image paths of a row are read from
MASK_KEY = "_mask"  # a row's own {roles_to_train, train_on_eos} (its dataset entry's keys)
_DROPPED = ("offset_mapping", "text_replacement_offsets")


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: its text, images, and the char spans of each message's text."""

    text: str
    images: list[Any]
    spans: list[list[tuple[int, int]]]
    roles: list[str]
    train: list[bool | None]


@dataclass(frozen=True)
class Boundary:
    """A resolved role boundary: the token ids that open and close one role's turn."""

    role: str
    start: tuple[int, ...]
    end: tuple[int, ...]  # empty: the turn runs to the end of the sequence
    include_start: bool
    include_end: bool
    text: str  # the start marker as the user wrote it, for errors


def resolve_boundaries(specs: Sequence[Any], tok: Any) -> tuple[Boundary, ...]:
    """`role_boundaries` entries (dicts or schema models) as token-id boundaries.

    `end: eos_token` is the tokenizer's EOS id; `end` unset runs the turn to the end of the
    sequence. A marker that encodes to no tokens is a ConfigError naming its entry.
    """
    out = []
    for i, spec in enumerate(specs or ()):
        d = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)
        where = f"role_boundaries[{i}] (role {d.get('role')!r})"
        start = tuple(tok.encode(d["start"], add_special_tokens=False))
        if not start:
            raise ConfigError(
                f"{where}: start marker {d['start']!r} encodes to no tokens; give the text that "
                "opens this role's turn in the chat template's render"
            )
        end_text = d.get("end")
        if end_text is None:
            end: tuple[int, ...] = ()
        elif end_text == "eos_token":
            if tok.eos_token_id is None:
                raise ConfigError(f"{where}: `end: eos_token` but the tokenizer has no EOS token")
            end = (tok.eos_token_id,)
        else:
            end = tuple(tok.encode(end_text, add_special_tokens=False))
            if not end:
                raise ConfigError(
                    f"{where}: end marker {end_text!r} encodes to no tokens; use `end: null` to "
                    "run the turn to the end of the sequence or `end: eos_token`"
                )
        out.append(
            Boundary(
                str(d["role"]),
                start,
                end,
                bool(d.get("include_start", False)),
                bool(d.get("include_end", True)),
                str(d["start"]),
            )
        )
    return tuple(out)


def attach_images(messages: Sequence[dict[str, Any]], images: Sequence[Any]) -> list[dict]:
    """Messages whose image parts carry their images, filled from a TRL-style `images` column.

    Image parts without a reference take the images in order; when all contents are strings,
    the images go first in the first user message (TRL's `prepare_multimodal_messages` rule).
    """
    images = list(images or ())
    out = [dict(m) for m in messages]
    if images and all(isinstance(m.get("content"), str | None) for m in out):
        for m in out:
            if m.get("role") == "user":
                text = m.get("content") or ""
                m["content"] = [{"type": "image"} for _ in images] + [
                    {"type": "text", "text": text}
                ]
                break
    free = iter(images)
    placeholders = 0
    for m in out:
        content = m.get("content")
        if not isinstance(content, list):
            continue
        parts = []
        for part in content:
            if _is_image(part) and _reference(part) is None:
                placeholders += 1
                part = {**part, "image": next(free, None)}
            parts.append(part)
        m["content"] = parts
    if images and placeholders != len(images):
        raise DataError(
            f"the row has {len(images)} images in its `images` column but {placeholders} image "
            "parts without an image; give each `{type: image}` part one image"
        )
    return out


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image", "image_url")


def _reference(part: dict[str, Any]) -> Any:
    """The image a part refers to, or None."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in IMAGE_KEYS:
        if part.get(key) is not None:
            return part[key]
    return None


@dataclass
class VisionCollator:
    """Turns chat rows with images into a padded batch for a vision-language model.

    `processor`: a transformers processor (tokenizer + image processor) whose `__call__`
    expands image placeholders. `chat_template`: overrides the processor's template.
    """

    processor: Any
    chat_template: str | None = None
    roles_to_train: tuple[str, ...] = ("assistant",)
    train_on_eos: str = "turn"
    train_on_inputs: bool = False
    eot_tokens: tuple[str, ...] = ()
    max_length: int | None = None
    base_dir: Path | None = None
    limits: ImageLimits = field(default_factory=ImageLimits)
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: tuple[int, int] | None = None  # (height, width) every image is resized to
    resample: str = "bilinear"  # PIL filter for image_size
    role_boundaries: Sequence[Any] = ()  # Axolotl's role_boundaries: token markers per role

    def __post_init__(self) -> None:
        self.tok = getattr(self.processor, "tokenizer", self.processor)
        self.boundaries = resolve_boundaries(self.role_boundaries, self.tok)
        self.image_token = getattr(self.processor, "image_token", None)
        eot = set(self.eot_tokens) or ({self.tok.eos_token} if self.tok.eos_token else set())
        self.eot_ids = {self.tok.convert_tokens_to_ids(t) for t in eot}
        if None in self.eot_ids or self.tok.unk_token_id in self.eot_ids - {self.tok.eos_token_id}:
            raise DataError(
                f"eot_tokens: {sorted(eot)} are not all single tokens of this tokenizer"
            )
        self.image_ids = {
            i for i in (getattr(self.processor, "image_token_id", None),) if isinstance(i, int)
        }

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The batch: the processor's outputs (`input_ids`, `pixel_values`, ...) and `labels`."""
        rendered = [self.render(row, i) for i, row in enumerate(rows)]
        images = [r.images for r in rendered]
        out = self.processor(
            text=[r.text for r in rendered],
            images=images if any(images) else None,
            return_tensors="pt",
            padding=True,
            padding_side="right",
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            **self.processor_kwargs,
        )
        replacements = out.get("text_replacement_offsets") or [[] for _ in rows]
        labels = torch.full_like(out["input_ids"], IGNORE_INDEX)
        for i, r in enumerate(rendered):
            n = int(out["attention_mask"][i].sum())
            where = _where(rows[i], i)
            if self.max_length and n > self.max_length:
                raise DataError(
                    f"{where} is {n} tokens once its images are expanded, more than sequence_len "
                    f"{self.max_length}; raise sequence_len, shrink the images (image_size) or "
                    "shorten the row (image rows are never truncated: that would cut an image)"
                )
            ids = out["input_ids"][i, :n].tolist()
            offsets = [tuple(o) for o in out["offset_mapping"][i, :n].tolist()]
            roles, eos = self._mask_of(rows[i])
            if self.boundaries:
                row_labels = self._boundary_labels(r, ids, roles, eos, where)
            else:
                shift = _shifter(replacements[i], r.text, offsets, where)
                row_labels = self._labels(r, ids, offsets, shift, roles, eos)
            labels[i, :n] = torch.tensor(row_labels)
        if self.image_ids:
            labels[torch.isin(out["input_ids"], torch.tensor(sorted(self.image_ids)))] = (
                IGNORE_INDEX
            )
        batch = {k: v for k, v in out.items() if k not in _DROPPED}
        batch["labels"] = labels
        return batch

    # -- rendering ---------------------------------------------------------------------------

    def render(
        self, row: dict[str, Any], index: int = 0, add_generation_prompt: bool = False
    ) -> Rendered:
        """A row's rendered text, loaded images and per-message text spans (with the template's
        generation prompt at the end for inference)."""
        where = _where(row, index)
        try:
            messages = attach_images(row["messages"], row.get("images") or ())
        except KeyError as exc:
            raise DataError(f"{where} has no `messages`") from exc
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from exc
        base_dir = Path(row[BASE_DIR_KEY]) if row.get(BASE_DIR_KEY) else self.base_dir
        images: list[Any] = []
        plain: list[dict] = []
        marked: list[dict] = []
        texts: list[list[str]] = []
        for m in messages:
            p, mk, t = self._message(m, where, base_dir, images)
            plain.append(p)
            marked.append(mk)
            texts.append(t)
        text, spans = self._spans(plain, marked, texts, where, add_generation_prompt)
        train = list(row.get("train") or ())
        return Rendered(text, images, spans, [str(m.get("role")) for m in messages], train)

    def _message(
        self, m: dict[str, Any], where: str, base_dir: Path | None, images: list[Any]
    ) -> tuple[dict, dict, list[str]]:
        """(plain message, marked message, its non-empty texts); images are appended."""
        content = m.get("content")
        rest = {k: v for k, v in m.items() if k not in ("content", "train")}
        if content is None or isinstance(content, str):
            text = content or ""
            self._check_text(text, where)
            mark = f"{_START}{text}{_END}" if text else text
            return {**rest, "content": content}, {**rest, "content": mark}, [text] if text else []
        if not isinstance(content, list):
            raise DataError(f"{where}: a message content must be a string or a list of parts")
        plain_parts: list[dict] = []
        marked_parts: list[dict] = []
        found: list[str] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = str(part.get("text") or "")
                self._check_text(text, where)
                plain_parts.append({"type": "text", "text": text})
                marked_parts.append(
                    {"type": "text", "text": f"{_START}{text}{_END}" if text else ""}
                )
                found += [text] if text else []
            elif _is_image(part):
                ref = _reference(part)
                if ref is None:
                    raise DataError(
                        f"{where}: an image part has no image ({', '.join(IMAGE_KEYS)})"
                    )
                images.append(self._sized(load_image(ref, where, base_dir, self.limits)))
                plain_parts.append({"type": "image"})
                marked_parts.append({"type": "image"})
            else:
                raise DataError(
                    f"{where}: a content part must be `{{type: text, text}}` or `{{type: image, "
                    f"...}}`, got {str(part)[:80]}"
                )
        return {**rest, "content": plain_parts}, {**rest, "content": marked_parts}, found

    def _sized(self, image: Any) -> Any:
        """The image resized to `image_size` (Axolotl's image_size/image_resize_algorithm)."""
        if self.image_size is None:
            return image
        from PIL import Image

        height, width = self.image_size
        return image.resize((width, height), getattr(Image.Resampling, self.resample.upper()))

    def _check_text(self, text: str, where: str) -> None:
        if _START in text or _END in text:
            raise DataError(f"{where}: the text holds private-use characters U+E000/U+E001")
        if self.image_token and self.image_token in text:
            raise DataError(
                f"{where}: the text contains the image token `{self.image_token}`; images go in "
                "`{type: image}` parts, not in the text"
            )

    def _render(self, conversation: list[dict], generation: bool = False) -> str:
        return self.processor.apply_chat_template(
            conversation,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=generation,
        )

    def _spans(
        self,
        plain: list[dict],
        marked: list[dict],
        texts: list[list[str]],
        where: str,
        generation: bool = False,
    ) -> tuple[str, list[list[tuple[int, int]]]]:
        """The plain render and each message's text spans in it (from the marked render)."""
        text = self._render(plain, generation)
        pieces = self._render(marked, generation).split(_START)
        flat = [t for ts in texts for t in ts]
        spans: list[list[tuple[int, int]]] = [[] for _ in texts]
        if len(pieces) - 1 == len(flat):
            unmarked, cursor, ok = [pieces[0]], len(pieces[0]), True
            owners = iter(i for i, ts in enumerate(texts) for _ in ts)
            for piece, want in zip(pieces[1:], flat, strict=True):
                inner, *after = piece.split(_END)
                if len(after) != 1 or inner != want:
                    ok = False
                    break
                spans[next(owners)].append((cursor, cursor + len(inner)))
                unmarked += (inner, after[0])
                cursor += len(inner) + len(after[0])
            if ok and "".join(unmarked) == text:
                return text, spans
        # The template rewrites or repeats texts: find each one forward in the plain render.
        spans, cursor = [[] for _ in texts], 0
        for i, ts in enumerate(texts):
            for t in ts:
                at = text.find(t, cursor)
                if at == -1:
                    log.warning(
                        "%s: message %d text not found in the render; not trained", where, i
                    )
                    continue
                spans[i].append((at, at + len(t)))
                cursor = at + len(t)
        return text, spans

    # -- labels ------------------------------------------------------------------------------

    def _mask_of(self, row: dict[str, Any]) -> tuple[set[str], str]:
        """The row's trained roles and train_on_eos: its own (`MASK_KEY`) or the collator's."""
        mask = row.get(MASK_KEY) or {}
        roles = mask.get("roles_to_train")
        eos = mask.get("train_on_eos")
        return (
            set(self.roles_to_train if roles is None else roles),
            eos or self.train_on_eos,
        )

    def _labels(
        self,
        r: Rendered,
        ids: list[int],
        offsets: list[tuple[int, int]],
        shift: Callable[[int], int],
        roles_to_train: set[str],
        train_on_eos: str,
    ) -> list[int]:
        labels = [IGNORE_INDEX] * len(ids)
        starts = [a for a, _ in offsets]
        ends = [b for _, b in offsets]
        last_eot = -1
        for i, spans in enumerate(r.spans):
            forced = r.train[i] if i < len(r.train) else None
            train = (
                forced
                if forced is not None
                else (self.train_on_inputs or r.roles[i] in roles_to_train)
            )
            if (not train and train_on_eos != "all") or not spans:
                continue
            stop = 0
            for a, b in spans:
                first = bisect.bisect_right(ends, shift(a))
                stop = bisect.bisect_left(starts, shift(b))
                if train and stop > first:
                    labels[first:stop] = ids[first:stop]
            eot = self._find_eot(ids, stop)
            if eot != -1:
                last_eot = eot
                if train_on_eos == "all" or (train_on_eos == "turn" and train):
                    labels[eot] = ids[eot]
        if train_on_eos == "last" and last_eot != -1:
            labels[last_eot] = ids[last_eot]
        return labels

    def _boundary_labels(
        self, r: Rendered, ids: list[int], roles_to_train: set[str], train_on_eos: str, where: str
    ) -> list[int]:
        """Labels from `role_boundaries`: the turns of trained roles, scanned in the tokens.

        At each position the longest matching start marker opens a turn, which ends at its
        end marker (not found: an error) or, with `end` unset, at the end of the sequence.
        With `include_end: false` the end marker may open the next turn.
        """
        if any(flag is not None for flag in r.train):
            raise DataError(
                f"{where} has per-message train flags, which `role_boundaries` cannot place "
                "(its spans come from token markers, not messages); remove `role_boundaries` "
                "or `message_field_training`"
            )
        declared = {b.role for b in self.boundaries}
        trained = declared if self.train_on_inputs else roles_to_train
        undeclared = sorted((set(r.roles) & trained) - declared)
        if undeclared:
            raise DataError(
                f"{where} has {', '.join(undeclared)} turns to train but `role_boundaries` "
                f"declares only {', '.join(sorted(declared))}; add a boundary for each trained role"
            )
        by_length = sorted(self.boundaries, key=lambda b: -len(b.start))
        labels = [IGNORE_INDEX] * len(ids)
        n, j, seen = len(ids), 0, set()
        last: tuple[int, int] | None = None
        while j < n:
            b = next((b for b in by_length if tuple(ids[j : j + len(b.start)]) == b.start), None)
            if b is None:
                j += 1
                continue
            seen.add(b.role)
            body = j + len(b.start)
            stop = after = n
            if b.end:
                k = _find(ids, b.end, body)
                if k == -1:
                    raise DataError(
                        f"{where}: the `{b.role}` turn opened by {b.text!r} at token {j} has no "
                        f"end marker after it ({self.tok.decode(list(b.end))!r}); fix "
                        "`role_boundaries` to the chat template's render"
                    )
                stop, after = k, k + len(b.end)
            train = b.role in trained
            if train:
                first = j if b.include_start else body
                labels[first:stop] = ids[first:stop]
            if b.end and b.include_end:
                if train_on_eos == "all" or (train and train_on_eos == "turn"):
                    labels[stop:after] = ids[stop:after]
                elif train and train_on_eos == "last":
                    last = (stop, after)
            j = stop if b.end and not b.include_end else after
        if last is not None:
            labels[last[0] : last[1]] = ids[last[0] : last[1]]
        missing = [b for b in self.boundaries if b.role in r.roles and b.role not in seen]
        if missing:
            b = missing[0]
            raise DataError(
                f"{where} has `{b.role}` messages but the `role_boundaries` start marker "
                f"{b.text!r} (tokens {list(b.start)}) is not in its tokens; set the marker to the "
                f"text that opens a {b.role} turn in the chat template's render"
            )
        return labels

    def _find_eot(self, ids: list[int], start: int) -> int:
        """The end-of-turn token within EOT_WINDOW tokens of `start`, not counting image
        tokens (a turn whose content ends with an image), or -1."""
        others = 0
        for j in range(start, len(ids)):
            if ids[j] in self.eot_ids:
                return j
            if ids[j] not in self.image_ids:
                others += 1
                if others > EOT_WINDOW:
                    break
        return -1


def _find(ids: list[int], marker: tuple[int, ...], start: int) -> int:
    """The first position at or after `start` where `marker` begins in `ids`, or -1."""
    for k in range(start, len(ids) - len(marker) + 1):
        if tuple(ids[k : k + len(marker)]) == marker:
            return k
    return -1


def _where(row: dict[str, Any], index: int) -> str:
    return str(row.get(ORIGIN_KEY) or f"batch row {index}")


def _shifter(
    replacements: list[dict[str, Any]], text: str, offsets: list[tuple[int, int]], where: str
) -> Callable[[int], int]:
    """Maps a char position of the rendered text to the processor's expanded text."""
    moves = sorted((r["span"][1], len(r["replacement"]) - len(r["text"])) for r in replacements)
    expanded = len(text) + sum(d for _, d in moves)
    if offsets and max(b for _, b in offsets) > expanded:
        raise DataError(
            f"{where}: the processor changed the text in a way it does not report (tokens end "
            f"at char {max(b for _, b in offsets)}, the text has {expanded}); newtune cannot "
            "place the label masks for this processor"
        )
    ends = [e for e, _ in moves]
    cumulative = [0]
    for _, d in moves:
        cumulative.append(cumulative[-1] + d)

    def shift(pos: int) -> int:
        return pos + cumulative[bisect.bisect_right(ends, pos)]

    return shift
