"""Folders written whole or not at all: build in a temp folder beside the target, then rename."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def temp_dir_beside(final: Path) -> Path:
    """A fresh, empty temp folder next to `final` (same filesystem, so renames are atomic)."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an old folder is removed only after that."""
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
