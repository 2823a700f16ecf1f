"""Broken data files, blank rows, killed and interrupted preprocess runs, and hidden state."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import write_jsonl

ALPACA = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(12)]
BLANK = [
    {"instruction": "", "input": "", "output": ""},
    {"instruction": None, "input": None, "output": None},
    {"instruction": "  ", "input": "\n", "output": None},
]
# Run the CLI in a child with fewer rows per worker process, so a small file uses two workers.
WORKERS_CLI = (
    "import sys; import newtune.data.prepare as p; p.ROWS_PER_PROCESS = {rows}; "
    "from newtune.cli.main import main; sys.argv = ['newtune', *sys.argv[1:]]; main()"
)


def make_config(tmp_path: Path, base: Path, data: Path, kind: str = "alpaca", **extra) -> Path:
    cfg = {
        "base_model": str(base),
        "datasets": [{"path": str(data), "type": kind}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        **extra,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def preprocess(cfg: Path, *, rows_per_process: int | None = None) -> subprocess.CompletedProcess:
    if rows_per_process is None:
        args = ["-m", "newtune.cli.main", "preprocess", str(cfg)]
    else:
        args = ["-c", WORKERS_CLI.format(rows=rows_per_process), "preprocess", str(cfg)]
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env(), timeout=300
    )


def entries(folder: Path) -> list[str]:
    """What a run left in the prepared-data folder, lock files aside."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def error_of(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    return " ".join(proc.stderr[proc.stderr.index("newtune: error:") :].split())


# -- broken files -------------------------------------------------------------------------


BAD_BYTES = {  # extension -> (type, file bytes with a Latin-1 byte on line 3)
    "jsonl": (
        "alpaca",
        b'{"instruction": "a", "input": "", "output": "b"}\n' * 2
        + b'{"instruction": "caf\xe9", "input": "", "output": "b"}\n',
    ),
    "json": (
        "alpaca",
        b'[\n{"instruction": "a", "input": "", "output": "b"},\n'
        b'{"instruction": "caf\xe9", "input": "", "output": "b"}\n]\n',
    ),
    "csv": ("alpaca", b"instruction,input,output\na,,b\ncaf\xe9,,b\n"),
    "txt": ("completion", b"first line\nsecond line\ncaf\xe9 au lait\n"),
}


@pytest.mark.parametrize("ext", sorted(BAD_BYTES))
def test_non_utf8_data_file_names_the_file_and_line(tmp_path, tok_dir, ext):
    kind, raw = BAD_BYTES[ext]
    data = tmp_path / f"latin1.{ext}"
    data.write_bytes(raw)
    proc = preprocess(make_config(tmp_path, tok_dir, data, kind))
    err = error_of(proc)
    assert f"{data} is not UTF-8 text: line 3" in err
    assert "holds the byte 0xe9" in err and "Re-encode the file as UTF-8" in err
    assert entries(tmp_path / "prepared") == []


@pytest.mark.parametrize("content", [b"", b"  \n\n\t\n"], ids=["0 bytes", "whitespace"])
@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "txt"])
def test_empty_data_file_is_named(tmp_path, tok_dir, ext, content):
    data = tmp_path / f"empty.{ext}"
    data.write_bytes(content)
    proc = preprocess(
        make_config(tmp_path, tok_dir, data, "completion" if ext == "txt" else "alpaca")
    )
    err = error_of(proc)
    what = "0 bytes" if not content else f"only whitespace, {len(content)} bytes"
    assert f"{data} is empty ({what}): it holds no rows." in err
    assert entries(tmp_path / "prepared") == []


# -- blank rows ---------------------------------------------------------------------------


def test_rows_with_every_field_empty_are_dropped_counted_and_warned(tmp_path, tok_dir):
    rows = ALPACA[:4] + BLANK + ALPACA[4:]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    proc = preprocess(make_config(tmp_path, tok_dir, data))
    assert proc.returncode == 0, proc.stderr
    assert f"datasets[0] ({data}): 3 row(s) have every field empty; they were dropped" in (
        proc.stderr
    )
    folder = Path(proc.stdout.strip())
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["dropped_empty"] == 3 and stats["datasets"][0]["dropped_empty"] == 3
    assert stats["rows"] == {"train": 12} and stats["datasets"][0]["rows"] == 12
    assert re.search(r"^dropped_empty +3$", proc.stderr, re.MULTILINE)  # the report table


