"""Turn the configured datasets into a tokenized DatasetDict, cached on disk by fingerprint.

Contract: `{dataset_prepared_path}/{fingerprint}/` is a `datasets.DatasetDict` saved with
`save_to_disk`, split `train` (and `test` with `val_set_size > 0` or `test_datasets`),
columns `input_ids`, `attention_mask`, `labels`, plus `stats.json` (the data report) and
`fingerprint.json` (every input of the fingerprint, see `fingerprint_inputs`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from filelock import FileLock

from newtune import fileio
from newtune.chat_templates import resolve_chat_template
from newtune.config.schema import DatasetEntry, NewtuneConfig
from newtune.config.schema.multimodal import is_multimodal
from newtune.config.schema.preference import training_method
from newtune.data import prepare_preference as pref
from newtune.data.packing import packing_plan, packing_report, sample_lengths
from newtune.data.publish import push_prepared
from newtune.data.sources import is_pretokenized, load_rows, local_files, pretokenized
from newtune.data.strategies import Strategy, get_strategy
from newtune.data.tokenize import IGNORE_INDEX, Engine
from newtune.errors import ConfigError, DataError, NewtuneError

ENGINE_VERSION = 3  # 3: rows whose every field is empty are dropped (and counted)
HASH_LIMIT_BYTES = 64 << 20  # larger files are identified by size and mtime only
# Below this many rows per process, one process whose tokenizer runs on every CPU (Rust
# threads) beats worker processes (start-up, pickling, shard merging, and on SMT machines
# the workers' contention for shared cores).
ROWS_PER_PROCESS = 25_000
PR_SET_PDEATHSIG = 1  # prctl option (Linux): a signal this process gets when its parent dies
WORK_FOLDER = ".work"  # inside the cache's temp folder: the worker processes' shards
log = logging.getLogger(__name__)
_IMPORT_PID = os.getpid()  # a different pid later means this is a forked child


@dataclass(frozen=True)
class PreparedData:
    """The prepared dataset, where it lives on disk, and its report."""

    path: Path
    data: datasets.DatasetDict
    stats: dict[str, Any]
    reused: bool


def _file_identity(path: str) -> dict[str, Any]:
    st = os.stat(path)
    ident: dict[str, Any] = {"size": st.st_size}
    if st.st_size <= HASH_LIMIT_BYTES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        ident["sha256"] = h.hexdigest()
    else:
        ident["mtime_ns"] = st.st_mtime_ns
    return ident


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What about a tokenizer changes the tokens it produces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        vocab_hash = hashlib.sha256(backend.to_str().encode()).hexdigest()
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
        vocab_hash = hashlib.sha256(vocab.encode()).hexdigest()
    return {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "vocab_sha256": vocab_hash,
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "added_tokens": sorted(tokenizer.get_added_vocab().items()),
    }


def _entries_identity(entries: list[DatasetEntry], key: str) -> list[dict[str, Any]]:
    out = []
    for i, entry in enumerate(entries):
        files = local_files(entry, i, key)
        out.append(
            {
                "entry": entry.model_dump(mode="json"),
                "files": {f: _file_identity(f) for f in files} if files else None,
            }
        )
    return out


def fingerprint_inputs(
    config: NewtuneConfig, tokenizer: Any, chat_template: str | None
) -> dict[str, Any]:
    """The documented list of everything the prepared data depends on."""
    return {
        "datasets": _entries_identity(config.datasets, "datasets"),
        "test_datasets": _entries_identity(config.test_datasets or [], "test_datasets"),
        "tokenizer": tokenizer_identity(tokenizer),
        "chat_template": chat_template,
        "sequence_len": config.sequence_len,
        "min_sample_len": config.min_sample_len,
        "excess_length_strategy": config.excess_length_strategy or "drop",
        "train_on_inputs": config.train_on_inputs,
        "val_set_size": config.val_set_size,
        "shuffle_merged_datasets": config.shuffle_merged_datasets,
        "dataset_shard_num": config.dataset_shard_num,
        "dataset_shard_idx": config.dataset_shard_idx,
        "seed": config.seed,
        "engine_version": ENGINE_VERSION,
        # only for preference data, so SFT caches made before these keys existed stay valid
        **(
            {"training_method": training_method(config), "max_prompt_len": config.max_prompt_len}
            if training_method(config) != "sft"
            else {}
        ),
        # only when set, so caches made before the key existed stay valid
        **(
            {"default_system_message": config.default_system_message}
            if config.default_system_message
            else {}
        ),
        **({"dataset_exact_deduplication": True} if config.dataset_exact_deduplication else {}),
    }


def fingerprint(inputs: dict[str, Any], strategies: list[Strategy | None]) -> str:
    """A short stable hash of the fingerprint inputs and the strategy versions."""
    versions = [[s.name, s.version] if s else ["pretokenized", 1] for s in strategies]
    blob = json.dumps({**inputs, "strategies": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def engine_for(
    entry: DatasetEntry,
    config: NewtuneConfig,
    tokenizer: Any,
    template: str | None,
    strategy: Strategy | None = None,
) -> Engine:
    """The tokenizing engine for one dataset entry (shared by preprocess and inference)."""
    # a per-dataset template wins; then a strategy's own (sharegpt's `conversation:`)
    own = entry.chat_template_jinja or entry.chat_template
    if own is None and config.chat_template is None:
        own = getattr(strategy, "chat_template", None)
    return Engine(
        tokenizer,
        chat_template=resolve_chat_template(own, template) if own else template,
        roles_to_train=tuple(entry.roles_to_train or ("assistant",)),
        train_on_eos=entry.train_on_eos or "turn",
        train_on_inputs=config.train_on_inputs,
        sequence_len=config.sequence_len,
        eot_tokens=tuple(config.eot_tokens or ()),
        system_message=config.default_system_message,
    )


def _strategy_for(entry: DatasetEntry, i: int, key: str, config: NewtuneConfig) -> Strategy | None:
    """The entry's strategy; None for a pretokenized dataset (no `type`)."""
    if entry.type is None:
        return None
    return get_strategy(entry, i, config.train_on_inputs, method=training_method(config))


