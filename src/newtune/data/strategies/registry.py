"""Registry of prompt strategies, and lookup of a dataset entry's `type`.

A `type:` string is looked up as: a registered name (`alpaca`, `alpaca_chat.load_qa`), with
an optional prompt style (`alpaca:chatml`); `name.load` (the same as `name`); an installed
plugin (entry point group `newtune.strategies`); a dotted import path (`pkg.module.load_fn`,
`pkg.module.StrategyClass`, or `pkg.module` for its `load`). A plugin is a Strategy subclass,
or a function `load_fn(entry, train_on_inputs)` returning a Strategy. A `type:` mapping is a
user-defined format.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from newtune.config.schema.formats import (
    ENTRY_POINT_GROUP,
    FORMATS,
    METHOD_LABELS,
    PREFERENCE_FORMATS,
    UnknownFormat,
    builtin_name,
    key_problems,
    method_mismatch,
    parse_preference_format,
)
from newtune.errors import ConfigError

if TYPE_CHECKING:
    from newtune.config.schema import DatasetEntry
    from newtune.data.strategies.base import Strategy

BUILTIN_MODULES = (
    "alpaca",
    "chat_template",
    "completion",
    "context_qa",
    "creative_acr",
    "input_output",
    "instruct_datasets",
    "metharme",
    "preference",
    "sharegpt",
    "stepwise_supervised",
    "trl",
    "user_defined",
)
_REGISTRY: dict[str, type[Strategy]] = {}
# method -> format name -> strategy class (see config.schema.formats.PREFERENCE_FORMATS);
# "user_defined" is the class of a `type:` mapping
_PREFERENCE_REGISTRY: dict[str, dict[str, type[Strategy]]] = {}


def register_preference(method: str, *names: str):  # noqa: ANN201
    """Class decorator: the strategy of `type: name` for each name under a training method.

    The instance gets the name as its `style` (one class serves a family of names) and the
    entry keys it reads from `config.schema.formats.PREFERENCE_FORMATS`.
    """

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        for name in names:
            _PREFERENCE_REGISTRY.setdefault(method, {})[name] = cls
        return cls

    return wrap


def register(name: str):  # noqa: ANN201
    """Class decorator that makes a strategy available as `type: name`.

    A built-in name takes its prompt styles and the entry keys it reads from
    `config.schema.formats.FORMATS`; another name keeps the class's own (plugins).
    """

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        if name in FORMATS:
            cls.styles = FORMATS[name].styles
            cls.entry_keys = FORMATS[name].reads
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(f"newtune.data.strategies.{module}")


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def known_types() -> list[str]:
    """Every registered format (`name.load_fn` variants included) and installed plugin."""
    _load_builtin()
    return sorted({*_REGISTRY, *(ep.name for ep in _entry_points())})


def _spellings() -> list[str]:
    """Known names plus `name:style` spellings, for did-you-mean."""
    styled = [f"{n}:{s}" for n, cls in _REGISTRY.items() for s in cls.styles]
    return [*known_types(), *styled]


@dataclass(frozen=True)
class _Found:
    factory: Any  # a Strategy subclass or a load function
    name: str
    style: str | None = None


def _import_path(path: str) -> Any | None:
    """The object a dotted path names (a module stands for its `load`); None if no module."""
    from newtune.trust import check_code_allowed

    check_code_allowed(f"the plugin `{path}`")  # before find_spec, which imports parents
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):  # a parent is missing or is not a package
            spec = None
        if spec is None:
            continue
        try:
            obj = importlib.import_module(module_name)
        except Exception as exc:  # a plugin's import can fail in any way; report it
            raise ConfigError(
                f"importing the plugin module `{module_name}` failed: {exc!r}"
            ) from exc
        attrs = parts[cut:] or ["load"]
        for attr in attrs:
            if not hasattr(obj, attr):
                raise ConfigError(f"module `{module_name}` has no `{'.'.join(attrs)}`")
            obj = getattr(obj, attr)
        return obj
    return None


def _find_preference(type_name: str, method: str | None) -> _Found | None:
    """A preference format of `method` (None: of any method, DPO's first); ConfigError when
    the name belongs to another method or is an SFT format."""
    why = method_mismatch(type_name, method)
    if why:
        raise ConfigError(why)
    for name in [method] if method else PREFERENCE_FORMATS:
        cls = _PREFERENCE_REGISTRY.get(str(name), {}).get(type_name)
        if cls is not None:
            return _Found(cls, type_name, f"{name}:{type_name}")
    return None


def _find(type_name: str, method: str | None = None) -> _Found | None:
    """Resolve a `type:` string for a training method; None when nothing answers to it."""
    _load_builtin()
    if method == "sft":
        why = method_mismatch(type_name, method)
        if why:
            raise ConfigError(why)
    elif method is not None:  # a preference method: its formats or a plugin
        return _find_preference(type_name, method) or _find_plugin(type_name)
    elif type_name not in FORMATS and type_name.split(".")[0] not in FORMATS:
        found = _find_preference(type_name, None)  # any method: SFT names first
        if found is not None:
            return found
    try:
        builtin = builtin_name(type_name)
    except UnknownFormat:
        return None  # a variant of a built-in format that does not exist
    except ValueError as exc:  # a bad style or spelling of a built-in format
        raise ConfigError(str(exc)) from None
    if builtin is not None:
        return _Found(_REGISTRY[builtin[0]], builtin[0], builtin[1])
    if type_name in _REGISTRY:  # a plugin that registered its own name
        return _Found(_REGISTRY[type_name], type_name)
    return _find_plugin(type_name)


def _find_plugin(type_name: str) -> _Found | None:
    """An installed entry point or a dotted import path; None when neither."""
    for ep in _entry_points():
        if ep.name == type_name:
            try:
                return _Found(ep.load(), type_name)
            except Exception as exc:  # a plugin's import can fail in any way; report it
                raise ConfigError(
                    f"loading the plugin `{ep.value}` (entry point `{ep.name}` of group "
                    f"{ENTRY_POINT_GROUP}) failed: {exc!r}"
                ) from exc
    if "." in type_name:
        obj = _import_path(type_name)
        if obj is not None:
            return _Found(obj, type_name)
    return None


def _instantiate(found: _Found, entry: DatasetEntry, train_on_inputs: bool) -> Strategy:
    from newtune.data.strategies.base import Strategy

    factory = found.factory
    if found.style and ":" in found.style:  # a preference format: style is "method:name"
        method, _, name = found.style.partition(":")
        strategy = factory(entry, train_on_inputs, style=found.style)
        strategy.name = found.style  # type: ignore[misc]  # one class serves several names
        fmt = PREFERENCE_FORMATS.get(method, {}).get(name)
        strategy.entry_keys = fmt.reads if fmt else frozenset()  # type: ignore[misc]
        return strategy
    if isinstance(factory, type) and issubclass(factory, Strategy):
        style = {"style": found.style} if found.style else {}
        strategy = factory(entry, train_on_inputs, **style)
    elif callable(factory) and not isinstance(factory, type):
        try:
            strategy = factory(entry, train_on_inputs)
        except TypeError as exc:
            raise ConfigError(
                f"`{found.name}` must be callable as load(entry, train_on_inputs): {exc}"
            ) from exc
    else:
        raise ConfigError(
            f"`{found.name}` names {factory!r}, which is neither a newtune Strategy subclass "
            "nor a function load(entry, train_on_inputs)"
        )
    if not isinstance(strategy, Strategy):
        raise ConfigError(
            f"`{found.name}` returned {type(strategy).__name__}, not a newtune Strategy"
        )
    if not strategy.name:
        strategy.name = found.name  # type: ignore[misc]  # plugins without @register
    return strategy


def _check_entry_keys(strategy: Strategy, entry: DatasetEntry, where: str, builtin: bool) -> None:
    """Entry keys set on the entry that this format does not read are errors.

    A plugin whose class does not declare `entry_keys` itself (it may inherit a built-in
    format's) reads any key.
    """
    reads = strategy.entry_keys
    if not builtin and "entry_keys" not in vars(type(strategy)):
        reads = None
    if isinstance(entry.type, dict):
        problems = key_problems(entry, where, frozenset(), "a `type:` mapping")
    else:
        problems = key_problems(entry, where, reads, f"`type: {entry.type}`")
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?")) else text + "."


def get_strategy(
    entry: DatasetEntry,
    index: int,
    train_on_inputs: bool,
    key: str = "datasets",
    method: str | None = None,
) -> Strategy:
    """Instantiate the strategy named by `{key}[index].type`; ConfigError when it cannot.

    `method` (config.schema.preference.training_method) picks the formats a name means
    (`rl: kto` reads `chatml.intel` as KTO's); None resolves SFT formats first, then
    preference formats (inference, which only renders prompts).
    """
    where = f"{key}[{index}]"
    if entry.type is None:
        raise ConfigError(
            f"`{where}.type` is missing for {entry.path}; set it to one of: "
            f"{', '.join(known_types())}."
        )
    if isinstance(entry.type, dict):
        label = f"`{where}.type` (a user-defined format)"
        _load_builtin()
        found: _Found | None = _Found(_REGISTRY["user_defined"], "user_defined")
        if method not in (None, "sft"):
            try:
                parse_preference_format(entry.type, method)
            except ValueError as exc:
                raise ConfigError(_sentence(f"{label}: {exc}")) from None
            cls = _PREFERENCE_REGISTRY[method]["user_defined"]
            found = _Found(cls, "user_defined", f"{method}:user_defined")
    else:
        label = f"`{where}.type: {entry.type}`"
        why = method_mismatch(entry.type, method)
        if why:
            raise ConfigError(_sentence(f"{label} {why}"))
        try:
            found = _find(entry.type, method)
        except ConfigError as exc:
            raise ConfigError(_sentence(f"{label}: {exc}")) from None
    if found is None and method not in (None, "sft"):
        raise ConfigError(
            f"{label} is not a dataset format of {METHOD_LABELS[method]}. Known formats: "
            f"{', '.join(sorted(PREFERENCE_FORMATS[method]))}."
        )
    if found is None:
        variants = [k for k in known_types() if k.startswith(f"{entry.type}.")]
        match = difflib.get_close_matches(entry.type, _spellings(), n=1, cutoff=0.5)
        if variants:
            hint = f" Did you mean one of {', '.join(f'`{v}`' for v in variants)}?"
        else:
            hint = f" Did you mean `{match[0]}`?" if match else ""
        raise ConfigError(
            f"{label} is not a dataset format newtune knows.{hint} "
            f"Known formats: {', '.join(known_types())}."
        )
    try:
        strategy = _instantiate(found, entry, train_on_inputs)
    except ConfigError as exc:
        raise ConfigError(_sentence(f"{label}: {exc}")) from None
    preference = bool(found.style and ":" in found.style)
    _check_entry_keys(strategy, entry, where, builtin=found.name in FORMATS or preference)
    return strategy


def type_problems(
    entry: DatasetEntry, index: int, key: str = "datasets", method: str | None = None
) -> list[str]:
    """What is wrong with an entry's `type` (unknown, bad style, bad mapping), for validation."""
    if entry.type is None:
        return []
    try:
        get_strategy(entry, index, train_on_inputs=False, key=key, method=method)
    except ConfigError as exc:
        return [str(exc).removesuffix(".")]
    return []
