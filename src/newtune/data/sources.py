"""Load the raw rows of one `datasets:` entry: a local file or folder, a URL, or the hub.

Where `path` points, in the order it is tried:

- `http(s)://`, `s3://`, `gs://` (`gcs://`): a remote file, or for s3/gs also a folder of data
  files or a `save_to_disk` folder, read through fsspec with credentials from the environment.
- a local file (format from its extension or `ds_type`), a local `save_to_disk` folder, or a
  local folder of data files (`data_files` picks some, otherwise files are grouped by the
  split named in their file names, as `datasets` does: train, validation/valid/dev/val,
  test/eval).
- anything else is a Hugging Face hub dataset id.
"""

from __future__ import annotations

import codecs
import fnmatch
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets

from newtune.config.schema import DatasetEntry
from newtune.errors import DataError

FORMATS = ("json", "jsonl", "csv", "parquet", "arrow", "text")
_EXT_TYPES = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
TEXT_FORMATS = ("json", "jsonl", "csv", "text")  # read as UTF-8 text
_BUILDERS = {"jsonl": "json"}  # ds_type -> datasets' packaged builder, when they differ
_REMOTE_PACKAGES = {
    "http": "aiohttp",
    "https": "aiohttp",
    "s3": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
}
_LISTABLE = ("s3", "gs", "gcs")
_SPLIT_KEYWORDS = {  # the file-name keywords `datasets` uses to find splits
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_DISK_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at the top


@dataclass(frozen=True)
class _Located:
    """Where an entry's rows are: data `files` of one `fmt`, or a save_to_disk `folder`."""

    files: tuple[str, ...] = ()
    fmt: str | None = None
    folder: str | None = None
    options: dict[str, Any] | None = None


def _builder(fmt: str) -> str:
    return _BUILDERS.get(fmt, fmt)


def _choices() -> str:
    return ", ".join(FORMATS)


def _split_of(entry: DatasetEntry) -> str:
    return entry.train_on_split or entry.split


def _split_slice(entry: DatasetEntry) -> tuple[str, str]:
    """`train[:20%]` -> (`train`, `[:20%]`): the split's name and `datasets`' slice, as Axolotl."""
    name, bracket, rest = _split_of(entry).partition("[")
    return name, bracket + rest


def _scheme(path: str) -> str | None:
    scheme = urlparse(path).scheme.lower()
    return scheme if scheme in _REMOTE_PACKAGES else None


def _first_line(exc: BaseException) -> str:
    """`Type: first line` of an error, looking through datasets' generic wrapper errors."""
    while isinstance(exc, datasets.exceptions.DatasetGenerationError) and exc.__cause__:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else '(no message)'}"


def _offline_hint(exc: BaseException) -> str:
    seen: BaseException | None = exc
    while seen is not None:
        if "OfflineModeIsEnabled" in type(seen).__name__ or "Offline mode" in str(seen):
            return (
                " HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) also stops `datasets` from "
                "reading http/s3/gs URLs; unset it for this run."
            )
        seen = seen.__cause__ or seen.__context__
    return ""


def storage_options(path: str) -> dict[str, Any]:
    """fsspec options for a remote path; credentials are left to the environment."""
    if _scheme(path) == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def _format_of(name: str, entry: DatasetEntry, where: str) -> str:
    """The format of one data file: `ds_type`, else its extension."""
    if entry.ds_type:
        return entry.ds_type
    suffix = Path(urlparse(name).path if _scheme(name) else name).suffix.lower()
    if suffix not in _EXT_TYPES:
        raise DataError(
            f"{where}: cannot tell the format of {name} from its extension; set `ds_type` to "
            f"one of {_choices()}."
        )
    return _EXT_TYPES[suffix]


