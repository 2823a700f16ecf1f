"""Load the tokenizer a config asks for and give it the configured chat template."""

from __future__ import annotations

import logging
from typing import Any

from transformers import AutoTokenizer

from newtune.config.schema import NewtuneConfig
from newtune.data.templates import resolve_chat_template
from newtune.models.location import hub_error, locate

log = logging.getLogger(__name__)


def load_tokenizer(config: NewtuneConfig, source: str | None = None) -> Any:
    """The tokenizer from `source`, `tokenizer_config` or `base_model`, ready for training."""
    key = "tokenizer_config" if config.tokenizer_config and source is None else "base_model"
    value = source or config.tokenizer_config or config.base_model
    loc = locate(value, key)
    try:
        tok = AutoTokenizer.from_pretrained(loc.name_or_path, **loc.kwargs())
    except (OSError, ValueError) as exc:
        raise hub_error(key, value, exc) from exc
    if config.chat_template is not None:
        tok.chat_template = resolve_chat_template(config.chat_template, tok.chat_template)
    if tok.pad_token is None:
        # Labels are masked explicitly, so a pad id equal to EOS never hides EOS from the loss.
        tok.pad_token = tok.unk_token or tok.eos_token
        log.info("tokenizer has no pad token; using %s for padding", tok.pad_token)
    return tok
