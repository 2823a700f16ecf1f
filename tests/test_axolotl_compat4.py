"""Axolotl keys of issue 16, part 4: eta_min, flex_attn_compile_kwargs, unfrozen_parameters
under an adapter, and the legacy flash_* keys refused with Axolotl's own reason."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import socket
import sys
import types
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_trust_config import cli, error_line
from transformers import AutoTokenizer, LlamaForCausalLM, get_scheduler

from newtune.config.compat4 import dead_under_adapter, literal_prefix
from newtune.config.load import load_config
from newtune.config.resolve import resolve
from newtune.errors import ConfigError
from newtune.train.args import build_training_args, schedule_for
from newtune.train.callbacks import build_callbacks
from newtune.train.compat2 import apply_model_keys
from newtune.train.compat4 import OtelMetricsCallback, compile_flex_attention_with
from newtune.train.run import training_model
from newtune.train.schedules import build_scheduler

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
FLEX_KWARGS = {"dynamic": False, "mode": "max-autotune-no-cudagraphs"}  # Axolotl's examples


def write(tmp_path: Path, **keys: Any) -> str:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({**BASE, **keys}, sort_keys=False))
    return str(path)


def loaded(tmp_path: Path, **keys: Any) -> Any:
    return load_config(write(tmp_path, **keys))


def error_of(tmp_path: Path, **keys: Any) -> str:
    with pytest.raises(ConfigError) as info:
        loaded(tmp_path, **keys)
    return str(info.value)


def refused_by_cli(tmp_path: Path, **keys: Any) -> str:
    proc = cli("validate", write(tmp_path, **keys))
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    return error_line(proc)


# -- eta_min ------------------------------------------------------------------------------------


def _lrs(scheduler: Any, optimizer: Any, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out


def test_eta_min_is_the_cosine_floor_of_transformers_scheduler(tmp_path):
    # Axolotl's qat_nvfp4 examples write the numbers as strings YAML 1.1 reads as text
    cfg = loaded(tmp_path, lr_scheduler="cosine", learning_rate="5e-6", eta_min="7e-7").config
    assert cfg.eta_min == 7e-7
    args = build_training_args(cfg, resolve(cfg, env={}), True, steps_per_epoch=10)
    assert args.lr_scheduler_type == "cosine_with_min_lr"
    assert args.lr_scheduler_kwargs == {"min_lr": 7e-7}
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=5e-6)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=2,
        num_training_steps=20,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    lrs = _lrs(scheduler, optimizer, 20)
    assert max(lrs) == pytest.approx(5e-6, rel=1e-12)
    assert lrs[-1] == pytest.approx(7e-7, rel=1e-12)
    assert min(lrs[2:]) == pytest.approx(7e-7, rel=1e-12)  # the floor, never below it


def test_eta_min_floors_newtunes_own_cosine_too(tmp_path):
    cfg = loaded(tmp_path, learning_rate=1e-3, eta_min=1e-4, lr_quadratic_warmup=True).config
    schedule = schedule_for(cfg)
    assert schedule is not None and schedule.min_lr_ratio == pytest.approx(0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1e-3)
    scheduler = build_scheduler(schedule, optimizer, 20, 2, 1e-3)
    assert _lrs(scheduler, optimizer, 20)[-1] == pytest.approx(1e-4, rel=1e-9)


def test_eta_min_validates_with_a_warning_that_axolotl_ignores_it(tmp_path):
    proc = cli("validate", write(tmp_path, learning_rate=5e-6, eta_min=7e-7, output_dir="o"))
    assert proc.returncode == 0, proc.stderr
    assert (
        "warning: `eta_min: 7e-07` is read as the absolute floor of the cosine schedule "
        "(transformers' cosine_with_min_lr, min_lr): the lr decays from 5e-06 to 7e-07. Axolotl "
        "drops this key unread (its cosine decays to 0 unless cosine_min_lr_ratio is set), so "
        "the same file trains differently there"
    ) in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            {"lr_scheduler": "linear"},
            "`eta_min` is the floor of the cosine schedule, but `lr_scheduler` is linear",
        ),
        (
            {"cosine_min_lr_ratio": 0.1},
            "`eta_min` and `cosine_min_lr_ratio` both set the cosine floor",
        ),
        ({"eta_min": 1.0}, "`eta_min: 1.0` is above `learning_rate: 2e-05`"),
        (
            {"jagged_restart_steps": 10},
            "`eta_min` with `jagged_restart_steps`: the restarts anneal to `cosine_min_lr_ratio`",
        ),
    ],
)
def test_eta_min_refusals(tmp_path, keys, expected):
    assert expected in refused_by_cli(tmp_path, **{"eta_min": 1e-6, **keys})


# -- flex_attn_compile_kwargs -----------------------------------------------------------------


@pytest.fixture
def transformers_flex() -> Any:
    """transformers' flex module, with its own WrappedFlexAttention put back afterwards."""
    from transformers.integrations import flex_attention as module

    original = module.WrappedFlexAttention
    yield module
    compile_flex_attention_with(None)
    module.WrappedFlexAttention = original


