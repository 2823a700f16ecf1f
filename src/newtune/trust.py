"""Whether newtune may import code that a config names: not for a config from a URL, unless allowed.

`config.load` sets the refusal while it validates such a config; whatever would import code
named by the config (a plugin format's dotted path) calls `check_code_allowed` first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from newtune.errors import ConfigError

_REFUSAL: ContextVar[str | None] = ContextVar("newtune_code_refusal", default=None)


@contextmanager
def code_refused(reason: str | None) -> Iterator[None]:
    """Within the block, importing code a config names is refused for `reason` (None: allowed)."""
    token = _REFUSAL.set(reason)
    try:
        yield
    finally:
        _REFUSAL.reset(token)


def check_code_allowed(what: str) -> None:
    """Raise ConfigError when importing `what` is refused in this context."""
    reason = _REFUSAL.get()
    if reason is not None:
        raise ConfigError(f"{what} would be imported (running its code), but {reason}")