def _num_proc(config: NewtuneConfig, rows: int) -> int | None:
    """Worker processes for the tokenizing map (None: in this process)."""
    n = min(_cpus(config), rows // ROWS_PER_PROCESS)
    return n if n > 1 and "fork" in multiprocessing.get_all_start_methods() else None


def _cpus(config: NewtuneConfig) -> int:
    return config.dataset_processes or os.cpu_count() or 1


@contextlib.contextmanager
def _tokenizer_threads(enabled: bool) -> Iterator[None]:
    """Let the Rust tokenizer use its thread pool while tokenizing in this process.

    The CLI sets TOKENIZERS_PARALLELISM=false (forked workers must not inherit a busy
    pool); it is restored afterwards, so later forks stay safe and quiet. Never in a
    process forked after this module was imported: a pool the parent started does not
    survive a fork, and using it there would hang.
    """
    if not enabled or os.getpid() != _IMPORT_PID:
        yield
        return
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _blank(value: Any) -> bool:
    """Whether a field is empty: None, blank text, or a list or mapping of empty fields."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, dict):
        return all(_blank(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_blank(v) for v in value)
    return False


# (batch, row indices) -> (the saved columns, how many rows were blank and skipped)
BatchTokenizer = Callable[[dict[str, list], list[int]], tuple[dict[str, list], int]]


def _nonblank_samples(
    batch: dict[str, list], indices: list[int], sample_of: Callable[[dict[str, Any], int], Any]
) -> tuple[list[Any], list[int]]:
    """The samples of a batch's non-blank rows, with those rows' indices (blank rows skipped)."""
    keys = list(batch)
    samples, kept = [], []
    for j, idx in enumerate(indices):
        row = {k: batch[k][j] for k in keys}
        if not _blank(row):
            samples.append(sample_of(row, idx))
            kept.append(idx)
    return samples, kept


def _raise_failing_row(
    where: str,
    entry: DatasetEntry,
    samples: list[Any],
    kept: list[int],
    tokenize_one: Callable[[Any], Any],
) -> None:
    """Tokenize `samples` one at a time and raise a DataError naming the first row that fails."""
    for sample, idx in zip(samples, kept, strict=True):
        try:
            tokenize_one(sample)
        except (DataError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where} ({entry.path}) row {idx}: {exc}.") from None


def _preference_batch_tokenizer(
    where: str, entry: DatasetEntry, strategy: Strategy, engine: Engine, method: str, margin: bool
) -> BatchTokenizer:
    """Tokenize a batch of raw preference rows into the method's columns (see
    data.prepare_preference); blank rows are skipped and counted as for SFT."""

    def sample_of(row: dict[str, Any], idx: int) -> Any:
        try:
            sample = strategy.sample(row)
            pref.check_kind(method, sample)
            return sample
        except (DataError, KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{where} ({entry.path}, type {entry.type}) row {idx}: {exc}. Fix that row or "
                "the dataset's `type` and mapping keys."
            ) from None

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> tuple[dict[str, list], int]:
        samples, kept = _nonblank_samples(batch, indices, sample_of)
        try:
            return pref.tokenize_rows(engine, method, samples, margin), len(indices) - len(kept)
        except (DataError, KeyError, TypeError, ValueError):
            _raise_failing_row(
                where,
                entry,
                samples,
                kept,
                lambda s: pref.tokenize_rows(engine, method, [s], margin),
            )
            raise

    tokenize_batch.features = pref.features(method, margin)  # type: ignore[attr-defined]
    return tokenize_batch


def _batch_tokenizer(
    where: str, entry: DatasetEntry, strategy: Strategy, engine: Engine
) -> BatchTokenizer:
    """Tokenize a batch of raw rows, skipping (and counting) rows whose every field is empty."""

    def sample_of(row: dict[str, Any], idx: int) -> Any:
        try:
            return strategy.sample(row)
        except (DataError, KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{where} ({entry.path}) row {idx}: {exc}. Fix that row or the "
                "dataset's `type` and mapping keys."
            ) from None

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> tuple[dict[str, list], int]:
        samples, kept = _nonblank_samples(batch, indices, sample_of)
        try:
            per_sample = engine.tokenize_many(samples)
        except (DataError, KeyError, TypeError, ValueError):
            _raise_failing_row(where, entry, samples, kept, engine.tokenize)
            raise
        columns = _columns(
            [r.input_ids for rs in per_sample for r in rs],
            [r.labels for rs in per_sample for r in rs],
        )
        return columns, len(indices) - len(kept)

    return tokenize_batch


def _map_rows(
    rows: datasets.Dataset,
    tokenize: BatchTokenizer,
    offset: int,
    desc: str | None,
    cache_file: str | None = None,
) -> tuple[datasets.Dataset, int]:
    """Tokenize `rows` (row `offset` onwards of the entry) in this process; count blank rows."""
    blank = [0]

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        columns, skipped = tokenize(batch, [offset + i for i in indices])
        blank[0] += skipped
        return columns

    fingerprint = hashlib.sha256(cache_file.encode()).hexdigest()[:16] if cache_file else None
    out = rows.map(
        tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        desc=desc,
        load_from_cache_file=False,
        cache_file_name=cache_file,
        new_fingerprint=fingerprint,
        # known types: datasets skips its per-value type inference
        features=getattr(tokenize, "features", COLUMN_TYPES),
    )
    return out, blank[0]


def _tokenize_entry(
    where: str,
    entry: DatasetEntry,
    rows: datasets.Dataset,
    strategy: Strategy,
    engine: Engine,
    num_proc: int | None,
    work: Path,
    config: NewtuneConfig,
) -> tuple[datasets.Dataset, int]:
    """The tokenized rows of one entry and how many blank rows were dropped."""
    problem = pref.required_columns_problem(where, entry, strategy, rows.column_names)
    if problem:
        raise DataError(problem)
    method = training_method(config)
    if method == "prm":  # process reward rows in SFT's columns (labels are step classes)
        from newtune.data.strategies.stepwise_supervised import batch_tokenizer

        tokenize = batch_tokenizer(where, entry, strategy, engine, config.excess_length_strategy)
    elif method == "sft":
        tokenize = _batch_tokenizer(where, entry, strategy, engine)
    else:
        margin = pref.has_margin(method, rows)
        tokenize = _preference_batch_tokenizer(where, entry, strategy, engine, method, margin)
    if num_proc is None:
        return _map_rows(rows, tokenize, 0, f"Tokenizing {where}")
    return _tokenize_in_workers(where, rows, tokenize, num_proc, work)


def _tokenize_in_workers(
    where: str, rows: datasets.Dataset, tokenize: BatchTokenizer, procs: int, work: Path
) -> tuple[datasets.Dataset, int]:
    """Tokenize contiguous shards in forked worker processes that die with this one.

    Each worker writes its shard to an arrow file in `work` (inside the cache's temp folder,
    so a killed run leaves nothing that looks complete); the shards are read back in order.
    """
    work.mkdir(parents=True, exist_ok=True)
    bounds = [len(rows) * i // procs for i in range(procs + 1)]
    name = where.replace("[", "-").replace("]", "")
    tasks = [(bounds[i], bounds[i + 1], str(work / f"{name}-{i:05d}.arrow")) for i in range(procs)]
    log.info("tokenizing %s (%d rows) in %d worker processes", where, len(rows), procs)
    results = _run_workers(rows, tokenize, tasks)
    parts = [datasets.Dataset.from_file(path) for path, _ in results]
    return datasets.concatenate_datasets(parts), sum(n for _, n in results)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C while forking workers; it is raised as KeyboardInterrupt afterwards.

    A child forked in between must not see a KeyboardInterrupt of its own: it ignores
    Ctrl-C as its first step, and the parent, which handles it, ends the workers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
    if held and callable(before):  # Python's default handler raises KeyboardInterrupt
        before(signal.SIGINT, None)
    elif held and before == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)


def _run_workers(
    rows: datasets.Dataset, tokenize: BatchTokenizer, tasks: list[tuple[int, int, str]]
) -> list[tuple[str, int]]:
    """Run one forked worker per task; on any error or Ctrl-C here, kill them all."""
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("fork")
    workers: list[tuple[Any, Any]] = []
    try:
        with _sigint_deferred():
            for task in tasks:
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_worker_main,
                    args=(os.getpid(), rows, tokenize, task, send),
                    daemon=True,
                )
                proc.start()
                send.close()
                workers.append((proc, recv))
        results: list[Any] = [None] * len(tasks)
        pending = {recv: i for i, (_, recv) in enumerate(workers)}
        while pending:
            for conn in wait(list(pending)):
                i = pending.pop(conn)
                try:
                    ok, value = conn.recv()
                except EOFError:
                    workers[i][0].join()
                    raise DataError(
                        f"the worker process tokenizing rows {tasks[i][0]}-{tasks[i][1] - 1} "
                        f"died (exit code {workers[i][0].exitcode}), most likely out of memory. "
                        "Lower `dataset_processes`, or free memory."
                    ) from None
                if not ok:
                    raise value
                results[i] = value
        return results
    finally:
        for proc, recv in workers:
            if proc.is_alive():
                proc.kill()
            proc.join()
            recv.close()


def _worker_main(
    parent: int, rows: datasets.Dataset, tokenize: BatchTokenizer, task: tuple, conn: Any
) -> None:
    """A worker: tokenize rows [start, end) into an arrow file; send back (ok, result)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per CPU already
    datasets.disable_progress_bars()
    start, end, cache_file = task
    try:
        shard = rows.select(range(start, end))
        _, blank = _map_rows(shard, tokenize, start, None, cache_file)
        result: tuple[bool, Any] = (True, (cache_file, blank))
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which raises it
        if not isinstance(exc, NewtuneError) and hasattr(exc, "add_note"):  # 3.11+
            import traceback

            exc.add_note(f"in the tokenizing worker process:\n{traceback.format_exc()}")
        result = (False, exc)
    try:
        conn.send(result)
    except Exception as exc:  # noqa: BLE001 - an error that cannot be pickled
        conn.send((False, RuntimeError(f"{type(result[1]).__name__}: {result[1]} ({exc})")))
    conn.close()


