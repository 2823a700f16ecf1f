"""The prepared-data cache: fingerprint, reuse, splits, filtering and row errors."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from newtune.config.schema import NewtuneConfig
from newtune.data.prepare import prepare
from newtune.errors import DataError

ROWS = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(10)]


def config(tmp_path, data, **extra) -> NewtuneConfig:
    return NewtuneConfig(
        base_model="unused",
        datasets=[{"path": str(data), "type": "alpaca"}],
        dataset_prepared_path=str(tmp_path / "prepared"),
        **extra,
    )


def test_reuse_and_fingerprint_inputs(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = prepare(config(tmp_path, data), tokenizer, None)
    again = prepare(config(tmp_path, data), tokenizer, None)
    assert not first.reused and again.reused and again.path == first.path
    other = prepare(config(tmp_path, data, sequence_len=512), tokenizer, None)
    assert other.path != first.path
    write_jsonl(data, ROWS[:5])  # the data changed: a new fingerprint
    changed = prepare(config(tmp_path, data), tokenizer, None)
    assert changed.path not in (first.path, other.path) and len(changed.data["train"]) == 5
    inputs = json.loads((first.path / "fingerprint.json").read_text())
    assert set(inputs) == {
        "datasets",
        "tokenizer",
        "chat_template",
        "sequence_len",
        "train_on_inputs",
        "val_set_size",
        "seed",
        "engine_version",
    }


def test_val_set_size_count_and_fraction(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    by_count = prepare(config(tmp_path, data, val_set_size=3), tokenizer, None)
    assert (len(by_count.data["train"]), len(by_count.data["test"])) == (7, 3)
    by_frac = prepare(config(tmp_path, data, val_set_size=0.2), tokenizer, None)
    assert (len(by_frac.data["train"]), len(by_frac.data["test"])) == (8, 2)
    assert by_frac.stats["splits"]["test"]["rows"] == 2


def test_too_long_rows_are_dropped_and_counted(tmp_path, tokenizer):
    rows = [*ROWS, {"instruction": "Say it. " * 50, "input": "", "output": "ok"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare(config(tmp_path, data, sequence_len=64), tokenizer, None)
    assert prepared.stats["dropped_too_long"] == 1
    assert len(prepared.data["train"]) == 10
    assert max(len(x) for x in prepared.data["train"]["input_ids"]) <= 64


def test_bad_row_names_dataset_and_row(tmp_path, tokenizer):
    rows = [*ROWS[:3], {"instruction": "Say x.", "input": "", "output": None}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        prepare(config(tmp_path, data), tokenizer, None)
    assert str(info.value).startswith(
        f"datasets[0] ({data}) row 3: column `output` is empty (null)."
    )
    assert not list((tmp_path / "prepared").glob("*"))  # nothing half-written


def test_missing_columns(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(
        DataError, match=r"needs column\(s\) instruction, output but the data has text"
    ):
        prepare(config(tmp_path, data), tokenizer, None)