def _common_format(names: list[str], entry: DatasetEntry, where: str, folder: str) -> str:
    formats = {_format_of(n, entry, where) for n in names}
    if len({_builder(f) for f in formats}) > 1:
        raise DataError(
            f"{where}: folder {folder} mixes data files of formats {', '.join(sorted(formats))}. "
            "Set `data_files` to the files to read, or `ds_type` to read only one format."
        )
    return formats.pop() if len(formats) == 1 else "json"  # .json mixed with .jsonl


def _split_names(name: str) -> set[str]:
    words = set(re.split(r"[-._ 0-9/]+", name.lower()))
    return {split for split, keys in _SPLIT_KEYWORDS.items() if words.intersection(keys)}


def _pick_files(names: list[str], entry: DatasetEntry, where: str, folder: str) -> list[str]:
    """The data files (relative names) of an entry in a folder listing."""
    if entry.data_files:
        wanted = [entry.data_files] if isinstance(entry.data_files, str) else entry.data_files
        picked, missing = [], []
        for pattern in wanted:
            hits = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
            if hits:
                picked.extend(hits)
            else:
                missing.append(pattern)
        if missing:
            raise DataError(
                f"{where}: data file(s) {', '.join(missing)} not found in {folder}. "
                "Check `data_files`; names are relative to `path` and may use * wildcards."
            )
        return list(dict.fromkeys(picked))
    builders = {_builder(entry.ds_type)} if entry.ds_type else set(map(_builder, FORMATS))
    data = [
        n
        for n in names
        if _builder(_EXT_TYPES.get(Path(n).suffix.lower(), "")) in builders
        and not any(part.startswith(".") for part in n.split("/"))
    ]
    if not data:
        kinds = (
            f"{entry.ds_type} files" if entry.ds_type else f"data files ({', '.join(_EXT_TYPES)})"
        )
        raise DataError(
            f"{where}: folder {folder} holds no {kinds}. Point `path` at a data file or a "
            "`save_to_disk` folder, or set `data_files`."
        )
    by_split = {n: _split_names(n) for n in data}
    named = sorted(set().union(*by_split.values()))
    if not named:
        return data
    split = _split_slice(entry)[0]
    picked = [n for n in data if split in by_split[n]]
    if not picked:
        raise DataError(
            f"{where}: folder {folder} holds files of split(s) {', '.join(named)} (by their "
            f"names) but none of split `{split}`. Set `split` to one of them, or `data_files`."
        )
    return picked