def _die_with_parent(parent: int) -> None:
    """Make this process end when `parent` does (a killed preprocess leaves no workers)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _pretokenized(rows: datasets.Dataset, where: str) -> datasets.Dataset:
    """A checked pretokenized dataset with the saved and bookkeeping columns."""
    data = pretokenized(rows, where).to_dict()
    return datasets.Dataset.from_dict(_columns(data["input_ids"], data["labels"]))


COLUMN_TYPES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int64")),
        "attention_mask": datasets.List(datasets.Value("int8")),
        "_len": datasets.Value("int64"),
        "_sup": datasets.Value("int64"),
    }
)


def _columns(input_ids: list[list[int]], labels: list[list[int]]) -> dict[str, list]:
    """The saved columns plus `_len`/`_sup` (length, supervised tokens) for filtering and stats."""
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": [[1] * len(ids) for ids in input_ids],
        "_len": [len(ids) for ids in input_ids],
        "_sup": [len(lab) - lab.count(IGNORE_INDEX) for lab in labels],
    }


def _ints(ds: datasets.Dataset, name: str) -> list[int]:
    """An integer column as a list, read in bulk (iterating a column goes row by row)."""
    return ds.select_columns([name]).to_pandas()[name].tolist() if len(ds) else []


def _select(ds: datasets.Dataset, keep: list[int]) -> datasets.Dataset:
    """`ds.select(keep)` without datasets hashing the whole index list."""
    if len(keep) == len(ds):
        return ds
    digest = hashlib.sha256(str(keep).encode()).hexdigest()[:16]
    return ds.select(keep, new_fingerprint=f"{ds._fingerprint}-{digest}")


def _load_entries(
    entries: list[DatasetEntry],
    key: str,
    config: NewtuneConfig,
    tokenizer: Any,
    template: str | None,
    strategies: list[Strategy | None],
    work: Path,
) -> tuple[datasets.Dataset, list[dict[str, Any]]]:
    parts, report = [], []
    for i, (entry, strategy) in enumerate(zip(entries, strategies, strict=True)):
        where = f"{key}[{i}]"
        rows = load_rows(entry, i, key)
        if strategy is None and training_method(config) != "sft":
            example = (
                "`type: stepwise_supervised` for prompt/completions/labels columns"
                if training_method(config) == "prm"
                else "`type: preference` for prompt/chosen/rejected columns"
            )
            raise ConfigError(
                f"`{where}.type` is missing for {entry.path}; preference data needs a format "
                f"(e.g. {example})."
            )
        if strategy is None:
            if not is_pretokenized(rows):
                raise ConfigError(
                    f"`{where}.type` is missing for {entry.path}, and the data is not "
                    "pretokenized (no `input_ids` column); set `type:` to its format."
                )
            part = _pretokenized(rows, where)
            blank = 0
        else:
            engine = engine_for(entry, config, tokenizer, template, strategy)
            procs = _num_proc(config, len(rows))
            with _tokenizer_threads(procs is None and _cpus(config) > 1):
                part, blank = _tokenize_entry(
                    where, entry, rows, strategy, engine, procs, work, config
                )
        if blank:
            log.warning(
                "%s (%s): %d row(s) have every field empty; they were dropped (stats.json: "
                "dropped_empty)",
                where,
                entry.path,
                blank,
            )
        report.append(
            {
                "path": entry.path,
                "type": entry.type or "pretokenized",
                "rows": len(part),
                "dropped_empty": blank,
            }
        )
        parts.append(part)
    parts = pref.align_margins(parts)
    merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return merged, report


def _apply_lengths(ds: datasets.Dataset, config: NewtuneConfig) -> tuple[datasets.Dataset, dict]:
    """Truncate or drop long rows, drop short rows and rows with no trained token; count all."""
    limit, strategy = config.sequence_len, config.excess_length_strategy or "drop"
    lengths = _ints(ds, "_len")
    too_long = [i for i, n in enumerate(lengths) if n > limit]
    if too_long and strategy == "raise":
        raise DataError(
            f"{len(too_long)} row(s) are longer than sequence_len={limit} (the first is merged "
            f"row {too_long[0]}, {lengths[too_long[0]]} tokens) and `excess_length_strategy: "
            "raise` is set. Raise `sequence_len`, or use `drop` or `truncate`."
        )
    counts = {"dropped_too_long": 0, "truncated": 0}
    if too_long and strategy == "truncate":
        ds = ds.map(
            lambda b: _columns(
                [v[:limit] for v in b["input_ids"]], [v[:limit] for v in b["labels"]]
            ),
            batched=True,
            desc="Truncating",
        )
        counts["truncated"] = len(too_long)
        lengths = [min(n, limit) for n in lengths]
    else:
        counts["dropped_too_long"] = len(too_long)
    trained = _ints(ds, "_sup")
    keep, short, unsupervised = [], 0, 0
    for i, (n, t) in enumerate(zip(lengths, trained, strict=True)):
        if n > limit:
            continue
        if n < config.min_sample_len:
            short += 1
        elif t == 0:
            unsupervised += 1
        else:
            keep.append(i)
    counts.update(dropped_too_short=short, dropped_no_supervision=unsupervised)
    for what, n in counts.items():
        if n:
            log.warning("%s: %d row(s)", what.replace("_", " "), n)
    return _select(ds, keep), counts


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


def split_stats(ds: datasets.Dataset) -> dict[str, Any]:
    """Rows, tokens, supervised tokens and length percentiles of one split."""
    lengths = sorted(_ints(ds, "_len"))
    supervised = sum(_ints(ds, "_sup"))
    return {
        "rows": len(lengths),
        "total_tokens": sum(lengths),
        "supervised_tokens": supervised,
        "length_percentiles": {
            "p50": _percentile(lengths, 0.5),
            "p90": _percentile(lengths, 0.9),
            "p99": _percentile(lengths, 0.99),
            "max": lengths[-1] if lengths else 0,
        },
    }


def _finish(
    ds: datasets.Dataset, config: NewtuneConfig, what: str
) -> tuple[datasets.Dataset, dict]:
    method = training_method(config)
    if method in ("sft", "prm"):  # prm rows are already cut to sequence_len
        ds, counts = _apply_lengths(ds, config)
    else:
        ds, counts = pref.apply_lengths(ds, config, method)
    if len(ds) == 0:
        raise DataError(
            f"no {what} rows are left after tokenizing: every row was too long for "
            f"sequence_len={config.sequence_len}, shorter than min_sample_len="
            f"{config.min_sample_len}, or had no trained token ({counts}). Raise `sequence_len`, "
            "or check the dataset `type` and its masking options."
        )
    return ds, counts


def deduplicate(ds: datasets.Dataset) -> tuple[datasets.Dataset, int]:
    """`dataset_exact_deduplication`: the rows whose tokenized columns (input_ids, labels, ...)
    do not repeat an earlier row's, and how many were dropped (Axolotl hashes whole rows)."""
    columns = [c for c in ds.column_names if not c.startswith("_")]
    seen: set[bytes] = set()
    keep: list[int] = []
    at = 0
    for batch in ds.select_columns(columns).iter(batch_size=1024):
        for values in zip(*(batch[c] for c in columns), strict=True):
            digest = hashlib.sha256(repr(values).encode()).digest()
            if digest not in seen:
                seen.add(digest)
                keep.append(at)
            at += 1
    dropped = len(ds) - len(keep)
    if dropped:
        log.warning("dataset_exact_deduplication: dropped %d duplicate row(s)", dropped)
    return _select(ds, keep), dropped


