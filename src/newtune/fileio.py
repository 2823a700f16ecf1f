"""Folders written whole or not at all: build in a temp folder beside the target, then rename.

Every temp entry is named `.tmp-{final}-{pid}@{host}` (or `.old-...` while a folder is being
replaced), so a later run can tell which process made it and remove it once that process is dead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

_KINDS = (".tmp-", ".old-")


def _host() -> str:
    return socket.gethostname().replace("@", "_") or "localhost"


def temp_name(final: Path, kind: str = "tmp") -> Path:
    """The temp path this process uses beside `final` (`kind` is `tmp` or `old`)."""
    return final.parent / f".{kind}-{final.name}-{os.getpid()}@{_host()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def owner_of(entry: Path) -> tuple[int, str] | None:
    """(pid, host) of a temp entry made by `temp_name`, or None if the name is not one."""
    name = entry.name
    if not name.startswith(_KINDS):
        return None
    rest, _, host = name.rpartition("@")
    if not rest:  # older name without a host: `.tmp-{final}-{pid}`
        rest, host = name, _host()
    pid = rest.rpartition("-")[2]
    return (int(pid), host) if pid.isdigit() else None


def clean_stale(parent: Path) -> list[Path]:
    """Remove temp entries in `parent` left by dead processes of this machine; return them."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        owner = owner_of(entry)
        if owner is None or owner[1] != _host() or pid_alive(owner[0]):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def temp_dir_beside(final: Path) -> Path:
    """A fresh, empty temp folder next to `final` (same filesystem, so renames are atomic)."""
    tmp = temp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an old folder is removed only after that."""
    old = temp_name(final, "old")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent)
    tmp = temp_dir_beside(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)
