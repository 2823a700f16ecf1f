"""Preference and reward formats: rows become Preference(prompt, chosen, rejected) or Unpaired.

The strings are those Axolotl's prompt_strategies/{dpo,kto,orpo,bradley_terry} build, so a config
moved from Axolotl trains on the same text; TRL's own `preference` and `unpaired_preference`
formats (standard or conversational, explicit or implicit prompt) are read as TRL reads them.
Strategies only describe: the engine renders and tokenizes (data.tokenize).

A format name is resolved per training method (`chatml.intel` is DPO's with `rl: dpo` and KTO's
with `rl: kto`); the strategy instance's `style` is "method:name".
"""

from __future__ import annotations

from typing import Any, ClassVar

from newtune.config.schema.formats import parse_preference_format
from newtune.data.strategies.base import (
    Conversation,
    Messages,
    Preference,
    PreferenceSample,
    Segment,
    Segments,
    Strategy,
    Unpaired,
    as_text,
    text_field,
)
from newtune.data.strategies.registry import register_preference
from newtune.errors import DataError

# (system turn, user turn ending in the assistant header, end of the assistant turn); the
# content goes between the two halves of each turn
_TURNS = {
    "chatml": (
        ("<|im_start|>system\n", "<|im_end|>\n"),
        ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
        "<|im_end|>",
    ),
    "llama3": (
        ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
        (
            "<|start_header_id|>user<|end_header_id|>\n\n",
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        "<|eot_id|>",
    ),
}
ALIASES = {"chatml": "chatml.default", "llama3": "llama3.default"}
ALIASES["chat_template"] = "chat_template.default"


class PreferenceStrategy(Strategy):
    """A preference format; `self.method` and `self.format` come from the resolved name."""

    version: ClassVar[int] = 1

    def __init__(self, entry: Any, train_on_inputs: bool, style: str | None = None) -> None:
        super().__init__(entry, train_on_inputs, style)
        method, _, name = (style or ":").partition(":")
        self.method = method
        self.format = ALIASES.get(name, name)

    def sample(self, row: dict[str, Any]) -> PreferenceSample:
        """The Preference (or Unpaired) of one row."""
        raise NotImplementedError

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Segments:
        """An inference prompt: the user's text in this format's prompt layout."""
        return Segments((Segment(text, False),), bos=True, eos=False)


def _truthy(row: dict[str, Any], key: str) -> bool:
    """Axolotl's `key in sample and sample[key]`."""
    return bool(row.get(key))


def _turn(row: dict[str, Any], key: str, index: int) -> str:
    """The content of message `index` of the message list in column `key`."""
    messages = row.get(key)
    if not isinstance(messages, list | tuple) or len(messages) <= index:
        have = len(messages) if isinstance(messages, list | tuple) else "no list"
        raise DataError(
            f"column `{key}` needs a list of at least {index + 1} messages (has {have})"
        )
    message = messages[index]
    if not isinstance(message, dict) or message.get("content") is None:
        raise DataError(f"column `{key}`, message {index}: no `content`")
    return as_text(message["content"], f"column `{key}`, message {index} content")


def _label(row: dict[str, Any], key: str) -> bool:
    """A KTO label: true/false (or 1/0)."""
    value = row.get(key)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataError(
        f"column `{key}` must hold true (desirable) or false (undesirable), not {value!r}"
    )


class AxolotlTurns(PreferenceStrategy):
    """Axolotl's `chatml.*` / `llama3.*` DPO and KTO formats: fixed-template text."""

    _USER_COLUMN: ClassVar[dict[str, str]] = {
        "icr": "input",
        "intel": "question",
        "prompt_pairs": "prompt",
        "ultra": "prompt",
        "argilla": "instruction",
    }

    def __init__(self, entry: Any, train_on_inputs: bool, style: str | None = None) -> None:
        super().__init__(entry, train_on_inputs, style)
        self.family, _, self.variant = self.format.partition(".")
        self.system_turn, self.user_turn, self.end = _TURNS[self.family]

    def _prompt_text(self, user: str, system: str | None) -> str:
        text = ""
        if system:
            text = self.system_turn[0] + system + self.system_turn[1]
        return text + self.user_turn[0] + user + self.user_turn[1]

    def _system(self, row: dict[str, Any]) -> str | None:
        return as_text(row["system"], "column `system`") if _truthy(row, "system") else None

    def _default_keys(self, row: dict[str, Any]) -> tuple[str, str, str]:
        prompt = next((k for k in ("prompt", "input", "question") if k in row), "instruction")
        chosen = "chosen" if "chosen" in row else "chosen_response"
        rejected = "rejected" if "rejected" in row else "rejected_response"
        return prompt, chosen, rejected

    def sample(self, row: dict[str, Any]) -> PreferenceSample:
        """Axolotl's prompt/chosen/rejected (or prompt/completion/label) strings."""
        if self.method == "kto":
            return self._unpaired(row)
        v = self.variant
        if v == "argilla_chat":
            prompt = self._prompt_text(_turn(row, "chosen", 0), None)
            chosen, rejected = _turn(row, "chosen", 1), _turn(row, "rejected", 1)
        else:
            user_key, chosen_key, rejected_key = (
                self._default_keys(row)
                if v == "default"
                else (self._USER_COLUMN[v], "chosen", "rejected")
            )
            prompt = self._prompt_text(text_field(row, user_key), self._system(row))
            if v == "ultra":
                chosen, rejected = _turn(row, "chosen", 1), _turn(row, "rejected", 1)
            else:
                chosen, rejected = text_field(row, chosen_key), text_field(row, rejected_key)
        return Preference(prompt, chosen + self.end, rejected + self.end)

    def _unpaired(self, row: dict[str, Any]) -> Unpaired:
        if self.variant == "argilla_chat":
            prompt = self._prompt_text(_turn(row, "completion", 0), None)
            completion = _turn(row, "completion", 1)
        else:
            user = text_field(row, self._USER_COLUMN[self.variant])
            prompt = self._prompt_text(user, self._system(row))
            completion = text_field(row, "completion")
        return Unpaired(prompt, completion + self.end, _label(row, "label"))

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Segments:
        """The user's text in this format's user turn, ending in the assistant header."""
        return Segments((Segment(self._prompt_text(text, None), False),), bos=True, eos=False)

    def required_columns(self) -> list[str]:
        """The columns this variant reads (argilla_chat: the message lists)."""
        if self.method == "kto":
            if self.variant == "argilla_chat":
                return ["completion", "label"]
            return [self._USER_COLUMN[self.variant], "completion", "label"]
        if self.variant == "default":
            return []  # Axolotl picks among several column names
        if self.variant == "argilla_chat":
            return ["chosen", "rejected"]
        return [self._USER_COLUMN[self.variant], "chosen", "rejected"]


register_preference(
    "dpo",
    *(
        f"{t}.{v}"
        for t in ("chatml", "llama3")
        for v in AxolotlTurns._USER_COLUMN
        if v != "argilla"
    ),
    *(f"{t}.{v}" for t in ("chatml", "llama3") for v in ("default", "argilla_chat")),
    "chatml",
    "llama3",
)(AxolotlTurns)
register_preference(
    "kto",
    *(
        f"{t}.{v}"
        for t in ("chatml", "llama3")
        for v in ("argilla", "argilla_chat", "intel", "prompt_pairs", "ultra")
    ),
)(AxolotlTurns)


@register_preference("dpo", "zephyr.nectar")
class ZephyrNectar(PreferenceStrategy):
    """Axolotl's `zephyr.nectar`: answers sorted by rank; the last is chosen, the one before
    rejected (exactly as Axolotl does)."""

    def sample(self, row: dict[str, Any]) -> Preference:
        """Zephyr prompt; chosen/rejected from the ranked `answers`."""
        prompt = (
            "<|system|>\n</s>\n<|user|>\n" + text_field(row, "prompt") + "</s>\n<|assistant|>\n"
        )
        answers = row.get("answers")
        if not isinstance(answers, list) or len(answers) < 2:
            raise DataError("column `answers` needs a list of at least 2 ranked answers")
        ranked = sorted(answers, key=lambda a: a["rank"])
        return Preference(
            prompt,
            as_text(ranked[-1]["answer"], "column `answers`, answer"),
            as_text(ranked[-2]["answer"], "column `answers`, answer"),
        )

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Segments:
        """The zephyr prompt of the user's text."""
        prompt = "<|system|>\n</s>\n<|user|>\n" + text + "</s>\n<|assistant|>\n"
        return Segments((Segment(prompt, False),), bos=True, eos=False)

    def required_columns(self) -> list[str]:
        """prompt and answers."""
        return ["prompt", "answers"]


@register_preference("dpo", "user_defined")
@register_preference("kto", "user_defined")
class UserDefinedPreference(PreferenceStrategy):
    """A DPO or KTO `type:` mapping (field_* columns, *_format templates), as Axolotl's."""

    def __init__(self, entry: Any, train_on_inputs: bool, style: str | None = None) -> None:
        super().__init__(entry, train_on_inputs, style)
        spec = entry.type if isinstance(entry.type, dict) else {}
        self.spec = parse_preference_format(spec, self.method)

    def _prompt_text(self, row: dict[str, Any]) -> str:
        fmt, prompt = self.spec["prompt_format"], text_field(row, self.spec["field_prompt"])
        if "{system}" not in fmt:
            return fmt.format(prompt=prompt)
        system = row.get(self.spec["field_system"])
        return fmt.format(system=as_text(system, "system column") if system else "", prompt=prompt)

    def sample(self, row: dict[str, Any]) -> PreferenceSample:
        """prompt_format/chosen_format/rejected_format (KTO: completion_format) filled in."""
        s = self.spec
        if self.method == "kto":
            completion = s["completion_format"].format(
                completion=text_field(row, s["field_completion"])
            )
            return Unpaired(self._prompt_text(row), completion, _label(row, s["field_label"]))
        return Preference(
            self._prompt_text(row),
            s["chosen_format"].format(chosen=text_field(row, s["field_chosen"])),
            s["rejected_format"].format(rejected=text_field(row, s["field_rejected"])),
        )

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Segments:
        """The prompt_format with the user's text (and no system text)."""
        prompt = self._prompt_text({self.spec["field_prompt"]: text})
        return Segments((Segment(prompt, False),), bos=True, eos=False)

    def required_columns(self) -> list[str]:
        """The field_* columns (the system column is optional)."""
        keys = (
            ("field_completion", "field_label")
            if self.method == "kto"
            else (
                "field_chosen",
                "field_rejected",
            )
        )
        return [self.spec["field_prompt"], *(self.spec[k] for k in keys)]


class ChatMessages(PreferenceStrategy):
    """Message-based formats: the prompt is a conversation, rendered by the chat template."""

    chat: ClassVar[bool] = True

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Conversation:  # type: ignore[override]
        """The history plus the user's text, with the generation prompt."""
        messages = (*(history or ()), {"role": "user", "content": text})
        return Conversation(tuple(messages), add_generation_prompt=True)


@register_preference("dpo", "chat_template", "chat_template.default", "chat_template.argilla_chat")
class DpoChatTemplate(ChatMessages):
    """Axolotl's DPO `chat_template.default` / `.argilla_chat`: messages mapped to roles, the
    completions rendered as Axolotl renders them (the text after a dummy user turn)."""

    def __init__(self, entry: Any, train_on_inputs: bool, style: str | None = None) -> None:
        super().__init__(entry, train_on_inputs, style)
        mappings = dict(entry.message_property_mappings or {"role": "role", "content": "content"})
        if entry.message_field_role:
            mappings["role"] = entry.message_field_role
        if entry.message_field_content:
            mappings["content"] = entry.message_field_content
        self.role_key = mappings.get("role", "role")
        self.content_key = mappings.get("content", "content")
        roles = entry.roles or {
            "user": ["user"],
            "assistant": ["assistant"],
            "system": ["system"],
            "tool": ["tool"],
        }
        self.role_map = {source: target for target, sources in roles.items() for source in sources}
        self.field_messages = entry.field_messages or "messages"
        self.field_chosen = entry.field_chosen or "chosen"
        self.field_rejected = entry.field_rejected or "rejected"

    def _message(self, raw: Any, what: str) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise DataError(f"{what} is not a message (a mapping with role and content)")
        role = raw.get(self.role_key)
        if role not in self.role_map:
            raise DataError(
                f"{what} has role {role!r}, which `roles` does not map; known: "
                f"{', '.join(map(str, self.role_map))}"
            )
        content = raw.get(self.content_key)
        if content is None:
            raise DataError(f"{what} has no `{self.content_key}`")
        return {"role": self.role_map[role], "content": as_text(content, what)}

    def _completion(self, row: dict[str, Any], key: str) -> dict[str, Any]:
        raw = row.get(key)
        if raw is None or raw == []:
            raise DataError(f"column `{key}` is empty (null)")
        if isinstance(raw, str):
            raw = {self.role_key: "assistant", self.content_key: raw}
        elif isinstance(raw, list | tuple):
            raw = raw[-1]
        return self._message(raw, f"column `{key}`")

    def sample(self, row: dict[str, Any]) -> Preference:
        """Prompt messages and the two last-turn completions."""
        if self.format == "chat_template.argilla_chat":
            chosen_raw = row.get(self.field_chosen)
            if not isinstance(chosen_raw, list | tuple) or not chosen_raw:
                raise DataError(f"column `{self.field_chosen}` needs a list of messages")
            prompt = [
                self._message(m, f"column `{self.field_chosen}`, message {i}")
                for i, m in enumerate(chosen_raw[:-1])
            ]
        else:
            messages = row.get(self.field_messages)
            if messages is None:
                raise DataError(f"column `{self.field_messages}` is empty (null)")
            if isinstance(messages, str):
                messages = [{self.role_key: "user", self.content_key: messages}]
            prompt = [
                self._message(m, f"column `{self.field_messages}`, message {i}")
                for i, m in enumerate(messages)
            ]
        return Preference(
            tuple(prompt),
            (self._completion(row, self.field_chosen),),
            (self._completion(row, self.field_rejected),),
            render="dpo_text",
        )

    def required_columns(self) -> list[str]:
        """The chosen and rejected columns (and the messages column for `default`)."""
        cols = [self.field_chosen, self.field_rejected]
        return cols if self.format == "chat_template.argilla_chat" else [self.field_messages, *cols]


@register_preference("orpo", "chat_template.argilla")
class OrpoArgilla(ChatMessages):
    """Axolotl's ORPO `chat_template.argilla`: turns from `chosen` (users from `prompt` when the
    row has one), the last chosen/rejected turns as completions."""

    def sample(self, row: dict[str, Any]) -> Preference:
        """System, alternating user/assistant turns, then the two completions."""
        chosen = row.get("chosen")
        if not isinstance(chosen, list | tuple) or not chosen or len(chosen) % 2:
            raise DataError(
                "column `chosen` needs a list of user/assistant message pairs (an even number)"
            )
        messages: list[dict[str, Any]] = []
        if _truthy(row, "system"):
            messages.append({"role": "system", "content": as_text(row["system"], "system")})
        turns = len(chosen) // 2
        for i in range(turns):
            user = (
                text_field(row, "prompt")
                if row.get("prompt") is not None
                else _turn(row, "chosen", 2 * i)
            )
            messages.append({"role": "user", "content": user})
            if i < turns - 1:
                messages.append({"role": "assistant", "content": _turn(row, "chosen", 2 * i + 1)})
        last_chosen = _turn(row, "chosen", len(chosen) - 1)
        rejected = row.get("rejected")
        if not isinstance(rejected, list | tuple) or not rejected:
            raise DataError("column `rejected` needs a list of messages")
        last_rejected = _turn(row, "rejected", len(rejected) - 1)
        return Preference(
            tuple(messages),
            ({"role": "assistant", "content": last_chosen},),
            ({"role": "assistant", "content": last_rejected},),
            render="orpo_text",
        )

    def required_columns(self) -> list[str]:
        """chosen and rejected message lists."""
        return ["chosen", "rejected"]


@register_preference("reward", "bradley_terry.chat_template")
class BradleyTerry(ChatMessages):
    """Axolotl's `bradley_terry.chat_template`: [system], user `input`, assistant chosen/rejected."""

    def sample(self, row: dict[str, Any]) -> Preference:
        """The two conversations, sharing the system and user turns."""
        prompt: list[dict[str, Any]] = []
        if _truthy(row, "system"):
            prompt.append({"role": "system", "content": as_text(row["system"], "system")})
        prompt.append({"role": "user", "content": text_field(row, "input")})
        return Preference(
            tuple(prompt),
            ({"role": "assistant", "content": text_field(row, "chosen")},),
            ({"role": "assistant", "content": text_field(row, "rejected")},),
        )

    def required_columns(self) -> list[str]:
        """input, chosen and rejected."""
        return ["input", "chosen", "rejected"]


def _messages(value: Any, key: str) -> Messages:
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"column `{key}`, message {i}: not a message with a role")
        out.append(dict(m))  # as TRL hands them to the template (None fields included)
    return tuple(out)


