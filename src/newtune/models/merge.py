"""Merge a LoRA adapter into its base model and write a plain transformers folder."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from newtune.models.adapters import load_adapter
from newtune.models.load import DTYPES, load_model

log = logging.getLogger(__name__)


def merge_lora(
    base_model: str, adapter_dir: str, out_dir: Path, dtype: str, tokenizer: Any
) -> Path:
    """Merge in fp32, cast to `dtype`, and write model + tokenizer to `out_dir` atomically."""
    model = load_model(base_model, "float32")
    model = load_adapter(model, adapter_dir).merge_and_unload()
    model = model.to(DTYPES[dtype])
    model.config.name_or_path = str(out_dir)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.no_grad():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, out_dir)
    return out_dir


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an old folder is removed only after that."""
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
