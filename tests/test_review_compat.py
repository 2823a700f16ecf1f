"""Review of the Axolotl keys of part 4: regressions of the bugs found (eta_min floors,
process-wide state a failed run left behind)."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_trust_config import cli, error_line

from newtune.config.load import load_config
from newtune.errors import DataError
from newtune.train import run
from newtune.train.args import build_training_args, schedule_for
from newtune.train.callbacks import build_callbacks
from newtune.train.compat4 import OtelMetricsCallback, compile_flex_attention_with
from newtune.train.schedules import build_scheduler

OTEL_EXPORTER = "opentelemetry.exporter.prometheus"


def write(tmp_path: Path, **keys: Any) -> str:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = {
        "base_model": "m",
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "output_dir": str(tmp_path / "out"),
        "dataset_prepared_path": str(tmp_path / "prepared"),
        **keys,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def test_eta_min_is_the_floor_of_the_constant_tail(tmp_path):
    """cosine_constant_lr_ratio asked for cosine_min_lr_ratio, which eta_min refuses: no
    config could use eta_min with the constant tail, although newtune's cosine takes it."""
    keys = {"lr_scheduler": "cosine", "learning_rate": 1e-4, "eta_min": 1e-5}
    path = write(tmp_path, **keys, cosine_constant_lr_ratio=0.5)
    proc = cli("validate", path)
    assert proc.returncode == 0, proc.stderr
    config = load_config(path).config
    schedule = schedule_for(config)
    assert schedule is not None and schedule.constant_lr_ratio == 0.5
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = build_scheduler(schedule, optimizer, 10, 0, 1e-4)
    lrs = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs[4:] == pytest.approx([1e-5] * 6)  # the floor from step 5 (half of 10) on
    assert lrs[0] > 1e-5


@pytest.mark.parametrize("floor", [{"min_lr_rate": 0.1}, {"min_lr": 1e-6}])
def test_eta_min_with_a_floor_in_lr_scheduler_kwargs_is_refused_at_validate(tmp_path, floor):
    """validate accepted it; transformers' cosine_with_min_lr then refused both at train."""
    keys = {"lr_scheduler": "cosine", "learning_rate": 1e-4, "eta_min": 1e-5}
    proc = cli("validate", write(tmp_path, **keys, lr_scheduler_kwargs=floor))
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    assert (
        f"`eta_min` and `lr_scheduler_kwargs` {sorted(floor)} both set the cosine floor "
        "(transformers refuses two); keep one"
    ) in error_line(proc)


def test_eta_min_alone_still_reaches_transformers_scheduler(tmp_path):
    path = write(tmp_path, lr_scheduler="cosine", learning_rate=1e-4, eta_min=1e-5)
    config = load_config(path).config
    from newtune.config.resolve import resolve

    args = build_training_args(config, resolve(config), False, 10)
    assert args.lr_scheduler_type == "cosine_with_min_lr"
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-5}


def _fake_otel(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
    """The exporter and prometheus_client as recording stand-ins (they are not installed)."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    class Server:
        def shutdown(self) -> None:
            events.append("shutdown")

        def server_close(self) -> None:
            events.append("closed")

    def start_http_server(port: int, addr: str) -> Any:
        events.append(f"listen {addr}:{port}")
        return Server(), types.SimpleNamespace(join=lambda timeout: None)

    exporter = types.ModuleType(OTEL_EXPORTER)
    exporter.__spec__ = importlib.machinery.ModuleSpec(OTEL_EXPORTER, None)
    exporter.PrometheusMetricReader = InMemoryMetricReader  # type: ignore[attr-defined]
    client = types.ModuleType("prometheus_client")
    client.__spec__ = importlib.machinery.ModuleSpec("prometheus_client", None)
    client.start_http_server = start_http_server  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, OTEL_EXPORTER, exporter)
    monkeypatch.setitem(sys.modules, "prometheus_client", client)


def test_a_failed_run_puts_back_the_flex_wrapper_and_stops_the_otel_endpoint(
    tmp_path, monkeypatch, model_dir
):
    """A run that fails mid-training (on_train_end never comes) left transformers'
    WrappedFlexAttention patched with its compile kwargs and the metrics endpoint listening,
    so the next run in the process (the Python API, a notebook) could not listen again."""
    pytest.importorskip("opentelemetry.sdk.metrics")
    from transformers.integrations import flex_attention as transformers_flex

    original = transformers_flex.WrappedFlexAttention
    events: list[str] = []
    _fake_otel(monkeypatch, events)
    path = write(
        tmp_path,
        base_model=str(model_dir),
        attn_implementation="flex_attention",
        flex_attn_compile_kwargs={"dynamic": False},
        use_otel_metrics=True,
        otel_metrics_port=9321,
    )
    loaded = load_config(path)

    def failing(loaded: Any, plan: Any, checkpoint: Any, method: Any) -> Path:
        """What _train does up to the first step, then a failure inside trainer.train()."""
        compile_flex_attention_with(loaded.config.flex_attn_compile_kwargs)
        (callback,) = [
            c for c in build_callbacks(loaded.config) if isinstance(c, OtelMetricsCallback)
        ]
        callback.on_train_begin(None, types.SimpleNamespace(is_world_process_zero=True), None)
        assert transformers_flex.WrappedFlexAttention is not original
        raise DataError("row 3 is broken")

    monkeypatch.setattr(run, "_train", failing)
    monkeypatch.setattr(run, "check_machine", lambda config, device: None)  # flex needs CUDA
    try:
        with pytest.raises(DataError, match="row 3 is broken"):
            run.train(loaded)
        assert transformers_flex.WrappedFlexAttention is original
        assert events == ["listen localhost:9321", "shutdown", "closed"]
    finally:
        transformers_flex.WrappedFlexAttention = original
