"""Load the raw rows of one `datasets:` entry."""

from __future__ import annotations

from pathlib import Path

import datasets

from newtune.config.schema import DatasetEntry
from newtune.errors import DataError

_EXT_TYPES = {".json": "json", ".jsonl": "json"}


def local_files(entry: DatasetEntry, index: int) -> list[str] | None:
    """The local files of an entry, or None when `path` is not on this machine."""
    path = Path(entry.path).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        if entry.data_files:
            names = [entry.data_files] if isinstance(entry.data_files, str) else entry.data_files
            files = [path / n for n in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise DataError(
                    f"datasets[{index}]: data file(s) {', '.join(missing)} not found in {path}. "
                    "Check `data_files`."
                )
            return [str(f) for f in files]
        files = sorted(p for p in path.iterdir() if p.suffix in _EXT_TYPES)
        if not files:
            raise DataError(
                f"datasets[{index}]: folder {path} holds no .json or .jsonl files. "
                "Point `path` at a data file or set `data_files`."
            )
        return [str(f) for f in files]
    return None


def load_rows(entry: DatasetEntry, index: int) -> datasets.Dataset:
    """Read the rows of `datasets[index]` from a local file/folder or the hub."""
    files = local_files(entry, index)
    if files is None:
        looks_local = (
            entry.path.startswith((".", "/", "~")) or Path(entry.path).suffix in _EXT_TYPES
        )
        if looks_local:
            raise DataError(
                f"datasets[{index}].path: {entry.path} does not exist (looked in {Path.cwd()}). "
                "Fix the path; relative paths are resolved from the current directory."
            )
        return _load_hub(entry, index)
    kind = entry.ds_type or _EXT_TYPES.get(Path(files[0]).suffix)
    if kind not in ("json", "jsonl"):
        raise DataError(
            f"datasets[{index}]: cannot tell the format of {files[0]}; set `ds_type: json`."
        )
    try:
        ds = datasets.load_dataset("json", data_files=files, split="train")
    except Exception as exc:  # datasets raises many types for malformed files
        raise DataError(
            f"datasets[{index}]: could not read {', '.join(files)} as JSON lines: "
            f"{type(exc).__name__}: {exc}. Check that each line is one JSON object."
        ) from exc
    return ds


def _load_hub(entry: DatasetEntry, index: int) -> datasets.Dataset:
    try:
        kwargs = {"data_files": entry.data_files} if entry.data_files else {}
        return datasets.load_dataset(entry.path, split=entry.split, **kwargs)
    except Exception as exc:  # offline, missing, or private datasets all land here
        raise DataError(
            f"datasets[{index}].path: {entry.path} is not a local file or folder, and loading "
            f"it from the Hugging Face hub failed ({type(exc).__name__}: {exc}). Fix the path, "
            "or check the dataset id and your network/HF_TOKEN."
        ) from exc
