"""Load the tokenizer a config asks for: class, special and added tokens, chat template."""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

from transformers import AddedToken, AutoTokenizer

from newtune.chat_templates import resolve_chat_template
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError
from newtune.models.location import check_json_files, load_error, locate, transformers_class

log = logging.getLogger(__name__)

SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)


class LoadedTokenizer(NamedTuple):
    """A tokenizer ready for training and the ids its config added to the vocabulary."""

    tokenizer: Any
    new_ids: list[int]  # rows a LoRA run must train in full (`build_model`)


def load_tokenizer(config: NewtuneConfig, source: str | None = None) -> LoadedTokenizer:
    """The tokenizer from `source`, `tokenizer_config` or `base_model`, and its new token ids.

    A `source` folder written by newtune already holds the special and added tokens; they
    are applied again (a no-op, so no new ids) so a tokenizer from elsewhere gets them too.
    """
    key = "tokenizer_config" if config.tokenizer_config and source is None else "base_model"
    value = source or config.tokenizer_config or config.base_model
    loc = locate(value, key)
    check_json_files(key, value, loc)
    kwargs: dict[str, Any] = {"trust_remote_code": bool(config.trust_remote_code)}
    if config.tokenizer_use_fast is not None:
        kwargs["use_fast"] = config.tokenizer_use_fast
    if config.tokenizer_legacy is not None:
        kwargs["legacy"] = config.tokenizer_legacy
    if config.tokenizer_use_mistral_common:  # transformers' MistralCommonBackend
        kwargs["mistral_format"] = True
    if key == "base_model" and source is None and config.revision_of_model:
        kwargs["revision"] = config.revision_of_model
    try:
        cls = transformers_class(
            "tokenizer_type",
            config.tokenizer_type,
            AutoTokenizer,
            "AutoTokenizer or PreTrainedTokenizerFast",
        )
        tok = cls.from_pretrained(loc.name_or_path, **kwargs, **loc.kwargs())
    except (OSError, ValueError) as exc:
        raise load_error(key, value, loc, exc) from exc
    new_ids = add_tokens(tok, config)
    if config.chat_template is not None:
        tok.chat_template = resolve_chat_template(config.chat_template, tok.chat_template)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
        if tok.pad_token == tok.eos_token:
            log.warning(
                "the tokenizer has no pad token; padding with the EOS token %r. newtune masks "
                "padding by position (attention mask and -100 labels), never by token id, so "
                "EOS is still learned. Set `special_tokens: {pad_token: ...}` to choose another.",
                tok.eos_token,
            )
    return LoadedTokenizer(tok, new_ids)


def add_tokens(tok: Any, config: NewtuneConfig) -> list[int]:
    """Apply `special_tokens` and add `tokens`; return the ids new to the vocabulary."""
    before = len(tok)
    special = dict(config.special_tokens or {})
    unknown = sorted(set(special) - set(SPECIAL_KEYS))
    if unknown:
        raise ConfigError(
            f"`special_tokens` has unknown key(s) {', '.join(unknown)}; use "
            f"{', '.join(SPECIAL_KEYS)}."
        )
    if special:
        tok.add_special_tokens(
            {k: AddedToken(v, special=True, normalized=False) for k, v in special.items()}
        )
    if config.tokens:
        tok.add_tokens(
            [AddedToken(t, rstrip=False, lstrip=False, normalized=False) for t in config.tokens]
        )
    added = list(range(before, len(tok)))
    if added:
        log.info("added %d token(s) to the vocabulary (now %d)", len(added), len(tok))
    return added


def resize_embeddings(model: Any, tokenizer: Any, config: NewtuneConfig) -> None:
    """Grow the embeddings to fit the tokenizer (when it has more tokens than rows).

    The matrix is padded to a multiple of 32 (`resize_token_embeddings_to_32x`) or 64, which
    keeps matmuls on tensor-core friendly shapes; new rows start at the mean embedding.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    size = len(tokenizer)
    if size <= rows:
        return
    multiple = 32 if config.resize_token_embeddings_to_32x else 64
    target = math.ceil(size / multiple) * multiple
    model.resize_token_embeddings(size, pad_to_multiple_of=multiple)
    log.info("resized the embeddings from %d to %d rows for %d tokens", rows, target, size)