def _packed_loss(model: Any, packed: bool = True) -> float:
    """Loss of two samples packed in one row (position_ids restart, no attention_mask);
    `packed=False`: the same tokens and labels as one causal sequence."""
    ids = torch.arange(3, 27).view(1, 24)
    second = torch.arange(14) if packed else torch.arange(10, 24)
    position_ids = torch.cat([torch.arange(10), second]).view(1, 24)
    labels = ids.clone()
    labels[0, 10] = -100  # the first token of the second sample predicts nothing across
    model.eval()
    with torch.no_grad():  # torch's flex attention has no backward on CPU
        return model(input_ids=ids, position_ids=position_ids, labels=labels).loss.item()


def test_flex_compile_kwargs_reach_torch_compile_and_keep_the_loss(
    tmp_path, model_dir, monkeypatch, transformers_flex
):
    cfg = loaded(
        tmp_path, attn_implementation="flex_attention", **{"flex_attn_compile_kwargs": FLEX_KWARGS}
    ).config
    assert cfg.flex_attn_compile_kwargs == FLEX_KWARGS
    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="flex_attention")

    class Uncompiled(transformers_flex.WrappedFlexAttention):  # the reference: plain flex
        _instance = None

        def __init__(self, training: bool) -> None:
            pass

        def __call__(self) -> Any:
            return transformers_flex.flex_attention

    monkeypatch.setattr(transformers_flex, "WrappedFlexAttention", Uncompiled)
    uncompiled = _packed_loss(model)
    monkeypatch.undo()

    calls: list[tuple[Any, dict[str, Any]]] = []
    real_compile = torch.compile

    def recording(fn: Any = None, **kwargs: Any) -> Any:
        calls.append((fn, kwargs))
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    apply_model_keys(model, cfg)  # the train-time path
    compiled = _packed_loss(model)
    flex_calls = [kw for fn, kw in calls if fn is transformers_flex.flex_attention]
    # one eager check of the options, then the compile transformers' wrapper uses
    assert flex_calls == [FLEX_KWARGS, FLEX_KWARGS]
    wrapper = transformers_flex.WrappedFlexAttention
    assert wrapper.compile_kwargs == FLEX_KWARGS and wrapper._instance is not None
    # measured: compiled, uncompiled and sdpa losses are bitwise equal on a 2-layer Llama;
    # 1e-6 leaves room for fp32 reorderings, 15x below what attending across samples
    # changes on this model (1.5e-5)
    assert compiled == pytest.approx(uncompiled, abs=1e-6)
    sdpa = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    assert _packed_loss(sdpa) == pytest.approx(uncompiled, abs=1e-6)  # samples kept apart
    assert abs(_packed_loss(sdpa, packed=False) - uncompiled) > 1e-5  # attending across