def _build(
    config: NewtuneConfig,
    tokenizer: Any,
    template: str | None,
    strategies: list,
    test_strats: list,
    work: Path,
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    if is_multimodal(config):  # image rows: messages and image references, no tokens
        from newtune.data.prepare_vision import build_vision

        return build_vision(config, strategies, test_strats, _split)
    merged, per_dataset = _load_entries(
        config.datasets, "datasets", config, tokenizer, template, strategies, work
    )
    blank = sum(d["dropped_empty"] for d in per_dataset)
    if config.shuffle_merged_datasets:
        merged = merged.shuffle(seed=config.seed)
    if config.dataset_shard_num:
        merged = merged.shard(
            num_shards=config.dataset_shard_num, index=config.dataset_shard_idx or 0
        )
    merged, counts = _finish(merged, config, "training")
    if config.dataset_exact_deduplication:
        merged, counts["dropped_duplicates"] = deduplicate(merged)
    splits = _split(merged, config)
    if config.test_datasets:
        test, test_report = _load_entries(
            config.test_datasets, "test_datasets", config, tokenizer, template, test_strats, work
        )
        splits["test"], _ = _finish(test, config, "test")
        if config.dataset_exact_deduplication:
            splits["test"], _ = deduplicate(splits["test"])
        per_dataset += test_report
    split_report = {name: split_stats(ds) for name, ds in splits.items()}
    stats = {
        **(
            {"training_method": training_method(config)} if training_method(config) != "sft" else {}
        ),
        "datasets": per_dataset,
        "rows": {name: s["rows"] for name, s in split_report.items()},
        "total_tokens": split_report["train"]["total_tokens"],
        "supervised_tokens": split_report["train"]["supervised_tokens"],
        "dropped_empty": blank,
        **counts,
        "length_percentiles": split_report["train"]["length_percentiles"],
        "splits": split_report,
    }
    return splits, stats


def prepare_data(loaded: Any, force: bool = False) -> tuple[Any, PreparedData]:
    """Load the tokenizer of a loaded config and prepare (or reuse) its tokenized dataset.

    The entry point of `newtune preprocess`: it needs the tokenizer only, not the Trainer stack.
    """
    from newtune.models.tokenizer import load_tokenizer  # transformers, but no Trainer

    if is_multimodal(loaded.config):  # the processor's tokenizer and template, as train has
        from newtune.models.processor import load_processor

        processor = load_processor(loaded.config).processor
        return processor.tokenizer, prepare(
            loaded.config, processor.tokenizer, processor.chat_template, force=force
        )
    tokenizer, _ = load_tokenizer(loaded.config)  # new token ids matter to the model only
    return tokenizer, prepare(loaded.config, tokenizer, tokenizer.chat_template, force=force)


def prepare(
    config: NewtuneConfig, tokenizer: Any, chat_template: str | None, force: bool = False
) -> PreparedData:
    """Prepare (or reuse) the tokenized dataset; concurrent processes wait for one writer."""
    if not config.datasets:  # a pretraining_dataset config: streamed while training
        raise ConfigError(
            "this config has `pretraining_dataset` and no `datasets`: a stream is read, "
            "tokenized and packed while training (`newtune train`), so there is nothing to "
            "prepare on disk"
        )
    strategies = [_strategy_for(e, i, "datasets", config) for i, e in enumerate(config.datasets)]
    test_strats = [
        _strategy_for(e, i, "test_datasets", config)
        for i, e in enumerate(config.test_datasets or [])
    ]
    inputs = fingerprint_inputs(config, tokenizer, chat_template)
    if is_multimodal(config):
        inputs["multimodal"] = {"check_images": not config.skip_prepare_dataset}
    fp = fingerprint(inputs, strategies + test_strats)
    root = Path(config.dataset_prepared_path)
    root.mkdir(parents=True, exist_ok=True)
    final = root / fp
    with FileLock(str(root / f".{fp}.lock")):
        for stale in fileio.clean_stale(root):
            log.info("removed %s, left by a preprocess that was killed", stale)
        if force and final.exists():
            shutil.rmtree(final)
        reused = (final / "stats.json").is_file()
        if not reused:
            with fileio.atomic_dir(final) as tmp:
                work = tmp / WORK_FOLDER
                splits, stats = _build(
                    config, tokenizer, chat_template, strategies, test_strats, work
                )
                _save(splits, tmp, {"fingerprint": fp, **stats}, inputs)
                shutil.rmtree(work, ignore_errors=True)
        data = datasets.load_from_disk(str(final), keep_in_memory=config.dataset_keep_in_memory)
        stats = _with_packing(final, data, config)
    if config.push_dataset_to_hub:
        push_prepared(config.push_dataset_to_hub, data, fp)
    return PreparedData(final, data, stats, reused=reused)


def _with_packing(final: Path, data: datasets.DatasetDict, config: NewtuneConfig) -> dict:
    """The saved stats, with this run's packing report (or without one) written back.

    Packing is not part of the fingerprint (the tokens do not change), so the report is
    recomputed for each run's `sample_packing`/`sequence_len`/`micro_batch_size` settings.
    """
    path = final / "stats.json"
    stats = json.loads(path.read_text())
    report = None
    packing = packing_plan(config)[0]
    if packing is not None and "input_ids" in data["train"].column_names:  # SFT rows
        report = packing_report(sample_lengths(data["train"]), packing, config.seed)
    if stats.get("packing") != report:
        stats.pop("packing", None)
        if report is not None:
            stats["packing"] = report
        fileio.clean_stale(final)  # a temp report of a killed run
        tmp = fileio.temp_name(path)
        tmp.write_text(json.dumps(stats, indent=2))
        os.replace(tmp, path)
    return stats


def _split(ds: datasets.Dataset, config: NewtuneConfig) -> datasets.DatasetDict:
    size = config.val_set_size
    if not size:
        return datasets.DatasetDict({"train": ds})
    test_size: float | int = size if size < 1 else int(size)
    if (isinstance(test_size, int) and test_size >= len(ds)) or len(ds) < 2:
        raise DataError(
            f"val_set_size={size} leaves no training rows out of {len(ds)}. Lower `val_set_size`."
        )
    split = ds.train_test_split(test_size=test_size, seed=config.seed, shuffle=True)
    return datasets.DatasetDict({"train": split["train"], "test": split["test"]})


def _save(splits: datasets.DatasetDict, folder: Path, stats: dict, inputs: dict[str, Any]) -> None:
    """Write the splits, the report and the fingerprint inputs into `folder`."""
    datasets.DatasetDict(
        {
            name: ds.remove_columns([c for c in ds.column_names if c.startswith("_")])
            for name, ds in splits.items()
        }
    ).save_to_disk(str(folder))
    (folder / "stats.json").write_text(json.dumps(stats, indent=2))
    (folder / "fingerprint.json").write_text(json.dumps(inputs, indent=2, default=str))