def _is_chat(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and isinstance(value[0], dict)


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """TRL's extract_prompt: the longest common prefix of chosen and rejected is the prompt
    (text: a space before the split point goes with the completions)."""
    n = min(len(chosen), len(rejected))
    if n == 0:
        raise DataError("chosen or rejected is empty, so no prompt can be extracted")
    idx = n - 1  # TRL's loop variable when no difference is found
    for idx in range(n):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _tools(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    import json

    tools = row.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools


@register_preference("dpo", "preference")
@register_preference("orpo", "preference")
@register_preference("kto", "preference")
@register_preference("reward", "preference")
class TrlPreference(ChatMessages):
    """TRL's preference format: `prompt` (optional: implicit), `chosen`, `rejected`, as text or
    conversations; optional `margin` (reward models) and `tools`."""

    def sample(self, row: dict[str, Any]) -> Preference:
        """The row's parts, the prompt extracted when implicit."""
        for key in ("chosen", "rejected"):
            if row.get(key) is None:
                raise DataError(
                    f"column `{key}` is empty (null); a preference row needs both sides"
                )
        chat = _is_chat(row["chosen"])
        parts: list[Any] = []
        for key in ("prompt", "chosen", "rejected"):
            value = row.get(key)
            if value is None:
                parts.append(None)
            elif chat != _is_chat(value):
                raise DataError(
                    f"column `{key}` is {'text' if chat else 'a message list'} while `chosen` "
                    f"is {'a message list' if chat else 'text'}; a row is all text or all messages"
                )
            else:
                parts.append(_messages(value, key) if chat else as_text(value, f"column `{key}`"))
        prompt, chosen, rejected = parts
        if prompt is None:
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
        margin = row.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, int | float)):
            raise DataError(f"column `margin` must be a number, not {margin!r}")
        return Preference(
            prompt,
            chosen,
            rejected,
            tools=_tools(row),
            margin=None if margin is None else float(margin),
        )

    def required_columns(self) -> list[str]:
        """chosen and rejected (prompt is optional)."""
        return ["chosen", "rejected"]


@register_preference("kto", "unpaired_preference")
class TrlUnpairedPreference(ChatMessages):
    """TRL's unpaired preference format: `prompt`, `completion`, `label`."""

    def sample(self, row: dict[str, Any]) -> Unpaired:
        """The row's prompt and completion (text or conversations) and its label."""
        completion = row.get("completion")
        if completion is None:
            raise DataError("column `completion` is empty (null)")
        prompt = row.get("prompt")
        if prompt is None:
            raise DataError("column `prompt` is empty (null)")
        chat = _is_chat(completion)
        if chat != _is_chat(prompt):
            raise DataError("`prompt` and `completion` must both be text or both message lists")
        if chat:
            return Unpaired(
                _messages(prompt, "prompt"),
                _messages(completion, "completion"),
                _label(row, "label"),
                tools=_tools(row),
            )
        return Unpaired(
            as_text(prompt, "column `prompt`"),
            as_text(completion, "column `completion`"),
            _label(row, "label"),
        )

    def required_columns(self) -> list[str]:
        """prompt, completion and label."""
        return ["prompt", "completion", "label"]
