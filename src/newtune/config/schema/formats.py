"""The dataset formats newtune has, and which dataset-entry keys each one reads.

This is the registry's metadata, below both the config and the data code: the config checks
a `datasets:` entry against it without importing any format code, and
`data.strategies.register(name)` gives each built-in strategy class its styles and entry keys
from here. A `type:` that names no built-in format is a plugin (an entry point of group
`newtune.strategies` or a dotted import path); its keys cannot be known, so all are allowed.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from newtune.chat_templates import NAMED_TEMPLATES

if TYPE_CHECKING:
    from newtune.config.schema.data import DatasetEntry

ENTRY_POINT_GROUP = "newtune.strategies"

# Keys that say where the rows come from: every entry may set them, whatever its format.
SOURCE_KEYS = frozenset(
    {
        "path",
        "type",
        "ds_type",
        "data_files",
        "split",
        "name",
        "train_on_split",
        "revision",
        "shards",
    }
)
# Read by the tokenizing engine for chat conversations.
CHAT_ENGINE_KEYS = frozenset(
    {"chat_template", "chat_template_jinja", "roles_to_train", "train_on_eos"}
)
# How the keys of a row's messages map onto role and content.
MESSAGE_KEYS = frozenset(
    {"message_property_mappings", "message_field_role", "message_field_content", "roles"}
)
PROMPT_STYLES = ("instruct", "chat", "chatml", "phi")


class UserDefinedFormat(BaseModel):
    """The keys of a user-defined format (a `type:` mapping), with Axolotl's defaults."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str = ""
    system_format: str = "{system}"
    field_system: str = "system"
    field_instruction: str = "instruction"
    field_input: str = "input"
    field_output: str = "output"
    format: str = "{instruction} {input} "
    no_input_format: str = "{instruction} "


USER_DEFINED_KEYS = frozenset(UserDefinedFormat.model_fields)
PLACEHOLDERS = {
    "format": {"instruction", "input"},
    "no_input_format": {"instruction"},
    "system_format": {"system"},
}


class UnknownFormat(ValueError):
    """A `type:` string that names no format; the message starts with "is not"."""


@dataclass(frozen=True)
class Format:
    """A built-in format: the entry keys it reads (besides SOURCE_KEYS) and its prompt styles.

    `values` limits what some of those keys may hold (e.g. alpaca_chat's `conversation`).
    """

    reads: frozenset[str] = frozenset()
    styles: tuple[str, ...] = ()
    values: dict[str, tuple[str, ...]] = field(default_factory=dict)


