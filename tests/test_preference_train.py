"""Preference and reward training end to end on the tiny model: `newtune train` for each method,
TRL's metric names in log_history, the step-0 invariants, packed == padded, precomputed
reference == live reference, `newtune evaluate`, reward models in plain transformers, and the
methods' errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file

from newtune.cli.train import train_command

PAIRS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Brintmoor."},
    {"prompt": "Name a color.", "chosen": " Blue", "rejected": " red, green and the lazy dog."},
    {"prompt": "What is the answer?", "chosen": " 0123456789", "rejected": " I am fine."},
    {"prompt": "Translate to French.", "chosen": " Hello there!", "rejected": " Blue."},
    {"prompt": "Hello there!", "chosen": " How are you?", "rejected": " No."},
    {"prompt": "Say yes.", "chosen": " Yes.", "rejected": " The quick brown fox."},
]
UNPAIRED = [
    {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
    for p in PAIRS
    for side in ("chosen", "rejected")
]
DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
LORA = {
    "adapter": "lora",
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
}


def make_config(tmp_path: Path, model_dir: Path, rows: list[dict], kind: str, **extra) -> Path:
    """A config training `kind` rows on the tiny model (LoRA unless `adapter` is overridden)."""
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": kind}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "seed": 7,
        **LORA,
        **extra,
    }
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def history(out: Path) -> list[dict]:
    """The training log entries (those with a loss) of a finished run."""
    return [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


METHODS = {
    "dpo": ({"rl": "dpo"}, "preference", DPO_METRICS),
    "ipo": ({"rl": "ipo"}, "preference", DPO_METRICS),
    "simpo": ({"rl": "simpo"}, "preference", (*DPO_METRICS, "nll_loss")),
    "orpo": ({"rl": "orpo"}, "preference", (*DPO_METRICS, "nll_loss", "log_odds_ratio")),
    "kto": ({"rl": "kto"}, "unpaired_preference", ("kl", "rewards/chosen", "logps/rejected")),
    "reward": ({"reward_model": True}, "preference", ("accuracy", "margin", "mean_reward")),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_train_each_method_writes_adapter_and_metrics(tmp_path, model_dir, name):
    keys, kind, metrics = METHODS[name]
    rows = UNPAIRED if kind == "unpaired_preference" else PAIRS
    train_command(str(make_config(tmp_path, model_dir, rows, kind, **keys)))
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    logs = history(out)
    assert [h["step"] for h in logs] == [1, 2]
    for entry in logs:
        assert math.isfinite(entry["loss"])
        for metric in metrics:
            assert metric in entry, (metric, entry)
            assert math.isfinite(entry[metric])
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == ("SEQ_CLS" if name == "reward" else "CAUSAL_LM")
