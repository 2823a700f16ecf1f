"""Trust in training: crash-safe checkpoints and final saves, early refusals, no hidden state."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from test_cli import CHATS, cli, make_config

import newtune
from newtune.cli.common import load
from newtune.config.load import LoadedConfig
from newtune.errors import ConfigError
from newtune.fileio import temp_name
from newtune.train import run
from newtune.train.callbacks import RESUME_FILE, checkpoint_missing

SRC = Path(newtune.__file__).parent


def _dead_pid() -> int:
    """The id of a process that has exited (so clean_stale treats its temp entries as stale)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    return int(proc.stdout)


def _stale(parent: Path, final: str) -> Path:
    """A temp folder beside `parent/final` named as a dead process of this machine names it."""
    name = temp_name(parent / final).name.replace(f"-{os.getpid()}@", f"-{_dead_pid()}@")
    entry = parent / name
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"half")
    return entry


def _error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    return " ".join(proc.stderr[proc.stderr.index("newtune: error:") :].split())


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- 1. checkpoints: written whole, incomplete ones skipped on resume ------------------------


@pytest.mark.slow
def test_checkpoints_are_whole_and_resume_skips_incomplete_ones(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    keys = {"save_steps": 1, "save_total_limit": 2, "auto_resume_from_checkpoints": True}
    cfg = make_config(tmp_path, model_dir, data, "chat_template", **keys)
    loaded = load(str(cfg), {})
    before = loaded.config.model_dump()
    out = run.train(loaded)  # the Python API path: newtune.train(loaded) runs this
    assert loaded.config.model_dump() == before  # the caller's config is not changed

    # rotation (save_total_limit: 2) still works on renamed checkpoints; no temp entry is left
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-2", "checkpoint-3"]
    assert _hidden(out) == []
    for name in names:
        assert checkpoint_missing(out / name) == []
        assert json.loads((out / name / RESUME_FILE).read_text())["data"]

    # a run killed while writing checkpoint-3 and -4 (as older versions could leave them)
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    stale = _stale(out, "checkpoint-5")
    (out / "log_history.json").unlink()
    proc = cli("-m", "newtune.cli.main", "train", str(cfg), "--max_steps=4")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert f"skipping incomplete checkpoint {out / 'checkpoint-4'} (it lacks model weights" in err
    assert (
        f"skipping incomplete checkpoint {out / 'checkpoint-3'} (it lacks trainer_state.json" in err
    )
    assert f"resuming from {out / 'checkpoint-2'}" in err
    assert f"removed {stale}" in err and not stale.exists()
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]  # 3 and 4 ran again
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-3", "checkpoint-4"]  # rewritten whole, over the broken ones
    assert all(checkpoint_missing(out / n) == [] for n in names)
    assert _hidden(out) == []


@pytest.mark.slow
def test_a_run_killed_while_saving_a_checkpoint_leaves_no_checkpoint_folder(
    tmp_path, model_dir, monkeypatch
):
    from newtune.train.trainer import NewtuneTrainer

    class Killed(Exception):
        pass

    def die(self, output_dir):
        raise Killed(output_dir)

    monkeypatch.setattr(NewtuneTrainer, "_save_rng_state", die)  # after weights and optimizer
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(tmp_path, model_dir, data, "chat_template", save_steps=1, max_steps=1)
    with pytest.raises(Killed) as killed:
        run.train(load(str(cfg), {}))
    out = tmp_path / "out"
    tmp = Path(str(killed.value))
    assert tmp == temp_name(out / "checkpoint-1")  # written under a temp name ...
    assert (tmp / "model.safetensors").is_file() and (tmp / "optimizer.pt").is_file()
    assert not (out / "checkpoint-1").exists()  # ... so no checkpoint-1 that looks whole