_PLAIN = Format()
_STYLED = Format(styles=PROMPT_STYLES)
_CHAT = Format(
    CHAT_ENGINE_KEYS
    | MESSAGE_KEYS
    | {"field_messages", "message_field_training", "drop_system_message", "field_tools"}
    | {"field_thinking", "template_thinking_key"}
)
FORMATS: dict[str, Format] = {
    "alpaca": _STYLED,
    "alpaca_chat": Format(frozenset({"conversation"}), values={"conversation": PROMPT_STYLES}),
    "alpaca_chat.load_camel_ai": _PLAIN,
    "alpaca_chat.load_concise": _PLAIN,
    "alpaca_chat.load_no_prompt": _PLAIN,
    "alpaca_chat.load_qa": _PLAIN,
    "alpaca_instruct": _PLAIN,
    "alpaca_instruct.load_no_prompt": _PLAIN,
    "alpaca_w_system": _PLAIN,
    "alpaca_w_system.load_chat": _PLAIN,
    "alpaca_w_system.load_instruct": _PLAIN,
    "alpaca_w_system.load_open_orca": _PLAIN,
    "alpaca_w_system.load_open_orca_chatml": _PLAIN,
    "chat_template": _CHAT,
    "completion": Format(frozenset({"field"})),
    "concisechoice": _PLAIN,
    "context_qa": _PLAIN,
    "context_qa.load_404": _PLAIN,
    "context_qa.load_v2": _PLAIN,
    "creative_acr.load_answer": _PLAIN,
    "creative_acr.load_critique": _PLAIN,
    "creative_acr.load_revise": _PLAIN,
    "explainchoice": _STYLED,
    "gpteacher": _STYLED,
    "input_output": _PLAIN,
    "jeopardy": _STYLED,
    "messages": Format(CHAT_ENGINE_KEYS | MESSAGE_KEYS | {"field_messages", "field_tools"}),
    "metharme": _PLAIN,
    "oasst": _STYLED,
    # every message's train flag is set (prompt: train_on_inputs), so roles_to_train is unused
    "prompt_completion": Format(
        (CHAT_ENGINE_KEYS - {"roles_to_train"}) | MESSAGE_KEYS | {"field_tools"}
    ),
    "reflection": Format(styles=("instruct", "chat")),
    # `conversation:` names the chat template to render with
    "sharegpt": Format(
        CHAT_ENGINE_KEYS
        | MESSAGE_KEYS
        | {"field_messages", "conversation", "field_human", "field_model"},
        values={"conversation": tuple(NAMED_TEMPLATES)},
    ),
    "summarizetldr": _PLAIN,
    "user_defined": Format(USER_DEFINED_KEYS),
}
USER_DEFINED = "user_defined"


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def parse_format(spec: dict[str, Any]) -> UserDefinedFormat:
    """Validate a user-defined format; ValueError naming the bad key."""
    given = {k: v for k, v in spec.items() if v is not None}  # null keeps the default
    unknown = sorted(set(given) - USER_DEFINED_KEYS)
    if unknown:
        hints = []
        for key in unknown:
            match = difflib.get_close_matches(key, sorted(USER_DEFINED_KEYS), n=1, cutoff=0.6)
            hints.append(f"`{key}`" + (f" (did you mean `{match[0]}`?)" if match else ""))
        raise ValueError(
            f"unknown key(s) {', '.join(hints)}; a user-defined format takes "
            f"{', '.join(sorted(USER_DEFINED_KEYS))}"
        )
    try:
        fmt = UserDefinedFormat.model_validate(given)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"`{first['loc'][0]}`: {first['msg']}") from None
    for key, allowed in PLACEHOLDERS.items():
        template = getattr(fmt, key)
        try:
            bad = sorted(_placeholders(template) - allowed)
        except ValueError as exc:
            raise ValueError(f"`{key}: {template!r}` is not a valid template ({exc})") from None
        if bad:
            raise ValueError(
                f"`{key}: {template!r}` uses {', '.join('{' + b + '}' for b in bad)}; "
                f"it may only use {', '.join('{' + a + '}' for a in sorted(allowed))} "
                "(write {{ and }} for literal braces)"
            )
    return fmt


def entry_point_names() -> list[str]:
    """Names of the installed plugin formats (entry points; their code is not imported)."""
    return [ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]


def format_names() -> list[str]:
    """Every built-in format and installed plugin name, sorted."""
    return sorted({*FORMATS, *entry_point_names()})


def builtin_name(type_name: str) -> tuple[str, str | None] | None:
    """(built-in format, style) a `type:` string names; None when it names no built-in format.

    `name.load` is `name`; `name:style` picks a style. ValueError when the name is built-in
    but the spelling is wrong (unknown style, `:load_x` for `.load_x`); UnknownFormat for an
    unknown `name.variant` of a built-in name.
    """
    if type_name in FORMATS:
        return type_name, None
    base, colon, style = type_name.partition(":")
    if colon:
        if "." in base and base.removesuffix(".load") not in FORMATS:
            if base.split(".")[0] in FORMATS:
                raise UnknownFormat(_unknown(base))
            raise ValueError(f"plugin paths are written with dots only: `{base}.{style}`")
        found = builtin_name(base)
        if found is None:
            raise UnknownFormat(_unknown(base))
        styles = FORMATS[found[0]].styles
        if style.startswith("load") and not styles:
            raise ValueError(
                f"loader variants are written with a dot: did you mean `{base}.{style}`?"
            )
        if style not in styles:
            what = f"its styles are {', '.join(styles)}" if styles else "it takes no style"
            raise ValueError(f"`{base}` has no prompt style `{style}`; {what}")
        return found[0], style
    if type_name.endswith(".load") and type_name.removesuffix(".load") in FORMATS:
        return type_name.removesuffix(".load"), None
    if type_name.split(".")[0] in FORMATS:
        raise UnknownFormat(_unknown(type_name))
    return None


