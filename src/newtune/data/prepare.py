"""Turn the configured datasets into a tokenized DatasetDict, cached on disk by fingerprint.

Contract: `{dataset_prepared_path}/{fingerprint}/` is a `datasets.DatasetDict` saved with
`save_to_disk`, split `train` (and `test` when `val_set_size > 0`), columns `input_ids`,
`attention_mask`, `labels`, plus `stats.json` and `fingerprint.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from newtune.config.schema import DatasetEntry, NewtuneConfig
from newtune.data.sources import load_rows, local_files
from newtune.data.strategies import Strategy, get_strategy
from newtune.data.tokenize import IGNORE_INDEX, Engine
from newtune.errors import DataError

ENGINE_VERSION = 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    """The prepared dataset, where it lives on disk, and its report."""

    path: Path
    data: datasets.DatasetDict
    stats: dict[str, Any]
    reused: bool


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def fingerprint_inputs(
    config: NewtuneConfig, tokenizer: Any, chat_template: str | None
) -> dict[str, Any]:
    """The named list of everything the prepared data depends on."""
    entries = []
    for i, entry in enumerate(config.datasets):
        files = local_files(entry, i)
        entries.append(
            {
                "entry": entry.model_dump(mode="json"),
                "files": {f: _hash_file(f) for f in files} if files else None,
            }
        )
    return {
        "datasets": entries,
        "tokenizer": tokenizer_identity(tokenizer),
        "chat_template": chat_template,
        "sequence_len": config.sequence_len,
        "train_on_inputs": config.train_on_inputs,
        "val_set_size": config.val_set_size,
        "seed": config.seed,
        "engine_version": ENGINE_VERSION,
    }


def fingerprint(inputs: dict[str, Any], strategies: list[Strategy]) -> str:
    """A short stable hash of the fingerprint inputs and the strategy versions."""
    blob = json.dumps(
        {**inputs, "strategies": [[s.name, s.version] for s in strategies]}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _engine_for(entry: DatasetEntry, config: NewtuneConfig, tokenizer: Any, template: str | None):
    return Engine(
        tokenizer,
        chat_template=template,
        roles_to_train=tuple(entry.roles_to_train or ("assistant",)),
        train_on_eos=entry.train_on_eos or "turn",
        train_on_inputs=config.train_on_inputs,
        sequence_len=config.sequence_len,
    )


def _tokenize_entry(
    index: int, entry: DatasetEntry, strategy: Strategy, engine: Engine
) -> datasets.Dataset:
    rows = load_rows(entry, index)
    missing = [c for c in strategy.required_columns() if c not in rows.column_names]
    if missing:
        raise DataError(
            f"datasets[{index}] ({entry.path}, type {entry.type}) needs column(s) "
            f"{', '.join(missing)} but the data has {', '.join(rows.column_names)}. "
            "Pick the matching `type` or rename the columns."
        )

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": []}
        keys = list(batch)
        for j, idx in enumerate(indices):
            row = {k: batch[k][j] for k in keys}
            try:
                for tok_row in engine.tokenize(strategy.sample(row)):
                    out["input_ids"].append(tok_row.input_ids)
                    out["labels"].append(tok_row.labels)
            except (DataError, KeyError, TypeError, ValueError) as exc:
                raise DataError(
                    f"datasets[{index}] ({entry.path}) row {idx}: {exc}. Fix that row or the "
                    "dataset's `type` and mapping keys."
                ) from None
        return out

    return rows.map(
        tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        desc=f"Tokenizing datasets[{index}]",
        load_from_cache_file=False,
    )


def _filter_and_report(ds: datasets.Dataset, sequence_len: int) -> tuple[datasets.Dataset, dict]:
    lengths = [len(x) for x in ds["input_ids"]]
    trained = [sum(1 for t in lab if t != IGNORE_INDEX) for lab in ds["labels"]]
    keep = [
        i
        for i, (n, t) in enumerate(zip(lengths, trained, strict=False))
        if n <= sequence_len and t > 0
    ]
    too_long = sum(1 for n in lengths if n > sequence_len)
    no_labels = sum(
        1 for n, t in zip(lengths, trained, strict=False) if n <= sequence_len and t == 0
    )
    if too_long:
        log.warning("dropped %d row(s) longer than sequence_len=%d", too_long, sequence_len)
    if no_labels:
        log.warning("dropped %d row(s) with no trained tokens", no_labels)
    return ds.select(keep), {"dropped_too_long": too_long, "dropped_no_trained_tokens": no_labels}


def _split_stats(ds: datasets.Dataset) -> dict[str, Any]:
    lengths = [len(x) for x in ds["input_ids"]]
    trained = sum(sum(1 for t in lab if t != IGNORE_INDEX) for lab in ds["labels"])
    return {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "trained_tokens": trained,
        "max_len": max(lengths, default=0),
        "mean_len": round(sum(lengths) / len(lengths), 2) if lengths else 0,
    }


def prepare(config: NewtuneConfig, tokenizer: Any, chat_template: str | None) -> PreparedData:
    """Prepare (or reuse) the tokenized dataset for this config and tokenizer."""
    strategies = [get_strategy(e, i, config.train_on_inputs) for i, e in enumerate(config.datasets)]
    inputs = fingerprint_inputs(config, tokenizer, chat_template)
    fp = fingerprint(inputs, strategies)
    root = Path(config.dataset_prepared_path)
    final = root / fp
    if (final / "stats.json").is_file():
        stats = json.loads((final / "stats.json").read_text())
        return PreparedData(final, datasets.load_from_disk(str(final)), stats, reused=True)

    parts = []
    per_dataset = []
    for i, (entry, strategy) in enumerate(zip(config.datasets, strategies, strict=False)):
        part = _tokenize_entry(
            i, entry, strategy, _engine_for(entry, config, tokenizer, chat_template)
        )
        per_dataset.append({"path": entry.path, "type": entry.type, "rows": len(part)})
        parts.append(part)
    merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    merged, dropped = _filter_and_report(merged, config.sequence_len)
    if len(merged) == 0:
        raise DataError(
            "no training rows are left after tokenizing: every row was longer than "
            f"sequence_len={config.sequence_len} or had no trained tokens. Raise `sequence_len` "
            "or check the dataset `type` and its masking options."
        )
    merged = merged.add_column("attention_mask", [[1] * len(x) for x in merged["input_ids"]])
    splits = _split(merged, config)
    stats = {
        "fingerprint": fp,
        "datasets": per_dataset,
        **dropped,
        "splits": {name: _split_stats(ds) for name, ds in splits.items()},
    }
    _save_atomically(splits, final, stats, inputs)
    return PreparedData(final, datasets.load_from_disk(str(final)), stats, reused=False)


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


def _save_atomically(
    splits: datasets.DatasetDict, final: Path, stats: dict, inputs: dict[str, Any]
) -> None:
    """Write to a temp folder beside `final`, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    splits.save_to_disk(str(tmp))
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    (tmp / "fingerprint.json").write_text(json.dumps(inputs, indent=2, default=str))
    try:
        os.rename(tmp, final)
    except OSError:
        # another process finished first (or a stale copy is there): keep the complete one
        if (final / "stats.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