ZERO_ROWS = [
    {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}."}
    for a in range(3)
    for b in range(4)
]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)
def test_two_rank_zero2_checkpoints_are_renamed_whole_and_resume(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "a.jsonl", ZERO_ROWS)  # 12 rows = 3 steps x 2 rows x 2 ranks
    keys = {"save_steps": 1, "max_steps": 2, "auto_resume_from_checkpoints": True}
    cfg = make_config(tmp_path, model_dir, data, "alpaca", deepspeed="zero2", **keys)
    launch = ["--", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--main_process_port", "0"]  # a free port: launches may run side by side
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = cli("-m", "newtune.cli.train", str(cfg), "--launcher", "accelerate", *launch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert _hidden(out) == []  # every rank wrote into the one temp folder, renamed once
    for step in (1, 2):
        folder = out / f"checkpoint-{step}"
        assert checkpoint_missing(folder) == []
        assert (folder / "rng_state_0.pth").is_file() and (folder / "rng_state_1.pth").is_file()
        assert (folder / f"global_step{step}").is_dir()  # DeepSpeed's per-rank optimizer shards
        assert (folder / "latest").read_text().strip() == f"global_step{step}"
    proc = cli(
        "-m", "newtune.cli.train", str(cfg), "--max_steps=3", "--launcher", "accelerate", *launch
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in " ".join(proc.stderr.split())
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    assert checkpoint_missing(out / "checkpoint-3") == [] and _hidden(out) == []


def test_resume_from_an_incomplete_checkpoint_names_what_is_missing(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    broken = tmp_path / "out" / "checkpoint-7"
    broken.mkdir(parents=True)
    (broken / "trainer_state.json").write_text('{"global_st')  # cut off mid-write
    cfg = make_config(
        tmp_path, model_dir, data, "chat_template", resume_from_checkpoint=str(broken)
    )
    proc = cli("-m", "newtune.cli.main", "train", str(cfg))
    assert proc.returncode == 2
    assert _error(proc) == (
        f"newtune: error: `resume_from_checkpoint: {broken}` is not a complete training "
        "checkpoint: it lacks a readable trainer_state.json (it is truncated or not JSON) and "
        "model weights (model.safetensors, adapter_model.safetensors, ...) (a run killed while "
        "writing it leaves such a folder). Point it at a complete `checkpoint-N` folder from "
        "output_dir (an earlier one), or remove the key to start from the base model"
    )
    assert not (tmp_path / "prepared").exists()  # refused before any data was prepared
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-7"]


# -- 2. output_dir must be a writable folder, checked before any work -----------------------


def _train_cli(tmp_path, model_dir, **keys) -> subprocess.CompletedProcess:
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(tmp_path, model_dir, data, "chat_template", **keys)
    return cli("-m", "newtune.cli.main", "train", str(cfg))


def test_output_dir_that_is_a_file_is_refused_before_work(tmp_path, model_dir):
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    proc = _train_cli(tmp_path, model_dir, output_dir=str(target))
    assert proc.returncode == 2
    assert _error(proc).startswith(
        f"newtune: error: `output_dir: {target}` is a file, not a folder"
    )
    assert target.read_text() == "keep me"
    assert not (tmp_path / "prepared").exists()


def test_output_dir_below_a_file_is_refused(tmp_path, model_dir):
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    proc = _train_cli(tmp_path, model_dir, output_dir=str(target / "run1"))
    assert proc.returncode == 2
    assert (
        f"`output_dir: {target / 'run1'}` cannot be created: {target} is a file, not a folder"
    ) in _error(proc)
    assert target.read_text() == "keep me"
    assert not (tmp_path / "prepared").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_dir_that_cannot_be_written_is_refused(tmp_path, model_dir):
    proc = _train_cli(tmp_path, model_dir, output_dir="/proc/newtune-out")
    assert proc.returncode == 2
    assert (
        "`output_dir`: cannot write into /proc (where `output_dir: /proc/newtune-out` is "
        "created): No such file or directory. Choose an `output_dir` you can write to"
    ) in _error(proc)
    assert not (tmp_path / "prepared").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_without_write_permission_is_refused(tmp_path, model_dir):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    proc = _train_cli(tmp_path, model_dir, output_dir=str(locked))
    assert proc.returncode == 2
    assert f"`output_dir`: cannot write into {locked}: Permission denied" in _error(proc)


# -- 3. sequence_len against the model's context and the machine's memory ------------------


def test_sequence_len_that_cannot_be_allocated_is_refused_before_work(tmp_path, model_dir):
    keys = {"sequence_len": 10**9, "pad_to_sequence_len": True, "micro_batch_size": 64}
    proc = _train_cli(tmp_path, model_dir, **keys)
    assert proc.returncode == 2
    err = _error(proc)
    assert err.startswith(
        "newtune: error: `sequence_len: 1000000000` with `pad_to_sequence_len: true` pads every "
        "micro-batch to 64 x 1000000000 tokens, which needs at least 9,536.7 GiB while the cpu "
        "device has"
    )
    assert err.endswith(
        "the run would fail when allocating its first batch. Lower `sequence_len` (the model's "
        "context is 256 tokens) or `micro_batch_size`, or remove `pad_to_sequence_len`"
    )
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "out").exists()


def test_sequence_len_above_the_context_warns_and_unpadded_is_not_refused(
    tmp_path, model_dir, caplog
):
    from newtune.config.resolve import resolve
    from newtune.train.preflight import check_sequence_len, padded_batch_bytes

    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(tmp_path, model_dir, data, "chat_template", sequence_len=10**9)
    config = load(str(cfg), {}).config
    with caplog.at_level("WARNING", logger="newtune"):
        check_sequence_len(config, resolve(config))  # no padding: only a warning
    assert [r.getMessage() for r in caplog.records] == [
        "`sequence_len: 1000000000` is above the model's context length "
        "(max_position_embeddings: 256): rows longer than 256 tokens use positions the model "
        "never saw. Lower sequence_len, or extend the context with `rope_scaling`"
    ]
    caplog.clear()
    inside = load(str(cfg), {"sequence_len": 256, "pad_to_sequence_len": True}).config
    with caplog.at_level("WARNING", logger="newtune"):
        check_sequence_len(inside, resolve(inside))
    assert caplog.records == []
    # the bound: 2 rows x 256 tokens x (4 int64 tensors + 2 layers x 32 wide x 2 bytes)
    assert padded_batch_bytes(inside, None) == 2 * 256 * 32
    from newtune.train.preflight import model_shape

    assert padded_batch_bytes(inside, model_shape(inside)) == 2 * 256 * (32 + 2 * 32 * 2)


# -- 4. no hidden state and no change to what the caller passed -----------------------------


def test_check_distributed_leaves_the_callers_config_unchanged(tmp_path):
    from newtune.train.distributed import check_distributed

    cfg = {
        "base_model": "./m",
        "datasets": [{"path": "d.jsonl", "type": "alpaca"}],
        "deepspeed": "zero1.json",
    }
    loaded = newtune.load_config(cfg)
    before = loaded.config.model_dump()
    pinned = check_distributed(loaded)
    assert loaded.config.model_dump() == before
    assert loaded.config.deepspeed == "zero1.json"
    assert Path(pinned.config.deepspeed).is_absolute()
    assert Path(pinned.config.deepspeed).name == "zero1.json"


def test_newtune_train_leaves_the_callers_loaded_config_unchanged(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("")
    cfg = {
        "base_model": "./m",
        "datasets": [{"path": "d.jsonl", "type": "alpaca"}],
        "deepspeed": "zero1.json",  # pinned to an absolute path for the run, not in `loaded`
        "output_dir": str(target),  # stops the run right after the distributed check
    }
    loaded = newtune.load_config(cfg)
    before = (loaded.config.model_dump(), json.dumps(loaded.raw), list(loaded.notes))
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        newtune.train(loaded)
    assert (loaded.config.model_dump(), json.dumps(loaded.raw), list(loaded.notes)) == before
    assert isinstance(loaded, LoadedConfig)


def test_no_newtune_attribute_is_set_on_library_objects():
    pattern = "._newtune_"
    hits = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern in line
    ]
    assert hits == []


def test_fused_head_is_an_argument_not_a_model_attribute(tmp_path, model_dir, monkeypatch):
    from transformers import LlamaForCausalLM, TrainingArguments

    from newtune.train.kernels import fused_head
    from newtune.train.trainer import NewtuneTrainer

    model = LlamaForCausalLM.from_pretrained(model_dir)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[])
    plain = NewtuneTrainer(model=model, args=args)
    fused = NewtuneTrainer(model=model, args=args, fused_head=True)
    assert plain._head_on_trained_only(model) is True
    assert fused._head_on_trained_only(model) is False
    assert not [k for k in vars(model) if "newtune" in k]
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    config_path = make_config(tmp_path, model_dir, data, "chat_template")
    config = load(str(config_path), {}).config
    assert fused_head(config) is False
    fused_config = config.model_copy(update={"liger_fused_linear_cross_entropy": True})
    assert fused_head(fused_config) is True  # (liger-kernel itself is not installed here)


def _tf32_state() -> list[str]:
    b = torch.backends
    nodes = [b, b.cuda.matmul, b.cudnn, b.cudnn.conv, b.cudnn.rnn, b.mkldnn]
    return [n.fp32_precision for n in nodes]


def test_tf32_is_scoped_to_the_run(monkeypatch):
    from newtune.train.precision import tf32_scope

    before = _tf32_state()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with tf32_scope(True):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        torch.backends.fp32_precision = "tf32"  # as transformers' enable_tf32 does
    assert _tf32_state() == before
    with tf32_scope(False):
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert _tf32_state() == before
    with tf32_scope(None):
        assert _tf32_state() == before
    assert torch.backends.cuda.matmul.allow_tf32 in (True, False)  # readable: no API mix


# -- 5. no import cycle between the API and the step-wise trainer ---------------------------


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_api_and_stepwise_do_not_import_each_other_in_a_cycle():
    stepwise = _imports(SRC / "train" / "stepwise.py")
    assert not any(m == "newtune.api" or m.startswith("newtune.api.") for m in stepwise)
    for first, absent in (
        ("newtune.train.stepwise", "newtune.api"),
        ("newtune.api", "newtune.train.stepwise"),
    ):
        code = f"import sys, {first}; print({absent!r} in sys.modules)"
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "False", first


# -- 6. the final save appears whole or not at all -----------------------------------------


def _final_tmp(out: Path, files: dict[str, str]) -> Path:
    tmp = out / temp_name(out / run.FINAL_NAME).name
    tmp.mkdir(parents=True)
    for name, text in files.items():
        (tmp / name).write_text(text)
    return tmp


NEW = {
    "model.safetensors": "new weights",
    "config.json": "{}",
    "generation_config.json": "{}",
    "tokenizer.json": "{}",
    "newtune_config.yml": "a: 1",
    "stats.json": "{}",
}


def _previous_run(out: Path) -> None:
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "model.safetensors").write_text("checkpoint")
    (out / "runs").mkdir()
    (out / "runs" / "events").write_text("tb")
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (out / name).write_text("old shard")
    (out / "model.safetensors.index.json").write_text("{}")
    (out / "config.json").write_text('{"old": true}')


def test_final_save_publishes_markers_last_and_keeps_checkpoints(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _previous_run(out)
    tmp = _final_tmp(out, NEW)
    moves: list[tuple[str, str]] = []
    real = os.replace
    monkeypatch.setattr(
        run.os,
        "replace",
        lambda a, b: moves.append((Path(a).name, Path(b).parent.name)) or real(a, b),
    )
    run.publish_final(tmp, out)
    old = temp_name(out / run.FINAL_NAME, "old").name
    assert moves == [  # old marker and weights aside first; new weights, then the marker last
        ("config.json", old),
        ("model-00001-of-00002.safetensors", old),
        ("model-00002-of-00002.safetensors", old),
        ("model.safetensors.index.json", old),
        ("generation_config.json", "out"),
        ("newtune_config.yml", "out"),
        ("stats.json", "out"),
        ("tokenizer.json", "out"),
        ("model.safetensors", "out"),
        ("config.json", "out"),
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted([*NEW, "checkpoint-2", "runs"])
    assert (out / "checkpoint-2" / "model.safetensors").read_text() == "checkpoint"
    assert (out / "runs" / "events").read_text() == "tb"
    assert (out / "model.safetensors").read_text() == "new weights"


def test_a_final_save_killed_midway_does_not_look_like_a_model(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _previous_run(out)
    tmp = _final_tmp(out, NEW)
    real = os.replace

    def killed_at_weights(a, b):
        if Path(a).name == "model.safetensors" and Path(b).parent == out:
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(run.os, "replace", killed_at_weights)
    with pytest.raises(KeyboardInterrupt):
        run.publish_final(tmp, out)
    assert not (out / "config.json").exists()  # neither the old model nor half of the new one
    assert not list(out.glob("*.safetensors*"))
    assert (out / "checkpoint-2" / "model.safetensors").read_text() == "checkpoint"


# -- 7. stale temp folders of dead processes are removed by train and evaluate --------------


def test_evaluate_removes_temp_folders_of_dead_processes(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(tmp_path, model_dir, data, "chat_template")
    out = tmp_path / "out"
    out.mkdir()
    stale = _stale(out, "final")
    live = temp_name(out / "final")  # this (live) test process's: must stay
    live.mkdir()
    proc = cli("-m", "newtune.cli.main", "evaluate", str(cfg), "--split=nope")
    assert proc.returncode == 2
    assert "the prepared data has no `nope` split" in _error(proc)
    assert f"removed {stale}" in " ".join(proc.stderr.split())
    assert _hidden(out) == [live.name]