def test_flex_compile_kwargs_torch_refuses_are_a_config_error(transformers_flex):
    with pytest.raises(ConfigError, match=r"`flex_attn_compile_kwargs: \{'mode': 'fastest'\}`"):
        compile_flex_attention_with({"mode": "fastest"})


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            {},
            "`flex_attn_compile_kwargs` sets how flex attention is compiled, and "
            "`attn_implementation` is sdpa (the default); set `attn_implementation: "
            "flex_attention`",
        ),
        (
            {"attn_implementation": "flex_attention", "torch_compile": True},
            "`flex_attn_compile_kwargs` with `torch_compile: True`: the compiled model traces "
            "flex attention into its own graph",
        ),
        (
            {"attn_implementation": "flex_attention", "flex_attn_compile_kwargs": {"modes": 1}},
            "modes is not torch.compile arguments; use fullgraph, dynamic, backend, mode, "
            "options, disable",
        ),
    ],
)
def test_flex_compile_kwargs_refusals(tmp_path, keys, expected):
    keys = {"flex_attn_compile_kwargs": FLEX_KWARGS, **keys}
    assert expected in refused_by_cli(tmp_path, **keys)


# -- unfrozen_parameters with an adapter ------------------------------------------------------


def test_literal_prefix_and_dead_patterns():
    assert literal_prefix(r"^model\.language_model\.*") == "model.language_model"
    assert literal_prefix(r"lm_head\.weight$") == "lm_head.weight"
    assert literal_prefix(r"base_model.+lora_") == "base_model"
    assert literal_prefix(r"a|b") is None and literal_prefix(r"lm_heads?") == "lm_head"
    assert dead_under_adapter(
        ["^model.language_model.*", "^lm_head.*", "base_model.+lora_", ".+lora_B", "a|b"]
    ) == ["^model.language_model.*", "^lm_head.*"]


def test_unfrozen_patterns_no_peft_name_can_match_are_refused_as_axolotl_trains_nothing(
    tmp_path,
):
    # Axolotl's gemma3 qlora examples: their patterns never match under peft's wrapper
    err = refused_by_cli(
        tmp_path,
        adapter="qlora",
        load_in_4bit=True,
        unfrozen_parameters=["^model.language_model.*", "^lm_head.*"],
    )
    assert (
        "`unfrozen_parameters` with `adapter: qlora`: the patterns are matched (re.match, as in "
        "Axolotl) against the names of peft's wrapped model, which all start with "
        "`base_model.model.`, so '^model.language_model.*', '^lm_head.*' can never match: "
        "Axolotl then freezes every parameter, the adapter weights too, and trains nothing."
    ) in err
    err = refused_by_cli(tmp_path, adapter="lora", unfrozen_parameters=["^lm_head", ".+lora_"])
    assert "so '^lm_head' can never match: Axolotl skips them silently." in err


def _lora_model(tmp_path: Path, model_dir: Path, **keys: Any) -> Any:
    cfg = loaded(
        tmp_path,
        base_model=str(model_dir),
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        **keys,
    ).config
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return training_model(cfg, resolve(cfg, env={}), tokenizer)


