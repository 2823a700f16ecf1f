"""Streamed training: `pretraining_dataset` and `streaming: true` read, pack and resume on the fly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file
from test_cli import ALPACA, CHATS, cli
from test_resume import CrashAfterSave, SimulatedCrash

from newtune.cli.common import load
from newtune.data import streaming
from newtune.data.packing import Packing
from newtune.data.prepare import prepare
from newtune.data.streaming import POSITION_FILE, StreamPosition, TokenStream
from newtune.train import run, streamed

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Paris", "color"]


def texts(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` rows of 2..24 words each, numbered so that every row is different."""
    rng = random.Random(seed)
    return [
        {"text": f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 24)))}
        for i in range(n)
    ]


def stream_config(tmp_path: Path, model_dir: Path, data: Path, **extra) -> Path:
    cfg = {
        "base_model": str(model_dir),
        "pretraining_dataset": [{"path": str(data), "type": "pretrain", "text_column": "text"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 3,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "sample_packing": True,
        "streaming_multipack_buffer_size": 100,
        **extra,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stream(cfg: Path, **kw) -> TokenStream:
    from transformers import AutoTokenizer

    config = load(str(cfg), {}).config
    tok = AutoTokenizer.from_pretrained(config.base_model)
    rows = 1 if config.sample_packing else config.micro_batch_size
    packing = Packing(config.sequence_len, rows)
    return TokenStream(config, tok, tok.chat_template, packing, **kw)


def _take(stream: TokenStream, n: int) -> list[list[dict]]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


# -- the CLI run ------------------------------------------------------------------------------


def test_cli_pretraining_reads_only_what_max_steps_needs(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "corpus.jsonl", texts(2000))
    cfg = stream_config(tmp_path, model_dir, data)
    proc = cli("-m", "newtune.cli.main", "train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file()
    report = json.loads((out / "stats.json").read_text())["stream"]
    # 3 steps x 2 rows: one buffer of 100 rows packs into ~25 full rows, so one buffer is read
    assert report["rows_read"] == 100
    assert report["packed_rows"] == 6
    assert report["efficiency"] >= 0.99
    assert not (tmp_path / "prepared").exists()  # nothing prepared on disk
    history = json.loads((out / "log_history.json").read_text())
    assert max(h["step"] for h in history) == 3


def test_packing_efficiency_over_many_buffers(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "corpus.jsonl", texts(3000))
    cfg = stream_config(tmp_path, model_dir, data, streaming_multipack_buffer_size=200)
    stream = _stream(cfg)
    bins = _take(stream, 400)  # crosses many buffers
    report = stream.stats.report()
    assert report["packed_rows"] == 400 and report["efficiency"] >= 0.99
    assert all(sum(len(s["input_ids"]) for s in b) <= 64 for b in bins)
    assert stream.stats.rows_read < 3000  # only what 400 rows needed (whole buffers)


def test_cli_pretraining_without_max_steps_is_refused(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "corpus.jsonl", texts(10))
    cfg = stream_config(tmp_path, model_dir, data, max_steps=None)
    proc = cli("-m", "newtune.cli.main", "train", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "`pretraining_dataset` needs `max_steps`: a stream has no length" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- resume -----------------------------------------------------------------------------------


class Recorder(streamed.PackedCollator):
    """The collator, recording the token ids of every micro-batch it builds."""

    seen: list[list[list[int]]] = []

    def __call__(self, bins):
        batch = super().__call__(bins)
        Recorder.seen.append(batch["input_ids"].tolist())
        return batch


def _train(cfg: Path, monkeypatch, *callbacks, **overrides) -> tuple[Path, list, TokenStream]:
    Recorder.seen = []
    streams: list[TokenStream] = []
    real_stream = streamed.TokenStream

    def keep(*a, **k):
        streams.append(real_stream(*a, **k))
        return streams[-1]

    monkeypatch.setattr(streamed, "PackedCollator", Recorder)
    monkeypatch.setattr(streamed, "TokenStream", keep)
    if callbacks:
        real = run.build_callbacks
        monkeypatch.setattr(
            "newtune.train.callbacks.build_callbacks", lambda *a: [*real(*a), *callbacks]
        )
    try:
        out = run.train(load(str(cfg), overrides))
    finally:
        monkeypatch.undo()
    return out, list(Recorder.seen), streams[0]


def test_resumed_stream_continues_with_the_rows_of_an_uninterrupted_run(
    tmp_path, model_dir, monkeypatch
):
    data = write_jsonl(tmp_path / "corpus.jsonl", texts(1500))
    keys = dict(
        max_steps=6,
        save_steps=3,
        gradient_accumulation_steps=2,
        streaming_multipack_buffer_size=20,  # checkpoint mid-buffer, carried samples
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_linear=True,
        seed=7,
    )
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full_dir.mkdir()
    part_dir.mkdir()
    full_cfg = stream_config(full_dir, model_dir, data, **keys)
    full, full_batches, full_stream = _train(full_cfg, monkeypatch)
    assert len(full_batches) == 12  # 6 steps x 2 micro-batches

    part_cfg = stream_config(part_dir, model_dir, data, **keys)
    with pytest.raises(SimulatedCrash):
        _train(part_cfg, monkeypatch, CrashAfterSave(3))
    ckpt = part_dir / "out" / "checkpoint-3"
    saved = json.loads((ckpt / POSITION_FILE).read_text())
    assert saved["step"] == 3 and len(saved["ranks"]) == 1
    position = StreamPosition.from_json(saved["ranks"][0])
    assert position == full_stream.marks[6]  # where the uninterrupted run was after 6 batches
    assert position.row > 0

    out, resumed_batches, resumed_stream = _train(
        part_cfg, monkeypatch, resume_from_checkpoint=str(ckpt)
    )
    assert resumed_batches == full_batches[6:]  # the same token ids, micro-batch by micro-batch
    # the resumed stream skipped what the first 3 steps read instead of reading it again
    assert resumed_stream.stats.rows_read <= full_stream.stats.rows_read - position.row + 20
    a, b = (
        load_file(full / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_position_round_trips_through_json():
    pos = StreamPosition(2, 1, 40, (([1, 2, 3], [-100, 2, 3]),), 5)
    text = streaming.write_position([pos], 9)
    assert streaming.read_position(text, 0, 1, "x") == pos
    with pytest.raises(Exception, match="saved by 1 process"):
        streaming.read_position(text, 0, 2, "x")


# -- ranks and streaming SFT data ---------------------------------------------------------------


def test_every_rank_reads_its_own_part(tmp_path, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = write_jsonl(tmp_path / "corpus.jsonl", texts(60))
    cfg = stream_config(tmp_path, model_dir, data, sample_packing=False, micro_batch_size=1)
    numbers = []
    for rank in (0, 1):
        stream = _stream(cfg, rank=rank, world_size=2)
        bins = _take(stream, 30)  # one pass over this rank's 30 rows
        assert stream.stats.rows_read == 30
        numbers.append(
            [int(tok.decode(b[0]["input_ids"], skip_special_tokens=True).split()[0]) for b in bins]
        )
    assert numbers == [list(range(0, 60, 2)), list(range(1, 60, 2))]


def test_streaming_sft_rows_equal_prepared_rows(tmp_path, model_dir):
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": "chat_template"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        "micro_batch_size": 1,
        "max_steps": 3,
        "streaming": True,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    stream = _stream(path)
    got = _take(stream, len(CHATS))
    config = load(str(path), {}).config
    tok = AutoTokenizer.from_pretrained(config.base_model)
    prepared = prepare(config, tok, tok.chat_template).data["train"]
    assert [b[0]["input_ids"] for b in got] == prepared["input_ids"]
    assert [b[0]["labels"] for b in got] == prepared["labels"]


def test_cli_streaming_sft_trains(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    cfg = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 4,
        "streaming": True,
        "sample_packing": True,
        "streaming_multipack_buffer_size": 5,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = cli("-m", "newtune.cli.main", "train", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "stats.json").read_text())["stream"]
    # the alpaca prompts are long: about one sample per row, so 8 rows take two buffers of 5
    assert report["packed_rows"] == 8 and report["rows_read"] == 10
    assert not (tmp_path / "prepared").exists()
