"""What a strategy produces: chat messages or template-free text segments. No tokens here."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

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
    `eos`: EOS is appended (and trained when the last segment is); an int asks for that
    many EOS tokens (metharme appends 3), an EOS already ending the text counting as one.
    `chunk`: rows longer than sequence_len are split instead of dropped.
    """

    segments: tuple[Segment, ...]
    bos: bool = True
    eos: bool | int = True
    chunk: bool = False


@dataclass(frozen=True)
class Conversation:
    """Chat messages (`role`, `content`) rendered by a chat template.

    `train` holds, per message, True/False to force training of that message or None
    to follow `roles_to_train`. `tools`: tool definitions (JSON schemas) handed to the
    chat template as its `tools` variable. `thinking_key`: the message key holding a
    reasoning trace (Axolotl's template_thinking_key); a trained message's trace is trained
    with its content, as Axolotl's turn boundaries include it.
    """

    messages: tuple[dict[str, Any], ...]
    train: tuple[bool | None, ...] = field(default=())
    add_generation_prompt: bool = False
    tools: list[dict[str, Any]] | None = None
    thinking_key: str | None = None


Sample = Segments | Conversation
Messages = tuple[dict[str, Any], ...]
# How a Preference/Unpaired whose parts are messages becomes tokens: "chat" renders the prompt
# (with the generation prompt) and prompt+completion with the chat template and tokenizes the
# renders (TRL's conversational layout); "dpo_text" and "orpo_text" first render text the way
# Axolotl's DPO `chat_template.*` and ORPO `chat_template.argilla` types do, then tokenize that
# text as a text row.
Render = Literal["chat", "dpo_text", "orpo_text"]


@dataclass(frozen=True)
class Preference:
    """A prompt with a chosen and a rejected completion: all text, or all messages.

    `margin`: the reward-model margin of the pair (TRL's `margin` column), when the data has one.
    """

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    render: Render = "chat"
    tools: list[dict[str, Any]] | None = None
    margin: float | None = None


@dataclass(frozen=True)
class Unpaired:
    """A prompt with one completion labelled desirable (True) or undesirable (KTO)."""

    prompt: str | Messages
    completion: str | Messages
    label: bool
    render: Render = "chat"
    tools: list[dict[str, Any]] | None = None


PreferenceSample = Preference | Unpaired


class Strategy(ABC):
    """Turns a raw row into a Sample for training, and a user prompt into one for inference."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1  # bump when the produced samples change: it is in the cache key
    # Prompt styles (`type: alpaca:chat`) and the dataset-entry keys read besides the source
    # keys (None: any). Built-in formats get both from config.schema.formats.FORMATS.
    styles: ClassVar[tuple[str, ...]] = ()
    entry_keys: ClassVar[frozenset[str] | None] = None
    chat: ClassVar[bool] = False  # prompts are chat conversations (inference keeps a history)

    def __init__(
        self, entry: DatasetEntry, train_on_inputs: bool, style: str | None = None
    ) -> None:
        self.entry = entry
        self.train_on_inputs = train_on_inputs
        self.style = style

    @abstractmethod
    def sample(self, row: dict[str, Any]) -> Sample | PreferenceSample:
        """The training sample of one row."""

    @abstractmethod
    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Sample:
        """The inference prompt for a user's text (history: earlier chat turns)."""

    def required_columns(self) -> list[str]:
        """Columns a row must have; checked once before tokenizing."""
        return []


def as_text(value: Any, what: str) -> str:
    """A text value of a row: strings as they are, numbers as their decimal text.

    `what` names the value in errors (e.g. "column `instruction`"). Booleans, lists and
    mappings are DataErrors: their text would train the model on Python syntax.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    kind = {bool: "a boolean", list: "a list", tuple: "a list", dict: "a mapping"}.get(
        type(value), f"a {type(value).__name__}"
    )
    raise DataError(f"{what} holds {kind}, not text; write it as a string")


def text_field(row: dict[str, Any], key: str) -> str:
    """The text in `row[key]` (see as_text); a missing or null value is a DataError."""
    value = row.get(key)
    if value is None:
        raise DataError(f"column `{key}` is empty (null)")
    return as_text(value, f"column `{key}`")


def optional_field(row: dict[str, Any], key: str) -> str:
    """The text in `row[key]` (see as_text), or "" when the column is missing or null."""
    value = row.get(key)
    return "" if value is None else as_text(value, f"column `{key}`")


def prompt_and_response(prompt: str, response: str, train_on_inputs: bool) -> Segments:
    """BOS + prompt (trained only with train_on_inputs) + response (trained) + EOS."""
    return Segments((Segment(prompt, train_on_inputs), Segment(response, True)), bos=True, eos=True)


def prompt_only(prompt: str) -> Segments:
    """An inference prompt: BOS + prompt, no EOS."""
    return Segments((Segment(prompt, False),), bos=True, eos=False)
