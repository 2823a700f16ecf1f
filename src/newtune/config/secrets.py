"""Keep tokens and API keys out of anything newtune writes or prints."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
# Values that look like a token or key, whatever key they are under.
TOKEN_RE = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,})\b"
)
# Keys whose string value is a secret. Not `token` alone as a part: `tokens`, `special_tokens`,
# `eot_tokens`, `tokenizer_config` and `pad_token` are not secrets.
SECRET_KEY_RE = re.compile(
    r"(^token$|auth_token|access_token|hf_token|api_?key|secret|password|passwd|credential"
    r"|private_key)",
    re.IGNORECASE,
)


def is_secret_key(key: str) -> bool:
    """True when a key's name says its string value is a secret (`wandb_api_key`, `hf_token`)."""
    return bool(SECRET_KEY_RE.search(key.rsplit(".", 1)[-1].split("[", 1)[0]))


def looks_secret(value: Any, key: str = "") -> bool:
    """True when printing `value` (under `key`) could print a token or key."""
    if isinstance(value, str):
        return bool(value) and (is_secret_key(key) or bool(TOKEN_RE.search(value)))
    if isinstance(value, dict):
        return any(looks_secret(v, str(k)) or looks_secret(str(k)) for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return any(looks_secret(v, key) for v in value)
    return False


def scrub(text: str) -> str:
    """`text` with every token-like substring replaced by `<redacted>`."""
    return TOKEN_RE.sub(REDACTED, text)


def redact(value: Any, key: str = "") -> Any:
    """A copy of `value` with token-like strings, and strings under secret-named keys, redacted."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if value and is_secret_key(key):
            return REDACTED
        return scrub(value)
    return value
