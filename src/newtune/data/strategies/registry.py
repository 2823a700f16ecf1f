"""Registry of prompt strategies: `@register("name")` and lookup by a dataset entry's type."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from newtune.errors import ConfigError

if TYPE_CHECKING:
    from newtune.config.schema import DatasetEntry
    from newtune.data.strategies.base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str):  # noqa: ANN201
    """Class decorator that makes a strategy available as `type: name`."""

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def known_types() -> list[str]:
    """Names of every registered strategy."""
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    from newtune.data.strategies import alpaca, chat_template, completion  # noqa: F401


def get_strategy(entry: DatasetEntry, index: int, train_on_inputs: bool) -> Strategy:
    """Instantiate the strategy named by `datasets[index].type`."""
    known = known_types()
    if entry.type is None:
        raise ConfigError(
            f"`datasets[{index}].type` is missing for {entry.path}; set it to one of: "
            f"{', '.join(known)}."
        )
    cls = _REGISTRY.get(entry.type)
    if cls is None:
        match = difflib.get_close_matches(entry.type, known, n=1, cutoff=0.5)
        hint = f" Did you mean `{match[0]}`?" if match else ""
        raise ConfigError(
            f"`datasets[{index}].type: {entry.type}` is not a dataset format newtune knows.{hint} "
            f"Known formats: {', '.join(known)}."
        )
    return cls(entry, train_on_inputs)
