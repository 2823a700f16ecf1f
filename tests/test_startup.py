"""The light commands (--help, validate, config-schema) start without torch; the device probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from newtune.cli.main import COMMANDS, load_command
from newtune.config.load import load_config
from newtune.config.resolve import resolve

HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate")


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    """A valid config whose files do not exist: validate does not read them."""
    path = tmp_path / "cfg.yml"
    path.write_text(
        "base_model: ./model\n"
        "datasets:\n"
        "  - path: d.jsonl\n"
        "    type: alpaca\n"
        "micro_batch_size: 3\n"
        "gradient_accumulation_steps: 2\n"
    )
    return path


def run_main(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`newtune ARGS` in a fresh interpreter; stderr ends with the heavy modules imported."""
    code = textwrap.dedent(
        f"""
        import sys
        from newtune.cli.main import main
        sys.argv = ["newtune", *{list(args)!r}]
        try:
            main()
        except SystemExit as exc:
            code = exc.code
        else:
            code = 0
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        print("HEAVY=" + ",".join(heavy), file=sys.stderr)
        sys.exit(code)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PAGER": "cat"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def heavy_of(proc: subprocess.CompletedProcess) -> list[str]:
    line = [x for x in proc.stderr.splitlines() if x.startswith("HEAVY=")][-1]
    return [m for m in line.removeprefix("HEAVY=").split(",") if m]


def test_validate_does_not_import_torch(cfg):
    proc = run_main("validate", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert heavy_of(proc) == []
    assert proc.stdout.startswith(f"# {cfg}: valid (keys left null are not shown)\n")
    assert "micro_batch_size: 3\n" in proc.stdout and "effective_batch_size: 6\n" in proc.stdout


def test_help_does_not_import_torch():
    proc = run_main("--help")
    assert proc.returncode == 0, proc.stderr
    assert heavy_of(proc) == []
    help_text = proc.stdout + proc.stderr
    for name in (
        "preprocess",
        "train",
        "inference",
        "merge-lora",
        "vllm-serve",
        "validate",
        "config-schema",
    ):
        assert name in help_text


def test_validate_json_is_one_object(cfg):
    proc = run_main("validate", str(cfg), "--json", "--learning_rate=0.5")
    assert proc.returncode == 0, proc.stderr
    assert heavy_of(proc) == []
    report = json.loads(proc.stdout)  # nothing but the object on stdout
    assert set(report) == {"config", "plan"}
    assert report["plan"]["effective_batch_size"] == 6
    assert report["config"]["learning_rate"] == 0.5  # an override; `json` itself is not one
    assert "json" not in report["config"]


def test_validate_json_rejects_a_value(cfg):
    proc = run_main("validate", str(cfg), "--json=yes")
    assert proc.returncode == 2 and "--json is a flag" in proc.stderr


@pytest.mark.parametrize("spelling", ["config-schema", "config_schema"])
def test_config_schema(spelling):
    proc = run_main(spelling)
    assert proc.returncode == 0, proc.stderr
    assert heavy_of(proc) == []
    schema = json.loads(proc.stdout)
    assert "base_model" in schema["properties"] and "datasets" in schema["properties"]


def test_config_schema_via_python_m():
    proc = subprocess.run(
        [sys.executable, "-m", "newtune.cli.config_schema"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "base_model" in json.loads(proc.stdout)["properties"]


def test_dispatch_imports_only_the_chosen_command(cfg):
    proc = run_main("merge_lora", str(cfg))  # fails on the missing adapter, before torch
    assert proc.returncode == 2 and "`output_dir: ./outputs` does not exist" in proc.stderr
    assert heavy_of(proc) == []
    proc = run_main("train", "--help")  # fire exits 2 here, as it did before lazy dispatch
    assert "newtune train CONFIG <flags>" in proc.stdout + proc.stderr
    assert "--debug" in proc.stdout + proc.stderr and heavy_of(proc) == []


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_summary_is_the_commands_docstring(name):
    """`newtune --help` lists summaries from main.py; they must match the commands' docs."""
    doc = load_command(name).__doc__ or ""
    assert COMMANDS[name][2] == doc.strip().splitlines()[0]


@pytest.mark.parametrize(
    ("probe", "dtype", "mixed"),
    [
        (("cuda", True), "bfloat16", "bf16"),
        (("cuda", False), "float32", "no"),
        (("cpu", False), "float32", "no"),
        (("cpu", True), "float32", "no"),  # bf16 auto needs cuda whatever the probe says
        (("mps", False), "float32", "no"),
    ],
)
def test_bf16_auto_follows_the_probe(cfg, probe, dtype, mixed):
    config = load_config(str(cfg), {"bf16": "auto"}).config
    plan = resolve(config, env={}, probe=lambda: probe)
    assert (plan.device, plan.dtype, plan.mixed_precision) == (probe[0], dtype, mixed)


def test_explicit_precision_ignores_the_probe(cfg):
    config = load_config(str(cfg), {"bf16": False, "fp16": True}).config
    plan = resolve(config, env={"WORLD_SIZE": "2"}, probe=lambda: ("cuda", True))
    assert (plan.dtype, plan.mixed_precision, plan.effective_batch_size) == ("float16", "fp16", 12)
