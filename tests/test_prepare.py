"""The prepared-data cache: fingerprint, reuse, splits, filtering and row errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import datasets
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
        "test_datasets",
        "tokenizer",
        "chat_template",
        "sequence_len",
        "min_sample_len",
        "excess_length_strategy",
        "train_on_inputs",
        "val_set_size",
        "shuffle_merged_datasets",
        "dataset_shard_num",
        "dataset_shard_idx",
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
    left = [p.name for p in (tmp_path / "prepared").iterdir() if not p.name.endswith(".lock")]
    assert left == []  # nothing half-written


def test_missing_columns(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(
        DataError, match=r"needs column\(s\) instruction, output but the data has text"
    ):
        prepare(config(tmp_path, data), tokenizer, None)


@pytest.mark.parametrize(
    "change",
    [
        {"sequence_len": 512},
        {"train_on_inputs": True},
        {"val_set_size": 2},
        {"seed": 7},
        {"min_sample_len": 3},
        {"excess_length_strategy": "truncate"},
        {"shuffle_merged_datasets": True},
        {"dataset_shard_num": 2},
        {"datasets": [{"path": "DATA", "type": "alpaca:instruct", "split": "train"}]},
    ],
)
def test_each_fingerprint_input_invalidates(tmp_path, tokenizer, change):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    base = prepare(config(tmp_path, data), tokenizer, None)
    if "datasets" in change:
        change = {"datasets": [{**change["datasets"][0], "path": str(data)}]}
        cfg = NewtuneConfig(
            base_model="unused", dataset_prepared_path=str(tmp_path / "prepared"), **change
        )
    else:
        cfg = config(tmp_path, data, **change)
    assert prepare(cfg, tokenizer, None).path != base.path


def test_tokenizer_and_template_are_fingerprint_inputs(tmp_path, tokenizer, chat_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    a = prepare(config(tmp_path, data), tokenizer, None).path
    b = prepare(config(tmp_path, data), chat_tokenizer, None).path
    c = prepare(config(tmp_path, data), tokenizer, "{{ messages }}").path
    assert len({a, b, c}) == 3


def test_force_rebuilds(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = prepare(config(tmp_path, data), tokenizer, None)
    forced = prepare(config(tmp_path, data), tokenizer, None, force=True)
    assert forced.path == first.path and not forced.reused


def test_excess_length_strategies_and_min_len(tmp_path, tokenizer):
    rows = [*ROWS, {"instruction": "Say it. " * 80, "input": "", "output": "ok"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cut = prepare(
        config(tmp_path, data, sequence_len=120, excess_length_strategy="truncate"), tokenizer, None
    )
    assert (cut.stats["truncated"], cut.stats["dropped_too_long"]) == (1, 0)
    assert cut.stats["dropped_no_supervision"] == 1  # truncated inside the masked prompt
    with pytest.raises(
        DataError,
        match=r"^1 row\(s\) are longer than sequence_len=120 .* `excess_length_strategy: raise`",
    ):
        prepare(
            config(tmp_path, data, sequence_len=120, excess_length_strategy="raise"),
            tokenizer,
            None,
        )
    with pytest.raises(DataError, match="no training rows are left"):
        prepare(config(tmp_path, data, min_sample_len=1000), tokenizer, None)


def test_report_fields(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    stats = prepare(config(tmp_path, data, val_set_size=2), tokenizer, None).stats
    lengths = sorted(
        len(x)
        for x in prepare(config(tmp_path, data, val_set_size=2), tokenizer, None).data["train"][
            "input_ids"
        ]
    )
    assert stats["rows"] == {"train": 8, "test": 2}
    assert stats["total_tokens"] == sum(lengths)
    assert stats["length_percentiles"]["max"] == lengths[-1]
    assert stats["length_percentiles"]["p50"] == lengths[4]
    assert 0 < stats["supervised_tokens"] < stats["total_tokens"]
    assert {"dropped_too_long", "dropped_too_short", "dropped_no_supervision", "truncated"} <= set(
        stats
    )


def test_shard_shuffle_and_test_datasets(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    test = write_jsonl(tmp_path / "t.jsonl", ROWS[:3])
    cfg = config(
        tmp_path,
        data,
        dataset_shard_num=2,
        dataset_shard_idx=1,
        test_datasets=[{"path": str(test), "type": "alpaca"}],
    )
    prepared = prepare(cfg, tokenizer, None)
    assert (len(prepared.data["train"]), len(prepared.data["test"])) == (5, 3)
    plain = prepare(config(tmp_path, data), tokenizer, None).data["train"]["input_ids"]
    shuffled = prepare(config(tmp_path, data, shuffle_merged_datasets=True), tokenizer, None)
    assert sorted(map(tuple, shuffled.data["train"]["input_ids"])) == sorted(map(tuple, plain))
    assert shuffled.data["train"]["input_ids"] != plain


def test_pretokenized_rows_pass_through(tmp_path, tokenizer):
    rows = [{"input_ids": [1, 5, 6, 2], "labels": [-100, 5, 6, 2]}, {"input_ids": [1, 7, 2]}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = NewtuneConfig(
        base_model="unused",
        datasets=[{"path": str(data)}],
        dataset_prepared_path=str(tmp_path / "prepared"),
    )
    train = prepare(cfg, tokenizer, None).data["train"]
    assert train["input_ids"] == [[1, 5, 6, 2], [1, 7, 2]]
    assert train["labels"] == [[-100, 5, 6, 2], [1, 7, 2]]
    assert train["attention_mask"] == [[1, 1, 1, 1], [1, 1, 1]]


def _prepare_in_child(args):
    tmp_path, data, tok_dir = args
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    prepared = prepare(config(tmp_path, data), tok, None)
    return str(prepared.path), prepared.reused


def test_concurrent_processes_wait_for_one_writer(tmp_path, tok_dir):
    import multiprocessing as mp

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with mp.get_context("fork").Pool(2) as pool:
        results = pool.map(_prepare_in_child, [(tmp_path, data, tok_dir)] * 2)
    assert results[0][0] == results[1][0]
    assert sorted(r[1] for r in results) == [False, True]


def test_stale_temp_and_incomplete_cache_are_rebuilt(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = prepare(config(tmp_path, data), tokenizer, None)
    # as if a killed run left a temp folder (named by fileio, with a dead pid), and a copy
    # without its report
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = first.path.parent / f".tmp-{first.path.name}-{dead.pid}@{socket.gethostname()}"
    stale.mkdir()
    (first.path / "stats.json").unlink()
    again = prepare(config(tmp_path, data), tokenizer, None)
    assert not again.reused and (again.path / "stats.json").is_file()
    assert len(again.data["train"]) == 10
    assert not stale.exists()


def test_crash_while_saving_leaves_no_cache(tmp_path, tokenizer, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)

    def crash(self, path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "partial").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(config(tmp_path, data), tokenizer, None)
    left = [p.name for p in (tmp_path / "prepared").iterdir() if not p.name.endswith(".lock")]
    assert left == []


def test_sharegpt_conversation_style_picks_the_template(tmp_path, tokenizer):
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    ]
    data = write_jsonl(tmp_path / "s.jsonl", rows)
    cfg = NewtuneConfig(
        base_model="unused",
        dataset_prepared_path=str(tmp_path / "prepared"),
        datasets=[{"path": str(data), "type": "sharegpt", "conversation": "chatml"}],
    )
    row = prepare(cfg, tokenizer, None).data["train"][0]
    assert tokenizer.decode(row["input_ids"]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_tokenizer_threads_are_enabled_only_in_this_process_and_restored(monkeypatch):
    import os

    from newtune.data import prepare as prep

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with prep._tokenizer_threads(True):
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setattr(prep, "_IMPORT_PID", -1)  # as if forked after import
    with prep._tokenizer_threads(True):
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_small_data_tokenizes_in_process_large_data_in_workers():
    from newtune.config.schema import NewtuneConfig
    from newtune.data.prepare import ROWS_PER_PROCESS, _num_proc

    cfg = NewtuneConfig(base_model="m", datasets=[{"path": "x.jsonl"}], dataset_processes=4)
    assert _num_proc(cfg, 20_000) is None
    assert _num_proc(cfg, 2 * ROWS_PER_PROCESS) == 2
    assert _num_proc(cfg, 100 * ROWS_PER_PROCESS) == 4


def test_worker_processes_give_the_same_rows_as_one_process(tmp_path, tokenizer, monkeypatch):
    from newtune.data import prepare as prep

    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 3)
    one = prepare(config(tmp_path, data, dataset_processes=1), tokenizer, None, force=True)
    expected = one.data["train"].to_dict()
    monkeypatch.setattr(prep, "ROWS_PER_PROCESS", 5)  # 30 rows -> 2 worker processes
    assert prep._num_proc(config(tmp_path, data, dataset_processes=2), 30) == 2
    two = prepare(config(tmp_path, data, dataset_processes=2), tokenizer, None, force=True)
    assert two.data["train"].to_dict() == expected
