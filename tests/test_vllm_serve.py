"""`newtune vllm-serve cfg.yml`: the vLLM server of an online RL config (Axolotl's
`axolotl vllm-serve`), started as TRL's `trl vllm-serve` with the config's `vllm:` block."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from test_ebft_structured import TRL, _config

from newtune.cli.vllm_serve import server_argv
from newtune.config.load import validate_data

QWEN_9B = {  # the server keys of Axolotl's ebft/qwen35-9b-ebft-structured.yaml
    "trl": {**TRL, "use_vllm": True, "vllm_server_timeout": 300},
    "vllm": {
        "gpu_memory_utilization": 0.7,
        "max_model_len": 2048,
        "serve_module": "axolotl.scripts.vllm_serve_lora",
        "enforce_eager": True,
    },
}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def write(tmp_path: Path, extra: dict) -> Path:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(_config(extra), sort_keys=False))
    return path


def test_the_vllm_block_becomes_trls_server_command_line() -> None:
    cfg = validate_data(_config(QWEN_9B), "cfg.yml", None).config
    assert server_argv(cfg) == [
        sys.executable,
        "-m",
        "trl.scripts.vllm_serve",  # Axolotl's LoRA server script: TRL's syncs merged weights
        "--model",
        "org/model",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--gpu_memory_utilization",
        "0.7",
        "--max_model_len",
        "2048",
        "--enforce_eager",
        "true",
    ]


def test_host_and_port_follow_the_trainers_target_and_the_block(tmp_path: Path) -> None:
    trl = {**TRL, "use_vllm": True, "vllm_server_host": "10.0.0.5", "vllm_server_port": 8100}
    cfg = validate_data(_config({"trl": trl}), "cfg.yml", None).config
    argv = server_argv(cfg)
    assert argv[argv.index("--host") + 1 :][:3] == ["10.0.0.5", "--port", "8100"]
    block = {"host": "0.0.0.0", "port": 8100, "tensor_parallel_size": 2, "dtype": "bfloat16"}
    cfg = validate_data(_config({"trl": trl, "vllm": block}), "cfg.yml", None).config
    line = shlex.join(server_argv(cfg))
    assert "--host 0.0.0.0 --port 8100 --tensor_parallel_size 2 --dtype bfloat16" in line


def test_cli_dry_run_prints_the_command_line(tmp_path: Path) -> None:
    proc = run("vllm-serve", str(write(tmp_path, QWEN_9B)), "--dry_run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == shlex.join(
        server_argv(validate_data(_config(QWEN_9B), "cfg.yml", None).config)
    )


def test_without_vllm_the_command_says_what_to_install(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:  # a GPU machine with vLLM would serve
        return
    proc = run("vllm-serve", str(write(tmp_path, QWEN_9B)), cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert "needs the `vllm` package and a CUDA GPU" in err
    assert "-m trl.scripts.vllm_serve --model org/model --host 0.0.0.0 --port 8000" in err


def test_a_config_without_a_server_is_refused(tmp_path: Path) -> None:
    proc = run("vllm-serve", str(write(tmp_path, {"trl": TRL})), "--dry_run", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "`trl.use_vllm: false`); set `rl: grpo`, `gdpo` or `ebft` with" in " ".join(
        proc.stderr.split()
    )


def test_server_and_trainer_ports_must_agree() -> None:
    import pytest

    from newtune.errors import ConfigError

    extra = {
        "trl": {**TRL, "use_vllm": True, "vllm_server_port": 8000},
        "vllm": {"port": 8100},
    }
    with pytest.raises(ConfigError, match=r"`vllm.port: 8100` .* `trl.vllm_server_port: 8000`"):
        validate_data(_config(extra), "cfg.yml", None)