def test_unfrozen_parameters_under_lora_see_peft_names_as_in_axolotl(tmp_path, model_dir):
    model = _lora_model(
        tmp_path, model_dir, unfrozen_parameters=["base_model.model.model.layers.1.+lora_"]
    )
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    trained = sorted(n for n, g in grads.items() if g)
    assert trained == [
        f"base_model.model.model.layers.1.self_attn.{proj}.lora_{ab}.default.weight"
        for proj in ("q_proj", "v_proj")
        for ab in ("A", "B")
    ]
    # layer 0's LoRA weights exist and are frozen, as is every base weight
    assert grads["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] is False
    assert grads["base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight"] is False
    assert grads["base_model.model.lm_head.weight"] is False


def test_unfrozen_base_weights_under_an_adapter_are_refused_at_train_time(tmp_path, model_dir):
    with pytest.raises(ConfigError) as info:
        _lora_model(tmp_path, model_dir, unfrozen_parameters=["base_model.model.lm_head"])
    assert (
        "`unfrozen_parameters` ['base_model.model.lm_head'] trains base weights "
        "(base_model.model.lm_head.weight) under the adapter, and peft saves only the "
        "adapter's weights, so that training would be lost"
    ) in str(info.value)


# -- legacy flash_* keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            "flash_attn_rms_norm",
            "`flash_attn_rms_norm` was removed from Axolotl (its schema raises 'no longer "
            "supported' when it is true); use `liger_rms_norm: true`",
        ),
        (
            "flash_optimum",
            "`flash_optimum` converts the model with optimum's BetterTransformer, which optimum "
            "deprecated and which does not convert transformers 5 models;",
        ),
    ],
)
def test_legacy_flash_keys_are_refused_with_axolotls_reason(tmp_path, key, expected):
    assert loaded(tmp_path, **{key: False}).config.model_dump()[key] is False
    assert expected in refused_by_cli(tmp_path, **{key: True})


# -- use_onebitllms -----------------------------------------------------------------------------


def runnable(tmp_path: Path, **keys: Any) -> str:
    """A config file whose dataset exists (for `newtune train`)."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    keys = {
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "output_dir": str(tmp_path / "out"),
        "dataset_prepared_path": str(tmp_path / "prepared"),
        **keys,
    }
    return write(tmp_path, **keys)


@pytest.mark.skipif(importlib.util.find_spec("onebitllms") is not None, reason="needs it absent")
def test_onebitllms_validates_with_a_warning_and_train_refuses_with_pip_and_cuda(tmp_path):
    cfg = runnable(tmp_path, use_onebitllms=True, bf16=True)
    proc = cli("validate", cfg)
    assert proc.returncode == 0, proc.stderr
    assert (
        "warning: `use_onebitllms: true` needs the onebitllms package, which is not installed "
        "here; the machine that trains needs it (`pip install onebitllms`)."
    ) in proc.stderr
    err = error_line(cli("train", cfg))
    assert (
        "`use_onebitllms: true` needs the onebitllms package, which is not installed; run "
        "`pip install onebitllms`, or remove `use_onebitllms` (the model's own bf16 layers train)"
    ) in err
    assert (
        "`use_onebitllms: true` needs CUDA (onebitllms' BitNet layers quantize with Triton CUDA "
        "kernels), and this machine trains on cpu"
    ) in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "prepared").exists()


class FakeBitNetLinear(torch.nn.Linear):
    """Stands in for onebitllms' BitNetLinear (same parameters, plain math)."""


def _fake_onebitllms(calls: list[Any]) -> types.ModuleType:
    """A stub `onebitllms` whose replace function behaves as the real one does to its inputs:
    linear layers but lm_head replaced in place, torch's default dtype left at bfloat16."""

    def replace(model: Any) -> Any:
        calls.append(model)
        torch.set_default_dtype(torch.bfloat16)  # what the real function does and leaves
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if name != "lm_head" and type(child) is torch.nn.Linear:
                    new = FakeBitNetLinear(child.in_features, child.out_features, bias=False)
                    new.weight.data = child.weight.data
                    setattr(parent, name, new)
        return model

    module = types.ModuleType("onebitllms")
    module.__spec__ = importlib.machinery.ModuleSpec("onebitllms", None)  # "installed"
    module.replace_linear_with_bitnet_linear = replace  # type: ignore[attr-defined]
    return module


