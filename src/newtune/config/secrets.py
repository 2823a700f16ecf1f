"""Keep tokens and API keys out of anything newtune writes or prints."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
TOKEN_RE = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|AKIA[0-9A-Z]{16}|xox[abposr]-[A-Za-z0-9-]{10,})\b"
)
SECRET_KEY_RE = re.compile(r"(token|secret|password|api_key|apikey)", re.IGNORECASE)


def redact(value: Any, key: str = "") -> Any:
    """A copy of `value` with token-like strings, and strings under secret-named keys, redacted."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if SECRET_KEY_RE.search(key) and value:
            return REDACTED
        return TOKEN_RE.sub(REDACTED, value)
    return value
