"""`use_ray: true`: `newtune train` runs its ranks as Ray Train workers (train.ray_launch)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import write_jsonl
from test_cli import make_config, train_on_two_cpu_ranks

from newtune.config.load import load_config
from newtune.errors import ConfigError
from newtune.train import ray_launch

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="needs `pip install 'newtune[ray]'`"
)
ROWS = [  # 12 distinct rows: 3 optimizer steps per epoch on 2 ranks x micro_batch_size 2
    {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}."}
    for a in range(3)
    for b in range(4)
]
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


def _cfg(tmp_path: Path, model_dir: Path, **keys: Any) -> Path:
    data = write_jsonl(tmp_path / "a.jsonl", ROWS)
    keys = {"adapter": "lora", "lora_r": 2, "lora_target_linear": True, "max_steps": 2, **keys}
    return make_config(tmp_path, model_dir, data, "alpaca", **keys)


def _run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **RAY_ENV, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=600,
        cwd=cwd,
    )


def _config(**keys: Any) -> Any:
    base = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
    return load_config_dict({**base, **keys})


def load_config_dict(data: dict[str, Any]) -> Any:
    from newtune.config.given import load_given

    return load_given(data).config


# -- validate ------------------------------------------------------------------------------


def test_axolotl_ray_keys_validate_with_the_rest_of_its_example(tmp_path):
    keys = {  # the Ray-specific keys of Axolotl's examples/llama-3/lora-1b-ray.yml
        "use_ray": True,
        "ray_num_workers": 4,
        "resources_per_worker": {"GPU": 1, "CPU": 4},
        "ray_run_name": "llama",
        "deepspeed": "deepspeed_configs/zero3.json",
        "bf16": "auto",
        "adapter": "lora",
    }
    cfg = _config(**keys)
    assert (cfg.use_ray, cfg.ray_num_workers, cfg.ray_run_name) == (True, 4, "llama")
    assert cfg.resources_per_worker == {"GPU": 1.0, "CPU": 4.0}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"ray_num_workers": 2}, "`ray_num_workers` is set but `use_ray` is not true"),
        ({"use_ray": False, "resources_per_worker": {"GPU": 1}}, "`resources_per_worker` is set"),
        ({"use_ray": True, "resources_per_worker": {"CPU": -1}}, "`resources_per_worker.CPU: -1`"),
        ({"use_ray": True, "ray_num_workers": 2, "ddp": False}, "`ddp: false` with"),
        ({"use_ray": True, "ray_num_workers": 0}, "ray_num_workers"),
    ],
)
def test_validate_refuses_ray_keys_that_cannot_run(tmp_path, keys, message):
    path = tmp_path / "cfg.yml"
    base = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
    path.write_text(yaml.safe_dump({**base, **keys}))
    proc = _run("validate", str(path))
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


# -- the ScalingConfig -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "cluster_gpus", "want"),
    [
        ({}, 0, {"num_workers": 1, "use_gpu": False, "resources_per_worker": None}),
        (
            {"ray_num_workers": 4},
            8,
            {"num_workers": 4, "use_gpu": True, "resources_per_worker": None},
        ),
        (
            {"ray_num_workers": 2, "resources_per_worker": {"GPU": 0, "CPU": 3}},
            8,
            {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 3.0}},
        ),
        (
            {"resources_per_worker": {"GPU": 1, "CPU": 2}},
            0,
            {"num_workers": 1, "use_gpu": True, "resources_per_worker": {"GPU": 1.0, "CPU": 2.0}},
        ),
    ],
)
def test_scaling_kwargs_follow_the_keys_and_the_cluster(keys, cluster_gpus, want):
    cfg = _config(use_ray=True, **keys)
    assert ray_launch.scaling_kwargs(cfg, cluster_gpus) == want


class _FakeRay:
    """`ray` as train_with_ray sees it: a cluster with these resources, started on `init`."""

    def __init__(self, resources: dict[str, float]) -> None:
        self.resources, self.up, self.inits = resources, False, []

    def is_initialized(self) -> bool:
        return self.up

    def init(self, **kwargs: Any) -> None:
        self.up = True
        self.inits.append(kwargs)

    def shutdown(self) -> None:
        self.up = False

    def cluster_resources(self) -> dict[str, float]:
        return self.resources


@needs_ray
def test_the_keys_reach_ray_trains_scaling_and_run_config(tmp_path, monkeypatch):
    from ray.train import RunConfig, ScalingConfig

    seen: dict[str, Any] = {}

    class Trainer:
        def __init__(self, loop, train_loop_config, scaling_config, run_config) -> None:
            seen.update(loop=loop, job=train_loop_config, scaling=scaling_config, run=run_config)

        def fit(self) -> None:
            seen["fit"] = True

    fake = _FakeRay({"CPU": 16, "GPU": 4})
    monkeypatch.setattr(ray_launch, "import_ray", lambda: (fake, Trainer, ScalingConfig, RunConfig))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")  # restored after the test
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cfg.yml"
    keys = {"use_ray": True, "ray_num_workers": 3, "resources_per_worker": {"GPU": 1, "CPU": 4}}
    base = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
    extra = {"ray_run_name": "r1", "output_dir": "o", "deepspeed": "zero2"}
    path.write_text(yaml.safe_dump({**base, **keys, **extra}))
    loaded = load_config(str(path))
    assert ray_launch.train_with_ray(loaded) == tmp_path / "o"
    scaling, run = seen["scaling"], seen["run"]
    assert isinstance(scaling, ScalingConfig) and scaling.num_workers == 3 and scaling.use_gpu
    assert scaling.resources_per_worker == {"GPU": 1.0, "CPU": 4.0}
    assert (run.name, run.storage_path) == ("r1", str(tmp_path / "o"))
    assert seen["loop"] is ray_launch.worker_loop and seen["fit"]
    assert seen["job"]["cwd"] == str(tmp_path)
    assert seen["job"]["loaded"].config.deepspeed.endswith("deepspeed_configs/zero2.json")
    assert loaded.config.deepspeed == "zero2"  # the caller's config is left as it was
    # no RAY_ADDRESS: a new local cluster, started and shut down here, workers without the
    # print-to-log patch
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    assert fake.inits == [
        {"address": "local", "include_dashboard": False, "runtime_env": {"env_vars": env}}
    ]
    assert not fake.up and os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    # more than the local cluster has: refused before any worker waits for it
    fake.resources = {"CPU": 16, "GPU": 2}
    with pytest.raises(ConfigError, match="need 3 GPU in all, and the local Ray cluster has 2"):
        ray_launch.train_with_ray(loaded)
    # RAY_ADDRESS: that cluster (it may autoscale: no room check)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    ray_launch.train_with_ray(loaded)
    assert fake.inits[-1]["address"] is None


def test_a_worker_user_error_is_found_inside_rays_wrapping():
    inner = ConfigError("the paragraph")

    class WorkerGroupError(Exception):
        def __init__(self) -> None:
            super().__init__("Training failed due to worker errors")
            self.worker_failures = {0: RuntimeError("wrapped"), 1: RuntimeError("other")}
            self.worker_failures[0].cause = inner  # type: ignore[attr-defined]

    assert ray_launch.user_error(WorkerGroupError()) is inner
    assert ray_launch.user_error(RuntimeError("no user error")) is None


# -- train: refusals -------------------------------------------------------------------------


def test_train_without_ray_installed_says_what_to_install(tmp_path, model_dir):
    shadow = tmp_path / "shadow" / "ray"  # an empty `ray` package: no ray.train here
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    cfg = _cfg(tmp_path, model_dir, use_ray=True, ray_num_workers=2)
    env = {"PYTHONPATH": str(tmp_path / "shadow")}
    checked = _run("validate", str(cfg), env=env)  # another machine may train it: a warning
    assert checked.returncode == 0 and "Traceback" not in checked.stderr
    assert "`use_ray: true` needs Ray Train (ray[train]), which is not installed here" in (
        checked.stderr + checked.stdout
    )
    proc = _run("train", str(cfg), env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Ray Train, which is not installed here" in proc.stderr
    assert "pip install 'newtune[ray]'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_use_ray_is_refused_under_a_launcher(tmp_path, model_dir):
    cfg = _cfg(tmp_path, model_dir, use_ray=True)
    proc = _run("train", str(cfg), env={"WORLD_SIZE": "2", "RANK": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already rank 1 of 2 under accelerate launch/torchrun" in proc.stderr
    proc = _run("train", str(cfg), "--launcher", "accelerate")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "`--launcher accelerate` and `use_ray: true` both start" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_check_launch_accepts_one_plain_process():
    ray_launch.check_launch({"WORLD_SIZE": "1"})
    ray_launch.check_launch({})
    with pytest.raises(ConfigError, match="rank 0 of 4"):
        ray_launch.check_launch({"WORLD_SIZE": "4", "RANK": "0"})


# -- train on two Ray workers ----------------------------------------------------------------


def _losses(out: Path) -> list[float]:
    history = json.loads((out / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


def _ray_workers(stderr: str) -> set[str]:
    """The pids of the Ray Train workers whose output the driver printed."""
    return set(re.findall(r"\(RayTrainWorker pid=(\d+)", stderr))


@pytest.mark.slow
@needs_ray
def test_two_ray_workers_train_as_two_accelerate_ranks(tmp_path, model_dir):
    (tmp_path / "ray").mkdir()
    cfg = _cfg(tmp_path / "ray", model_dir, use_ray=True, ray_num_workers=2, ray_run_name="r")
    proc = _run("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(_ray_workers(proc.stderr)) == 2, proc.stderr[-4000:]
    assert "[newtune] training done; outputs in" in proc.stderr
    assert "LOAD_CONST" not in proc.stderr  # no print-to-log patch (dill's captured `dis`)
    out = tmp_path / "ray" / "out"
    card = (out / "README.md").read_text()
    assert "| world_size | 2 |" in card, card  # the model card's hyperparameters
    assert len(_losses(out)) == 2
    assert sorted(p.name for p in out.glob("adapter_model*")) == ["adapter_model.safetensors"]
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp", ".old"))]
    assert (out / "r").is_dir()  # Ray's own run state, under output_dir/ray_run_name

    (tmp_path / "acc").mkdir()
    ref = _cfg(tmp_path / "acc", model_dir)
    proc = train_on_two_cpu_ranks(ref)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _losses(out) == pytest.approx(_losses(tmp_path / "acc" / "out"), rel=1e-4)


@pytest.mark.slow
@needs_ray
def test_a_workers_user_error_is_one_paragraph_from_the_driver(tmp_path, model_dir):
    # flash_attention_2 needs CUDA: validate only warns, each worker's check_machine refuses
    cfg = _cfg(tmp_path, model_dir, use_ray=True, attn_implementation="flash_attention_2")
    proc = _run("train", str(cfg))
    assert proc.returncode == 2, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("newtune: error: ") and "flash_attention_2" in last, last
    assert "Traceback" not in last
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_the_python_api_trains_a_use_ray_config_through_ray(monkeypatch, tmp_path):
    import newtune.api

    seen: list[Any] = []
    monkeypatch.setattr(ray_launch, "train_with_ray", lambda loaded: seen.append(loaded) or "o")
    data = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
    assert newtune.api.train({**data, "use_ray": True, "ray_num_workers": 2}) == "o"
    assert seen[0].config.ray_num_workers == 2
