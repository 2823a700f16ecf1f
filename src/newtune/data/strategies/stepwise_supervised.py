"""`type: stepwise_supervised`: process reward rows (prompt, steps, one label per step).

A row is TRL's stepwise-supervision layout (math_shepherd): `prompt` (text), `completions`
(the reasoning steps, a list of texts) and `labels` (one bool per step: is the step right).
It is tokenized as Axolotl's stepwise_supervised strategy and TRL's PRMTrainer do:

    [BOS] prompt | step 1, separator | step 2, separator | ...

with every token labelled -100 but the last token of each step's separator, which holds the
step's label (0 or 1). `train_on_last_step_only` keeps only the last step's label (in every
split, as Axolotl's strategy does); `max_completion_length` keeps the first tokens of the
steps; the whole row is cut to `sequence_len` (truncated, as Axolotl and TRL do, unless
`excess_length_strategy` is drop or raise). The prepared columns are SFT's (`input_ids`,
`labels`, `attention_mask`); the labels are class ids, which only the `process_reward_model`
method (train.methods.prm) reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from newtune.data.strategies.base import Strategy, as_text, prompt_only, text_field
from newtune.data.strategies.registry import register_preference
from newtune.errors import DataError

IGNORE_INDEX = -100
DEFAULT_SEPARATOR = "\n"
COLUMNS = ("prompt", "completions", "labels")


@dataclass(frozen=True)
class Steps:
    """A prompt, its reasoning steps and one label (0 wrong, 1 right) per step."""

    prompt: str
    steps: tuple[str, ...]
    labels: tuple[int, ...]


def step_label(value: Any, where: str) -> int:
    """A step label as a class id: booleans, and the integers 0 and 1 (Axolotl casts to int)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, float) and value in (0.0, 1.0):
        return int(value)
    raise DataError(
        f"{where} is {value!r}; a step label is true (the step is right) or false (0 or 1)"
    )


@register_preference("prm", "stepwise_supervised")
class StepwiseSupervised(Strategy):
    """Rows {prompt, completions: [steps], labels: [bool per step]} as `Steps` samples."""

    version: ClassVar[int] = 1

    @property
    def separator(self) -> str:
        """`step_separator` (a newline by default)."""
        value = self.entry.step_separator
        return DEFAULT_SEPARATOR if value is None else value

    def required_columns(self) -> list[str]:
        """TRL's stepwise-supervision columns."""
        return list(COLUMNS)

    def sample(self, row: dict[str, Any]) -> Steps:
        """The row's prompt, steps and labels; a DataError for lists that do not match."""
        prompt = text_field(row, "prompt")
        steps, labels = row.get("completions"), row.get("labels")
        if not isinstance(steps, list | tuple):
            kind = "null" if steps is None else type(steps).__name__
            raise DataError(f"column `completions` holds {kind}, not a list of step texts")
        if not isinstance(labels, list | tuple):
            kind = "null" if labels is None else type(labels).__name__
            raise DataError(f"column `labels` holds {kind}, not a list of one label per step")
        if len(steps) != len(labels):
            raise DataError(
                f"{len(steps)} step(s) in `completions` and {len(labels)} label(s) in "
                "`labels`; give exactly one label per step"
            )
        texts = tuple(as_text(s, f"`completions[{i}]`") for i, s in enumerate(steps))
        ints = tuple(step_label(v, f"`labels[{i}]`") for i, v in enumerate(labels))
        return Steps(prompt, texts, ints)

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Any:
        """A plain prompt (a process reward model does not generate; inference refuses it)."""
        return prompt_only(text)


def step_rows(
    tokenizer: Any,
    samples: list[Steps],
    separator: str,
    max_completion_length: int | None,
    train_on_last_step_only: bool,
    sequence_len: int | None,
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each sample, with one tokenizer call for all its texts."""
    texts = [t for s in samples for t in (s.prompt, *s.steps)]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    sep_ids = list(tokenizer.encode(separator, add_special_tokens=False))
    bos = tokenizer.bos_token_id
    out, at = [], 0
    for sample in samples:
        prompt_ids = list(encoded[at])
        step_ids = [list(ids) for ids in encoded[at + 1 : at + 1 + len(sample.steps)]]
        at += 1 + len(sample.steps)
        labels = list(sample.labels)
        if train_on_last_step_only and labels:
            labels = [IGNORE_INDEX] * (len(labels) - 1) + labels[-1:]
        ids: list[int] = []
        marks: list[int] = []
        for i, (tokens, label) in enumerate(zip(step_ids, labels, strict=True)):
            tokens = tokens + sep_ids
            if not tokens:
                raise DataError(
                    f"step {i} (`completions[{i}]`) has no token and `step_separator` is "
                    "empty, so nothing carries its label; remove the empty step or set a "
                    "separator"
                )
            ids += tokens
            marks += [IGNORE_INDEX] * (len(tokens) - 1) + [label]
        if max_completion_length is not None:
            ids, marks = ids[:max_completion_length], marks[:max_completion_length]
        if bos is not None:
            prompt_ids = [bos, *prompt_ids]
        ids = prompt_ids + ids
        marks = [IGNORE_INDEX] * len(prompt_ids) + marks
        if sequence_len is not None:
            ids, marks = ids[:sequence_len], marks[:sequence_len]
        out.append((ids, marks))
    return out


def _blank(value: Any) -> bool:
    """None, blank text, or a list of blanks (a row whose every field is empty is skipped)."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list | tuple):
        return all(_blank(v) for v in value)
    return False


def batch_tokenizer(
    where: str, entry: Any, strategy: StepwiseSupervised, engine: Any, excess: str | None = None
) -> Callable[[dict[str, list], list[int]], tuple[dict[str, list], int]]:
    """data.prepare's batch tokenizer for process reward rows: SFT's columns, blank rows
    skipped and counted, the first failing row named in the error.

    Rows are cut to `sequence_len` unless `excess_length_strategy` (`excess`) is drop or
    raise, which then apply to the whole row as for SFT rows.
    """
    options = (
        strategy.separator,
        entry.max_completion_length,
        bool(entry.train_on_last_step_only),
        engine.sequence_len if excess in (None, "truncate") else None,
    )

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> tuple[dict[str, list], int]:
        samples, kept = [], []
        for j, idx in enumerate(indices):
            row = {k: batch[k][j] for k in batch}
            if all(_blank(v) for v in row.values()):
                continue
            try:
                samples.append(strategy.sample(row))
            except (DataError, KeyError, TypeError, ValueError) as exc:
                raise DataError(
                    f"{where} ({entry.path}, type stepwise_supervised) row {idx}: {exc}. Fix "
                    "that row: a process reward row has a `prompt` text, a `completions` list "
                    "of step texts and a `labels` list with one true/false per step."
                ) from None
            kept.append(idx)
        try:
            rows = step_rows(engine.tok, samples, *options)
        except DataError:
            for sample, idx in zip(samples, kept, strict=True):
                try:
                    step_rows(engine.tok, [sample], *options)
                except DataError as exc:
                    raise DataError(f"{where} ({entry.path}) row {idx}: {exc}.") from None
            raise
        ids = [r[0] for r in rows]
        labels = [r[1] for r in rows]
        columns = {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": [[1] * len(i) for i in ids],
            "_len": [len(i) for i in ids],
            "_sup": [len(lab) - lab.count(IGNORE_INDEX) for lab in labels],
        }
        return columns, len(indices) - len(kept)

    return tokenize_batch
