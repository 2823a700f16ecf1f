"""Regression tests for bugs found while integrating issue 16's last keys."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import write_jsonl
from test_cli import ALPACA, make_config


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("wandb") is None, reason="wandb is not installed"
)
def test_wandb_without_credentials_is_one_paragraph_and_leaves_no_output(tmp_path, model_dir):
    """Before: `unexpected UsageError: No API key configured` after data and model were loaded,
    and an empty output_dir left behind."""
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    cfg = make_config(tmp_path, model_dir, data, "alpaca", max_steps=1, wandb_project="ebft")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("WANDB_") and k not in ("NETRC", "HOME")
    }
    env.update(
        HOME=str(tmp_path / "home"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandbcfg"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", "train", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "`wandb_project: ebft` reports to Weights & Biases, which could not log in" in err
    assert "or set `wandb_mode: offline`" in err
    assert not (tmp_path / "out").exists()


def test_relora_with_strided_ebft_is_refused():
    """ReLoRA merges the adapter into the base that strided EBFT's feature network reads."""
    from test_ebft_structured import EBFT, _config

    from newtune.config.load import validate_data
    from newtune.errors import ConfigError

    strided = {"ebft": {**EBFT, "mode": "strided"}, "relora": True, "jagged_restart_steps": 2}
    with pytest.raises(ConfigError, match=r"`relora: true` with `rl: ebft` \(strided\)"):
        validate_data(_config(strided), "cfg.yml", None)
    del strided["relora"], strided["jagged_restart_steps"]
    assert validate_data(_config(strided), "cfg.yml", None).config.ebft.mode == "strided"


def test_online_rl_needs_trl_on_the_training_machine():
    """TRL's GRPOTrainer runs rl: grpo/gdpo/ebft (structured): validate names the `trl` extra
    (newtune's `trl` was only a test dependency before); strided EBFT does not need it."""
    from test_ebft_structured import EBFT, TRL, _config

    from newtune.config.load import validate_data
    from newtune.config.machine import machine_needs

    structured = validate_data(_config({"trl": TRL}), "cfg.yml", None).config
    needs = [n for n in machine_needs(structured) if n.module == "trl"]
    assert [(n.what, n.pip) for n in needs] == [("`rl: ebft`", ("pip install 'newtune[trl]'",))]
    strided = validate_data(_config({"ebft": {**EBFT, "mode": "strided"}}), "cfg.yml", None)
    assert not [n for n in machine_needs(strided.config) if n.module == "trl"]


HIDE_BITSANDBYTES = """
import importlib.util, sys
real = importlib.util.find_spec
def find_spec(name, package=None):
    if name.split(".")[0] == "bitsandbytes":
        return None
    return real(name, package)
importlib.util.find_spec = find_spec
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "bitsandbytes":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from newtune.cli.main import main
sys.argv = ["newtune", "train", sys.argv[1]]
main()
"""


def test_lora_trains_without_bitsandbytes_installed(tmp_path, model_dir):
    """The quickstart installs `pip install -e .` (no bitsandbytes): LoRA training imported
    bitsandbytes unconditionally (models.moe.quantized_experts) and stopped with
    `unexpected ModuleNotFoundError`."""
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    cfg = make_config(
        tmp_path, model_dir, data, "alpaca", max_steps=1, adapter="lora", lora_target_linear=True
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", HIDE_BITSANDBYTES, str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bitsandbytes" not in proc.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
