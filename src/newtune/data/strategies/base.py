"""What a strategy produces: chat messages or template-free text segments. No tokens here."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from newtune.config.schema import DatasetEntry
from newtune.errors import DataError


@dataclass(frozen=True)
class Segment:
    """A piece of text and whether its tokens are trained."""

    text: str
    label: bool


@dataclass(frozen=True)
class Segments:
    """Template-free text: segments tokenized one by one and concatenated.

    `bos`: the first segment is tokenized with the tokenizer's special tokens (BOS).
    `eos`: EOS is appended (and trained when the last segment is).
    `chunk`: rows longer than sequence_len are split instead of dropped.
    """

    segments: tuple[Segment, ...]
    bos: bool = True
    eos: bool = True
    chunk: bool = False


@dataclass(frozen=True)
class Conversation:
    """Chat messages (`role`, `content`) rendered by a chat template.

    `train` holds, per message, True/False to force training of that message or None
    to follow `roles_to_train`.
    """

    messages: tuple[dict[str, Any], ...]
    train: tuple[bool | None, ...] = field(default=())
    add_generation_prompt: bool = False


Sample = Segments | Conversation


class Strategy(ABC):
    """Turns a raw row into a Sample for training, and a user prompt into one for inference."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1  # bump when the produced samples change: it is in the cache key

    def __init__(self, entry: DatasetEntry, train_on_inputs: bool) -> None:
        self.entry = entry
        self.train_on_inputs = train_on_inputs

    @abstractmethod
    def sample(self, row: dict[str, Any]) -> Sample:
        """The training sample of one row."""

    @abstractmethod
    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Sample:
        """The inference prompt for a user's text (history: earlier chat turns)."""

    def required_columns(self) -> list[str]:
        """Columns a row must have; checked once before tokenizing."""
        return []


def text_field(row: dict[str, Any], key: str) -> str:
    """The string in `row[key]`; a missing or null value is a DataError naming the column."""
    value = row.get(key)
    if value is None:
        raise DataError(f"column `{key}` is empty (null)")
    return str(value)