def test_onebitllms_replaces_the_linear_layers_before_unfrozen_parameters(
    tmp_path, model_dir, monkeypatch
):
    calls: list[Any] = []
    monkeypatch.setitem(sys.modules, "onebitllms", _fake_onebitllms(calls))
    cfg = loaded(tmp_path, use_onebitllms=True, unfrozen_parameters=["model.layers.1.mlp"])
    model = LlamaForCausalLM.from_pretrained(model_dir)
    apply_model_keys(model, cfg.config)
    assert calls == [model]
    assert torch.get_default_dtype() == torch.float32  # put back after the library's change
    layer = model.model.layers[1]
    assert type(layer.mlp.gate_proj) is FakeBitNetLinear
    assert type(layer.self_attn.q_proj) is FakeBitNetLinear
    assert type(model.lm_head) is torch.nn.Linear
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained == [f"model.layers.1.mlp.{p}_proj.weight" for p in ("down", "gate", "up")]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            {"adapter": "lora"},
            "`use_onebitllms` trains the BitNet layers themselves, and onebitllms has no LoRA "
            "(Axolotl refuses `adapter: lora` with it too)",
        ),
        (
            {"load_in_8bit": True},
            "`use_onebitllms` replaces the linear layers with BitNet layers, which bitsandbytes' "
            "quantized layers cannot become",
        ),
    ],
)
def test_onebitllms_refusals(tmp_path, keys, expected):
    assert expected in refused_by_cli(tmp_path, use_onebitllms=True, **keys)


# -- use_otel_metrics ---------------------------------------------------------------------------

OTEL_EXPORTER = "opentelemetry.exporter.prometheus"


def _has_exporter() -> bool:
    try:
        return importlib.util.find_spec(OTEL_EXPORTER) is not None
    except ModuleNotFoundError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


STATE = types.SimpleNamespace(is_world_process_zero=True)


def _feed(callback: Any) -> None:
    """What the Trainer calls during two steps, one log and one evaluation."""
    callback.on_train_begin(None, STATE, None)
    callback.on_log(None, STATE, None, logs={"loss": 1.25, "learning_rate": 2e-5, "epoch": 0.5})
    callback.on_log(None, STATE, None, logs={"grad_norm": 3.0, "note": "text"})
    callback.on_step_end(None, STATE, None)
    callback.on_step_end(None, STATE, None)
    callback.on_evaluate(None, STATE, None, metrics={"eval_loss": 0.75, "epoch": 1.0})


@pytest.mark.skipif(_has_exporter(), reason="needs the exporter absent")
def test_otel_metrics_validate_with_a_warning_and_train_refuses_without_the_exporter(tmp_path):
    keys = {"use_otel_metrics": True, "otel_metrics_host": "localhost", "otel_metrics_port": 8000}
    cfg = runnable(tmp_path, **keys)
    proc = cli("validate", cfg)
    assert proc.returncode == 0, proc.stderr
    assert (
        "warning: `use_otel_metrics: true` needs OpenTelemetry's Prometheus exporter, which is "
        "not installed here; the machine that trains needs it (`pip install opentelemetry-sdk "
        "opentelemetry-exporter-prometheus`)."
    ) in proc.stderr
    err = error_line(cli("train", cfg))
    assert (
        "`use_otel_metrics: true` needs OpenTelemetry's Prometheus exporter, which is not "
        "installed; run `pip install opentelemetry-sdk opentelemetry-exporter-prometheus`, or "
        "remove `use_otel_metrics`"
    ) in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "prepared").exists()


def test_otel_host_or_port_without_use_otel_metrics_is_refused(tmp_path):
    err = refused_by_cli(tmp_path, otel_metrics_port=9000)
    assert (
        "`otel_metrics_port` sets the OpenTelemetry metrics endpoint, and `use_otel_metrics` is "
        "not true; set `use_otel_metrics: true` or remove it"
    ) in err