def test_blank_rows_are_counted_and_rows_named_across_worker_processes(
    tmp_path, tokenizer, monkeypatch
):
    from newtune.config.schema import NewtuneConfig
    from newtune.data import prepare as prep
    from newtune.errors import DataError

    monkeypatch.setattr(prep, "ROWS_PER_PROCESS", 5)
    rows = ALPACA + BLANK[:2] + ALPACA + BLANK[2:]  # blanks in both halves
    data = write_jsonl(tmp_path / "d.jsonl", rows)

    def cfg() -> NewtuneConfig:
        return NewtuneConfig(
            base_model="unused",
            datasets=[{"path": str(data), "type": "alpaca"}],
            dataset_prepared_path=str(tmp_path / "prepared"),
            dataset_processes=2,
        )

    prepared = prep.prepare(cfg(), tokenizer, None)
    assert prepared.stats["dropped_empty"] == 3 and len(prepared.data["train"]) == 24
    rows[20] = {"instruction": "x", "input": "", "output": None}  # in the second worker's half
    write_jsonl(data, rows)
    with pytest.raises(DataError, match=r"datasets\[0\] \(.*d.jsonl\) row 20: column `output`"):
        prep.prepare(cfg(), tokenizer, None)
    assert entries(tmp_path / "prepared") == [prepared.path.name]


# -- killed and interrupted runs ----------------------------------------------------------


def _start_with_workers(tmp_path: Path, tok_dir: Path) -> tuple[subprocess.Popen, list]:
    """A preprocess whose two worker processes are tokenizing; returns it and the workers."""
    data = write_jsonl(tmp_path / "big.jsonl", ALPACA * 4000)  # 48k rows: seconds of work
    cfg = make_config(tmp_path, tok_dir, data, dataset_processes=2)
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKERS_CLI.format(rows=1000), "preprocess", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        workers = parent.children()
        if len(workers) == 2:
            time.sleep(0.2)  # let them start tokenizing
            return proc, workers
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no two worker processes appeared: {proc.communicate()[1]}")


def _gone(workers: list, within: float) -> bool:
    """Whether every worker has ended (or is a zombie waiting for init) within `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = []
        for w in workers:
            try:
                if w.status() != psutil.STATUS_ZOMBIE:
                    alive.append(w)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.05)
    return False


def test_killed_preprocess_takes_its_workers_and_its_temp_folder_goes_next_run(tmp_path, tok_dir):
    proc, workers = _start_with_workers(tmp_path, tok_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert _gone(workers, within=3.0)
    prepared = tmp_path / "prepared"
    left = entries(prepared)
    assert len(left) == 1 and left[0].startswith(".tmp-") and f"-{proc.pid}@" in left[0]
    # the next run (small data, one process) removes the dead run's temp folder
    small = write_jsonl(tmp_path / "small.jsonl", ALPACA)
    again = preprocess(make_config(tmp_path, tok_dir, small))
    assert again.returncode == 0, again.stderr
    assert entries(prepared) == [Path(again.stdout.strip()).name]
    assert "left by a preprocess that was killed" in again.stderr


def test_ctrl_c_during_multiprocess_preprocess_exits_130(tmp_path, tok_dir):
    proc, workers = _start_with_workers(tmp_path, tok_dir)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "newtune: interrupted" in stderr
    assert "Traceback" not in stderr and "TimeoutError" not in stderr
    assert _gone(workers, within=3.0)
    assert entries(tmp_path / "prepared") == []  # no half cache, no temp folder


# -- hidden process-wide state ------------------------------------------------------------


@pytest.mark.parametrize("before", [None, "false", "true"])
def test_prepare_in_process_leaves_gc_and_env_as_they_were(
    tmp_path, tokenizer, monkeypatch, before
):
    from newtune.config.schema import NewtuneConfig
    from newtune.data.prepare import prepare

    if before is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", before)
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    cfg = NewtuneConfig(
        base_model="unused",
        datasets=[{"path": str(data), "type": "alpaca"}],
        dataset_prepared_path=str(tmp_path / "prepared"),
        dataset_processes=2,  # in process, with the tokenizer's threads
    )
    assert gc.isenabled()
    prepare(cfg, tokenizer, None)
    assert gc.isenabled()
    assert os.environ.get("TOKENIZERS_PARALLELISM") == before
    # and after an error while tokenizing
    write_jsonl(data, [{"instruction": "x", "input": "", "output": ["a list"]}])
    with pytest.raises(Exception, match="row 0"):
        prepare(cfg, tokenizer, None)
    assert gc.isenabled()
    assert os.environ.get("TOKENIZERS_PARALLELISM") == before


def test_gc_paused_restores_the_previous_state_on_errors():
    from newtune.data.tokenize import gc_paused

    with pytest.raises(RuntimeError), gc_paused():
        assert not gc.isenabled()
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


# -- layering -----------------------------------------------------------------------------


def test_preprocess_does_not_import_the_trainer_stack(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    cfg = make_config(tmp_path, tok_dir, data)
    code = (
        "import sys\n"
        "from newtune.cli.preprocess import preprocess_command\n"
        f"preprocess_command({str(cfg)!r})\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('transformers.trainer', "
        "'newtune.train.', 'peft', 'accelerate')))\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert (Path(proc.stdout.strip()) / "stats.json").is_file()