def _list_local(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _locate_local(entry: DatasetEntry, where: str) -> _Located | None:
    path = Path(entry.path.removeprefix("file://")).expanduser()
    if path.is_file():
        return _Located(files=(str(path),), fmt=_format_of(str(path), entry, where))
    if not path.is_dir():
        return None
    if any((path / m).is_file() for m in _DISK_MARKERS):
        return _Located(folder=str(path))
    names = _pick_files(_list_local(path), entry, where, str(path))
    fmt = _common_format(names, entry, where, str(path))
    return _Located(files=tuple(str(path / n) for n in names), fmt=fmt)


def _require_package(scheme: str, where: str, path: str) -> None:
    package = _REMOTE_PACKAGES[scheme]
    if importlib.util.find_spec(package) is None:
        raise DataError(
            f"{where}.path: {path} is a {scheme}:// URL, which needs the `{package}` package; "
            "run `pip install 'newtune[cloud]'`."
        )


def _locate_remote(entry: DatasetEntry, where: str, scheme: str) -> _Located:
    _require_package(scheme, where, entry.path)
    options = storage_options(entry.path)
    base = entry.path.rstrip("/")
    if scheme not in _LISTABLE:
        if entry.data_files:
            names = [entry.data_files] if isinstance(entry.data_files, str) else entry.data_files
            files = [f"{base}/{n}" for n in names]
        else:
            files = [entry.path]
        fmt = _common_format(files, entry, where, entry.path)
        return _Located(files=tuple(files), fmt=fmt, options=options)
    import fsspec  # a dependency of datasets

    try:
        fs, root = fsspec.core.url_to_fs(base, **options)
        if fs.isfile(root):
            return _Located(files=(base,), fmt=_format_of(base, entry, where), options=options)
        if not fs.isdir(root):
            raise FileNotFoundError(root)
        is_disk = any(fs.isfile(f"{root}/{m}") for m in _DISK_MARKERS)
        listing = [] if is_disk else sorted(fs.find(root))
    except FileNotFoundError:
        raise DataError(
            f"{where}.path: {entry.path} does not exist. Check the bucket and key."
        ) from None
    except Exception as exc:  # credentials, network and permission errors of any fs backend
        raise DataError(
            f"{where}.path: could not list {entry.path}: {_first_line(exc)}. Check the URL and "
            "the credentials in the environment (AWS_ACCESS_KEY_ID/AWS_PROFILE and "
            "AWS_ENDPOINT_URL for S3-compatible stores; GOOGLE_APPLICATION_CREDENTIALS for gs)."
        ) from exc
    if is_disk:
        return _Located(folder=base, options=options)
    names = _pick_files([p[len(root) + 1 :] for p in listing], entry, where, entry.path)
    fmt = _common_format(names, entry, where, entry.path)
    return _Located(files=tuple(f"{base}/{n}" for n in names), fmt=fmt, options=options)


def local_files(entry: DatasetEntry, index: int, key: str = "datasets") -> list[str] | None:
    """The local files an entry reads, or None when `path` is not on this machine."""
    if _scheme(entry.path):
        return None
    located = _locate_local(entry, f"{key}[{index}]")
    if located is None:
        return None
    if located.folder is not None:
        folder = Path(located.folder)
        return [str(folder / n) for n in _list_local(folder)]
    return list(located.files)


def load_rows(entry: DatasetEntry, index: int, key: str = "datasets") -> datasets.Dataset:
    """Read the rows of `{key}[index]` from a local or remote file or folder, or the hub."""
    where = f"{key}[{index}]"
    scheme = _scheme(entry.path)
    located = _locate_remote(entry, where, scheme) if scheme else _locate_local(entry, where)
    if located is not None:
        rows = _read_located(located, entry, where)
    elif entry.path.startswith((".", "/", "~")) or Path(entry.path).suffix in _EXT_TYPES:
        raise DataError(
            f"{where}.path: {entry.path} does not exist (looked in {Path.cwd()}). "
            "Fix the path; relative paths are resolved from the current directory."
        )
    else:
        rows = _load_hub(entry, where)
    if entry.shards:
        rows = rows.shard(num_shards=entry.shards, index=0)
    return rows


def _read_located(located: _Located, entry: DatasetEntry, where: str) -> datasets.Dataset:
    if located.folder is not None:
        return _read_disk(located, entry, where)
    files = list(located.files)
    options = dict(located.options) if located.options else None  # datasets mutates it
    for name in [n for n in files if not _scheme(n)]:
        # local files are checked first: pyarrow's JSON reader takes bytes that are not
        # UTF-8 into its strings, which fail only later, without a file or line to name
        problem = _file_problem(name, located.fmt or "", None)
        if problem:
            raise DataError(f"{where}: {name} {problem}")
    try:
        return datasets.load_dataset(
            _builder(located.fmt),
            data_files=files,
            split="train" + _split_slice(entry)[1],  # the slice of `split: train[:20%]`
            storage_options=options,
        )
    except Exception as exc:  # datasets raises many types for unreadable files
        for name in [n for n in files if _scheme(n)]:  # remote files: read them again
            problem = _file_problem(name, located.fmt or "", located.options)
            if problem:
                raise DataError(f"{where}: {name} {problem}") from None
        if located.fmt in ("json", "jsonl"):
            bad = _first_bad_json(files, located.fmt, located.options)
            if bad:
                raise DataError(
                    f"{where}: {bad[0]} line {bad[1]} is not valid JSON ({bad[2]}). Fix or "
                    "remove that line; a .jsonl file holds one JSON object per line."
                ) from exc
        raise DataError(
            f"{where}: could not read {', '.join(files)} as {located.fmt}: {_first_line(exc)}. "
            f"Check the file, or set `ds_type` (one of {_choices()}) if its extension misleads."
            f"{_offline_hint(exc)}"
        ) from exc


def _read_disk(located: _Located, entry: DatasetEntry, where: str) -> datasets.Dataset:
    try:
        data = datasets.load_from_disk(located.folder, storage_options=located.options or None)
    except Exception as exc:  # a damaged or foreign folder
        raise DataError(
            f"{where}: could not load the save_to_disk folder {located.folder}: "
            f"{_first_line(exc)}. Save it again with `Dataset.save_to_disk`."
        ) from exc
    if isinstance(data, datasets.DatasetDict):
        split = _split_of(entry)
        if split not in data:
            raise DataError(
                f"{where}: {located.folder} has split(s) {', '.join(data)} but not `{split}`. "
                "Set `split` (or `train_on_split`) to one of them."
            )
        return data[split]
    return data


def _open_raw(name: str, options: dict[str, Any] | None) -> Any:
    """A binary file object for a local path or a remote URL."""
    import fsspec  # a dependency of datasets

    return fsspec.open(name, "rb", **(options if _scheme(name) and options else {}))


def _file_problem(name: str, fmt: str, options: dict[str, Any] | None) -> str | None:
    """Why a data file cannot be read (empty, or text that is not UTF-8), or None.

    The file is read in blocks, so a large file is checked without holding it in memory.
    """
    text = fmt in TEXT_FORMATS
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = 0
    content = False
    try:
        with _open_raw(name, options) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                content = content or bool(block.strip()) or not text
                if text:
                    try:
                        decoder.decode(block)
                    except UnicodeDecodeError as exc:
                        # exc.start counts from the bytes the decoder still held (at most 3)
                        held = len(exc.object) - len(block)
                        bad = offset + exc.start - held
                        line = 1 + newlines + exc.object[: exc.start].count(b"\n")
                        return (
                            f"is not UTF-8 text: line {line} (byte offset {bad}) holds the byte "
                            f"0x{exc.object[exc.start]:02x}. Re-encode the file as UTF-8 (e.g. "
                            f"`iconv -f latin1 -t utf-8 in > out`, choosing its real encoding)."
                        )
                    newlines += block.count(b"\n")
                offset += len(block)
            if text:
                decoder.decode(b"", final=True)
    except UnicodeDecodeError:  # the file ends inside a multi-byte character
        return (
            f"is not UTF-8 text: its last line (line {newlines + 1}) ends inside a multi-byte "
            "character. Re-encode the file as UTF-8."
        )
    except Exception:  # unreadable here too: let the caller report the original error
        return None
    if not content:
        what = "0 bytes" if offset == 0 else f"only whitespace, {offset} bytes"
        return (
            f"is empty ({what}): it holds no rows. Put data in it, or remove it from the "
            "config (or from `data_files`)."
        )
    return None


def _json_problem(text: str, lines: bool) -> tuple[int, str] | None:
    """(1-based line, reason) of the first JSON error in a file's text, or None."""
    if not lines:
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as exc:
            json_lines = exc.msg == "Extra data" and text.lstrip().startswith("{")
            if not json_lines:  # else a JSON-lines file named .json: check it line by line
                return exc.lineno, exc.msg
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            return lineno, f"{exc.msg}, column {exc.colno}"
        if not isinstance(value, dict):
            return lineno, f"a JSON {type(value).__name__}, not an object"
    return None


def _first_bad_json(
    files: list[str], fmt: str, options: dict[str, Any] | None
) -> tuple[str, int, str] | None:
    """The first (file, line, reason) that is not valid JSON, or None when none is found."""
    import fsspec  # a dependency of datasets

    for name in files:
        lines = fmt == "jsonl" or name.lower().endswith(".jsonl")
        try:
            with fsspec.open(name, "rb", **(options if _scheme(name) and options else {})) as f:
                raw = f.read()
        except Exception:  # unreadable here too: let the caller report the original error
            return None
        try:
            problem = _json_problem(raw.decode("utf-8"), lines)
        except UnicodeDecodeError as exc:
            problem = 1 + raw[: exc.start].count(b"\n"), "not UTF-8 text"
        if problem:
            return name, *problem
    return None


def _load_hub(entry: DatasetEntry, where: str) -> datasets.Dataset:
    names = entry.name if isinstance(entry.name, list) else [entry.name]
    split = _split_of(entry)
    parts = []
    for name in names:
        try:
            parts.append(
                datasets.load_dataset(
                    entry.path,
                    name,
                    split=split,
                    revision=entry.revision,
                    data_files=entry.data_files,
                )
            )
        except Exception as exc:  # offline, missing, private, or a bad config/split/revision
            raise DataError(
                f"{where}.path: {entry.path} is not a local file or folder (looked in "
                f"{Path.cwd()}), and loading it from the Hugging Face hub with name={name!r}, "
                f"split={split!r}, revision={entry.revision!r} failed ({_first_line(exc)}). "
                "Fix the path, or check the dataset id, config name, split and revision and "
                "your network/HF_TOKEN; with HF_HUB_OFFLINE=1 only datasets already in the "
                "local cache load."
            ) from exc
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as exc:
        raise DataError(
            f"{where}: the configurations {', '.join(map(str, names))} of {entry.path} cannot "
            f"be concatenated ({_first_line(exc)}). List only configurations whose columns have "
            "the same types, or use one `datasets:` entry per configuration."
        ) from exc


def _int_list(feature: Any) -> bool:
    inner = (
        feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
    )
    dtype = getattr(inner, "dtype", "")
    return isinstance(inner, datasets.Value) and dtype.startswith(("int", "uint"))


def is_pretokenized(ds: datasets.Dataset) -> bool:
    """Whether rows already hold token ids: an `input_ids` column of integer lists."""
    return _int_list(ds.features.get("input_ids"))


def pretokenized(ds: datasets.Dataset, where: str) -> datasets.Dataset:
    """A pretokenized dataset as `input_ids` + `labels` (labels default to input_ids)."""
    columns = ds.column_names
    for name in ("labels", "attention_mask"):
        if name in columns and not _int_list(ds.features[name]):
            raise DataError(
                f"{where}: the pretokenized column `{name}` is not a list of integers per row. "
                "Fix the column or drop it."
            )
    data = ds.select_columns([c for c in ("input_ids", "labels", "attention_mask") if c in columns])
    data = data.to_dict()
    ids = data["input_ids"]
    labels = data.get("labels", ids)
    masks = data.get("attention_mask")
    for row, (tokens, labs) in enumerate(zip(ids, labels, strict=True)):
        if labs is not None and len(labs) != len(tokens):
            raise DataError(
                f"{where} row {row}: `labels` has {len(labs)} entries but `input_ids` has "
                f"{len(tokens)}. Make them the same length (use -100 for untrained tokens)."
            )
        if masks is not None and (masks[row] is None or any(m != 1 for m in masks[row])):
            raise DataError(
                f"{where} row {row}: `attention_mask` is not all ones, so the row holds padding. "
                "Store rows without padding (newtune pads each batch), or drop the column."
            )
    filled = [t if lab is None else lab for t, lab in zip(ids, labels, strict=True)]
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "labels": filled},
        features=datasets.Features(
            {
                "input_ids": datasets.Sequence(datasets.Value("int64")),
                "labels": datasets.Sequence(datasets.Value("int64")),
            }
        ),
    )