def _unknown(type_name: str) -> str:
    variants = [k for k in format_names() if k.startswith(f"{type_name}.")]
    spellings = [*format_names(), *(f"{n}:{s}" for n, f in FORMATS.items() for s in f.styles)]
    match = difflib.get_close_matches(type_name, spellings, n=1, cutoff=0.5)
    if variants:
        hint = f" Did you mean one of {', '.join(f'`{v}`' for v in variants)}?"
    else:
        hint = f" Did you mean `{match[0]}`?" if match else ""
    return (
        f"is not a dataset format newtune knows.{hint} Known formats: {', '.join(format_names())}"
    )


def is_plugin(type_name: str) -> bool:
    """Whether a `type:` string names a plugin format (code that runs when the data is read)."""
    try:
        if builtin_name(type_name) is not None:
            return False
    except ValueError:
        return False
    return type_name in entry_point_names() or "." in type_name


def _module_exists(path: str) -> bool:
    """Whether the top-level package of a dotted path is installed (nothing is imported)."""
    try:
        return importlib.util.find_spec(path.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def readers_of(key: str) -> list[str]:
    """The built-in formats that read an entry key (variants folded into their family)."""
    tables = [FORMATS, *PREFERENCE_FORMATS.values()]
    names = list(dict.fromkeys(n for t in tables for n, f in t.items() if key in f.reads))
    return [n for n in names if n.split(".")[0] == n or n.split(".")[0] not in names]


def key_problems(
    entry: DatasetEntry, where: str, reads: frozenset[str] | None, label: str
) -> list[str]:
    """Entry keys set to a value that the format (`label`, e.g. "`type: alpaca`") does not read.

    `reads` None (a plugin) allows every key.
    """
    if reads is None:
        return []
    problems = []
    for key in type(entry).model_fields:
        if key in SOURCE_KEYS or key in reads or getattr(entry, key) is None:
            continue
        readers = readers_of(key)
        if isinstance(entry.type, dict) and key in USER_DEFINED_KEYS:
            problems.append(
                f"`{where}.{key}` is set beside a `type:` mapping; move it into the mapping"
            )
            continue
        also = f" (read by {', '.join(f'`type: {r}`' for r in readers)})" if readers else ""
        problems.append(f"`{where}.{key}` is set, but {label} does not read it{also}; remove it")
    return problems


def entry_problems(entry: DatasetEntry, where: str, method: str = "sft") -> list[str]:
    """What is wrong with a dataset entry's `type` and format keys, without running format code.

    `method` is the training method (config.schema.preference.training_method): it chooses
    the formats a name resolves to. Plugins (entry points, dotted paths) are only checked to
    exist; their own checks run when the data is read.
    """
    kind = entry.type
    if kind is None:
        return []
    if method != "sft":
        return preference_entry_problems(entry, where, method)
    why = method_mismatch(kind, method) if isinstance(kind, str) else None
    if why:
        return [f"`{where}.type: {kind}` {why}"]
    if isinstance(kind, dict):
        try:
            parse_format(kind)
        except ValueError as exc:
            return [f"`{where}.type` (a user-defined format): {exc}"]
        return key_problems(entry, where, frozenset(), "a `type:` mapping")
    label = f"`{where}.type: {kind}`"
    try:
        found = builtin_name(kind)
    except UnknownFormat as exc:
        return [f"{label} {exc}"]
    except ValueError as exc:
        return [f"{label}: {exc}"]
    if found is None:
        if kind in entry_point_names() or ("." in kind and _module_exists(kind)):
            return []
        return [f"{label} {_unknown(kind)}"]
    name, _ = found
    fmt = FORMATS[name]
    problems = []
    for key, allowed in fmt.values.items():
        value = getattr(entry, key)
        if value is not None and value not in allowed:
            problems.append(
                f"`{where}.{key}: {value}` is not one of {', '.join(allowed)} (for "
                f"`type: {name}`); use one of them or remove the key"
            )
    if name == USER_DEFINED:
        try:
            parse_format({k: getattr(entry, k) for k in USER_DEFINED_KEYS})
        except ValueError as exc:
            problems.append(f"{label}: {exc}")
    return problems + key_problems(entry, where, fmt.reads, f"`type: {kind}`")


# -- preference and reward formats ---------------------------------------------------------
# Axolotl resolves a `type:` in a namespace chosen by the training method (`rl: kto` reads
# `chatml.intel` from prompt_strategies/kto, `rl: dpo` from prompt_strategies/dpo), so these
# tables are per method; TRL's own `preference` / `unpaired_preference` formats are in each
# method that can read them.

_TEMPLATE_KEYS = frozenset({"chat_template", "chat_template_jinja"})
_PREF_TEMPLATE = Format(_TEMPLATE_KEYS)
_PREF_MESSAGES = Format(
    _TEMPLATE_KEYS
    | {"field_chosen", "field_rejected", "message_property_mappings", "roles"}
    | {"message_field_role", "message_field_content"}
)
# Axolotl's DPO chatml/llama3 functions (there is no DPO `argilla`; KTO has no `icr`/`default`);
# a name without a dot means its `.default`, as in Axolotl's loader
_DPO_TURNS = ("default", "argilla_chat", "icr", "intel", "prompt_pairs", "ultra")
_KTO_TURNS = ("argilla", "argilla_chat", "intel", "prompt_pairs", "ultra")
PREFERENCE_FORMATS: dict[str, dict[str, Format]] = {
    "dpo": {
        **{f"{t}.{v}": _PLAIN for t in ("chatml", "llama3") for v in _DPO_TURNS},
        "chatml": _PLAIN,
        "llama3": _PLAIN,
        "zephyr.nectar": _PLAIN,
        "chat_template": Format(_PREF_MESSAGES.reads | {"field_messages"}),
        "chat_template.default": Format(_PREF_MESSAGES.reads | {"field_messages"}),
        "chat_template.argilla_chat": _PREF_MESSAGES,
        "preference": _PREF_TEMPLATE,
    },
    "orpo": {"chat_template.argilla": _PREF_TEMPLATE, "preference": _PREF_TEMPLATE},
    "kto": {
        **{f"{t}.{v}": _PLAIN for t in ("chatml", "llama3") for v in _KTO_TURNS},
        "preference": _PREF_TEMPLATE,
        "unpaired_preference": _PREF_TEMPLATE,
    },
    "reward": {"bradley_terry.chat_template": _PREF_TEMPLATE, "preference": _PREF_TEMPLATE},
    "prm": {
        "stepwise_supervised": Format(
            frozenset({"step_separator", "max_completion_length", "train_on_last_step_only"})
        )
    },
}
# `type:` mappings (user-defined formats) of DPO and KTO: key -> Axolotl's default
PREFERENCE_USER_DEFINED: dict[str, dict[str, str]] = {
    "dpo": {
        "field_prompt": "prompt",
        "field_system": "system",
        "field_chosen": "chosen",
        "field_rejected": "rejected",
        "prompt_format": "{prompt}",
        "chosen_format": "{chosen}",
        "rejected_format": "{rejected}",
    },
    "kto": {
        "field_prompt": "prompt",
        "field_system": "system",
        "field_completion": "completion",
        "field_label": "label",
        "prompt_format": "{prompt}",
        "completion_format": "{completion}",
    },
}
PREFERENCE_PLACEHOLDERS = {
    "prompt_format": {"prompt", "system"},
    "chosen_format": {"chosen"},
    "rejected_format": {"rejected"},
    "completion_format": {"completion"},
}
METHOD_LABELS = {
    "sft": "supervised fine-tuning (no `rl:`)",
    "dpo": "`rl: dpo`/`ipo`/`simpo`",
    "orpo": "`rl: orpo`",
    "kto": "`rl: kto`",
    "reward": "`reward_model: true`",
    "prm": "`process_reward_model: true`",
}


def parse_preference_format(spec: dict[str, Any], method: str) -> dict[str, str]:
    """A DPO/KTO `type:` mapping with Axolotl's defaults filled in; ValueError naming the key."""
    if method not in PREFERENCE_USER_DEFINED:
        raise ValueError(
            f"a `type:` mapping (user-defined format) is read with {METHOD_LABELS['dpo']} or "
            f"{METHOD_LABELS['kto']}, not with {METHOD_LABELS[method]}; name a format instead"
        )
    defaults = PREFERENCE_USER_DEFINED[method]
    given = {k: v for k, v in spec.items() if v is not None}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        hints = []
        for key in unknown:
            match = difflib.get_close_matches(key, sorted(defaults), n=1, cutoff=0.6)
            hints.append(f"`{key}`" + (f" (did you mean `{match[0]}`?)" if match else ""))
        raise ValueError(
            f"unknown key(s) {', '.join(hints)}; with {METHOD_LABELS[method]} a user-defined "
            f"format takes {', '.join(sorted(defaults))}"
        )
    out = dict(defaults)
    for key, value in given.items():
        if not isinstance(value, str):
            raise ValueError(f"`{key}` must be text, not {type(value).__name__}")
        out[key] = value or defaults[key]  # Axolotl: an empty format means the default
    for key, allowed in PREFERENCE_PLACEHOLDERS.items():
        if key not in out:
            continue
        try:
            bad = sorted(_placeholders(out[key]) - allowed)
        except ValueError as exc:
            raise ValueError(f"`{key}: {out[key]!r}` is not a valid template ({exc})") from None
        if bad:
            raise ValueError(
                f"`{key}: {out[key]!r}` uses {', '.join('{' + b + '}' for b in bad)}; it may "
                f"only use {', '.join('{' + a + '}' for a in sorted(allowed))}"
            )
    return out


def preference_formats(method: str) -> dict[str, Format]:
    """The formats a preference method reads (empty for sft)."""
    return PREFERENCE_FORMATS.get(method, {})


def method_mismatch(type_name: str, method: str | None) -> str | None:
    """Why a `type:` name cannot be read by `method` (None: it can, or it is not built-in).

    The message starts with "is"; `method` None (any method) never mismatches.
    """
    if method is None or type_name in preference_formats(method):
        return None
    readers = [m for m, table in PREFERENCE_FORMATS.items() if type_name in table]
    if method == "sft":
        if not readers or type_name in FORMATS:  # `chat_template` is SFT's and DPO's
            return None
        return (
            f"is a preference format (read with {' or '.join(METHOD_LABELS[m] for m in readers)}"
            "), but the config trains with supervised fine-tuning; set `rl:` (or "
            "`reward_model: true`), or use an SFT format such as chat_template or alpaca"
        )
    try:
        sft = builtin_name(type_name) is not None
    except ValueError:
        sft = type_name.split(".")[0] in FORMATS
    if not sft and not readers:
        return None
    kind = "an SFT format" if sft else f"read with {' or '.join(METHOD_LABELS[m] for m in readers)}"
    return (
        f"is {kind}, not a format of {METHOD_LABELS[method]}; its formats are "
        f"{', '.join(sorted(preference_formats(method)))}"
        + (" or a `type:` mapping" if method in PREFERENCE_USER_DEFINED else "")
        + (
            ". Process reward rows need a prompt, its steps (`completions`) and one label per step"
            if method == "prm"
            else ". Preference rows need a prompt with a chosen and a rejected completion"
        )
        + (" (or one completion and a label)" if method == "kto" else "")
    )


def preference_entry_problems(entry: DatasetEntry, where: str, method: str) -> list[str]:
    """entry_problems for a preference method."""
    kind = entry.type
    if isinstance(kind, dict):
        try:
            parse_preference_format(kind, method)
        except ValueError as exc:
            return [f"`{where}.type` (a user-defined format): {exc}"]
        return key_problems(entry, where, frozenset(), "a `type:` mapping")
    label = f"`{where}.type: {kind}`"
    why = method_mismatch(str(kind), method)
    if why:
        return [f"{label} {why}"]
    fmt = preference_formats(method).get(str(kind))
    if fmt is None:  # a plugin: checked to exist
        if kind in entry_point_names() or ("." in str(kind) and _module_exists(str(kind))):
            return []
        match = difflib.get_close_matches(str(kind), sorted(preference_formats(method)), n=1)
        hint = f" Did you mean `{match[0]}`?" if match else ""
        return [
            f"{label} is not a dataset format of {METHOD_LABELS[method]}.{hint} Known "
            f"formats: {', '.join(sorted(preference_formats(method)))}"
        ]
    return key_problems(entry, where, fmt.reads, f"`type: {kind}`")
