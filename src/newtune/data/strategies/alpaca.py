"""The alpaca family: alpaca (with prompt styles), alpaca_chat, alpaca_instruct, alpaca_w_system."""

from __future__ import annotations

from typing import ClassVar

from newtune.data.strategies.instruct import STYLES, Instruct, PromptStyle, check_style
from newtune.data.strategies.registry import register

CHAT_SYSTEM = (
    "Below is an instruction from a USER that describes a task, paired with an input that "
    "provides further context. The ASSISTANT writes a response that concisely and "
    "appropriately completes the request.\n\n"
)
CHAT_SYSTEM_NO_INPUT = (
    "Below is an instruction from a USER that describes a task. The ASSISTANT writes a "
    "response that appropriately and concisely completes the request.\n\n"
)


@register("alpaca")
class Alpaca(Instruct):
    """instruction, input, output; `alpaca:chat`, `alpaca:chatml`, `alpaca:phi` pick a style."""



@register("alpaca_instruct")
class AlpacaInstruct(Instruct):
    """Axolotl's alpaca_instruct: the alpaca prompt (instruct style)."""


@register("alpaca_instruct.load_no_prompt")
class AlpacaInstructNoPrompt(Instruct):
    """The instruct-style turn without any system text."""

    system_prompt = ""
    system_no_input_prompt = ""


@register("alpaca_chat")
class AlpacaChat(Instruct):
    """The alpaca prompt in the chat style (USER:/ASSISTANT:); `conversation:` picks a style."""

    default_style = "chat"

    def prompt_style(self) -> PromptStyle:
        style = self.entry.conversation or self.default_style
        return STYLES[check_style(style, "conversation")]


@register("alpaca_chat.load_no_prompt")
class AlpacaChatNoPrompt(Instruct):
    """The chat-style turn without any system text."""

    default_style = "chat"
    system_prompt = ""
    system_no_input_prompt = ""


@register("alpaca_chat.load_concise")
class AlpacaChatConcise(Instruct):
    """Chat style with a system text asking for concise answers."""

    default_style = "chat"
    system_prompt = CHAT_SYSTEM
    system_no_input_prompt = CHAT_SYSTEM_NO_INPUT


@register("alpaca_chat.load_qa")
class AlpacaChatQA(AlpacaChatConcise):
    """question -> answer, chat style."""

    instruction_column = "question"
    input_column = None
    output_column = "answer"


@register("alpaca_chat.load_camel_ai")
class AlpacaChatCamelAI(AlpacaChatConcise):
    """message_1 -> message_2 (CAMEL-AI datasets), chat style."""

    instruction_column = "message_1"
    input_column = None
    output_column = "message_2"


class _SystemFromRow(Instruct):
    """The system text is the row's `system` column (none when empty)."""

    system_column: ClassVar[str | None] = "system"
    # Axolotl's system-data prompter keeps the style's system layout: instruct is "{system}\n\n".


@register("alpaca_w_system")
class AlpacaWSystem(_SystemFromRow):
    """instruction, input, output, system; chat style (Axolotl's default loader)."""

    default_style = "chat"


@register("alpaca_w_system.load_chat")
class AlpacaWSystemChat(AlpacaWSystem):
    """Same as alpaca_w_system."""


@register("alpaca_w_system.load_instruct")
class AlpacaWSystemInstruct(_SystemFromRow):
    """instruction, input, output, system; instruct style."""


OPEN_ORCA = PromptStyle(
    turn="### Human:\n{instruction}\n### Additional Context:\n{input}\n### Assistant:\n",
    turn_no_input="### Human:\n{instruction}\n### Assistant:\n",
    system="### System:\n{system}\n",
)


@register("alpaca_w_system.load_open_orca")
class OpenOrca(_SystemFromRow):
    """OpenOrca rows: question, response, system_prompt."""

    instruction_column = "question"
    input_column = None
    output_column = "response"
    system_column = "system_prompt"

    def prompt_style(self) -> PromptStyle:
        return OPEN_ORCA


@register("alpaca_w_system.load_open_orca_chatml")
class OpenOrcaChatML(OpenOrca):
    """OpenOrca rows in the ChatML layout."""

    def prompt_style(self) -> PromptStyle:
        return STYLES["chatml"]