def test_otel_callback_records_the_trainer_metrics_in_the_sdk(tmp_path, monkeypatch):
    """The real OpenTelemetry SDK, with its in-memory reader standing in for the Prometheus
    reader and a recording stand-in for prometheus_client's HTTP server."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    readers: list[Any] = []
    servers: list[tuple[int, str]] = []

    class Reader(InMemoryMetricReader):
        def __init__(self) -> None:
            super().__init__()
            readers.append(self)

    class Server:
        def shutdown(self) -> None:
            servers.append((-1, "shutdown"))

        def server_close(self) -> None:
            pass

    def start_http_server(port: int, addr: str) -> Any:
        servers.append((port, addr))
        return Server(), types.SimpleNamespace(join=lambda timeout: None)

    exporter = types.ModuleType(OTEL_EXPORTER)
    exporter.__spec__ = importlib.machinery.ModuleSpec(OTEL_EXPORTER, None)  # "installed"
    exporter.PrometheusMetricReader = Reader  # type: ignore[attr-defined]
    client = types.ModuleType("prometheus_client")
    client.__spec__ = importlib.machinery.ModuleSpec("prometheus_client", None)
    client.start_http_server = start_http_server  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, OTEL_EXPORTER, exporter)
    monkeypatch.setitem(sys.modules, "prometheus_client", client)

    cfg = loaded(tmp_path, use_otel_metrics=True, otel_metrics_port=9123).config
    (callback,) = [c for c in build_callbacks(cfg) if isinstance(c, OtelMetricsCallback)]
    _feed(callback)
    assert servers == [(9123, "localhost")]
    data = readers[0].get_metrics_data()
    values = {
        metric.name: metric.data.data_points[0].value
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    assert values == {
        "axolotl_global_steps": 2,
        "axolotl_train_loss": 1.25,
        "axolotl_learning_rate": 2e-5,
        "axolotl_epoch": 0.5,
        "axolotl_gradient_norm": 3.0,
        "axolotl_eval_loss": 0.75,
    }
    callback.on_train_end(None, STATE, None)
    assert servers[-1] == (-1, "shutdown") and callback.provider is None


def test_otel_callback_is_silent_off_the_main_process():
    callback = OtelMetricsCallback("localhost", _free_port())
    rank1 = types.SimpleNamespace(is_world_process_zero=False)
    callback.on_train_begin(None, rank1, None)
    callback.on_log(None, rank1, None, logs={"loss": 1.0})
    callback.on_step_end(None, rank1, None)
    assert callback.provider is None and callback.server is None


@pytest.mark.skipif(not _has_exporter(), reason="needs opentelemetry-exporter-prometheus")
def test_otel_endpoint_serves_the_metrics_to_prometheus():
    port = _free_port()
    for _ in range(2):  # a second run in the same process registers again
        callback = OtelMetricsCallback("127.0.0.1", port)
        _feed(callback)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        lines = {
            line.split("{")[0]: float(line.split()[-1])
            for line in text.decode().splitlines()
            if line.startswith("axolotl_")
        }
        assert lines == {
            "axolotl_train_loss": 1.25,
            "axolotl_learning_rate": 2e-5,
            "axolotl_epoch": 0.5,
            "axolotl_gradient_norm": 3.0,
            "axolotl_global_steps_total": 2.0,
            "axolotl_eval_loss": 0.75,
        }
        busy = OtelMetricsCallback("127.0.0.1", port)
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port}"):
            busy.on_train_begin(None, STATE, None)
        callback.on_train_end(None, STATE, None)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_under_whole_model_compile_the_flex_wrapper_is_never_built(
    model_dir, monkeypatch, transformers_flex
):
    """Why `torch_compile: true` refuses flex_attn_compile_kwargs: tracing the model calls
    torch's flex_attention directly, so the wrapper that takes the kwargs never runs."""
    compile_flex_attention_with(FLEX_KWARGS)
    built: list[bool] = []
    wrapper = transformers_flex.WrappedFlexAttention
    init = wrapper.__init__
    monkeypatch.setattr(wrapper, "__init__", lambda self, t: (built.append(t), init(self, t))[1])
    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="flex_attention")
    _packed_loss(torch.compile(model, backend="eager"))
    assert built == []
    _packed_loss(model)  # uncompiled: each of the 2 layers asks the wrapper (training False)
    assert built == [False, False]
