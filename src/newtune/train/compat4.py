"""Issue 16, part 4, applied to a run: flex attention compiled with flex_attn_compile_kwargs,
unfrozen_parameters under an adapter (only adapter weights may train), onebitllms' BitNet
layers, and the OpenTelemetry metrics endpoint."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import TrainerCallback

from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError

log = logging.getLogger(__name__)
_TRANSFORMERS_WRAPPER: Any = None  # transformers' own WrappedFlexAttention, before any patch


def _flex_module() -> Any:
    from transformers.integrations import flex_attention

    return flex_attention


def compile_flex_attention_with(kwargs: dict[str, Any] | None) -> None:
    """Make transformers compile flex attention with these torch.compile kwargs (None: its own
    default). transformers builds the compiled function once per train/eval switch in the
    singleton `WrappedFlexAttention`, looked up by `compile_friendly_flex_attention` at each
    call; this swaps in a subclass whose __init__ passes `kwargs` to torch.compile."""
    global _TRANSFORMERS_WRAPPER
    module = _flex_module()
    if _TRANSFORMERS_WRAPPER is None:
        _TRANSFORMERS_WRAPPER = module.WrappedFlexAttention
    if kwargs is None:
        module.WrappedFlexAttention = _TRANSFORMERS_WRAPPER
        return
    options = dict(kwargs)
    try:  # torch.compile checks mode/options/backend when it builds the wrapper (lazily compiled)
        torch.compile(module.flex_attention, **options)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"`flex_attn_compile_kwargs: {options}`: torch.compile refused them ({exc}); fix "
            "the options (e.g. {dynamic: false, mode: max-autotune-no-cudagraphs}) or remove "
            "the key"
        ) from exc

    class WrappedFlexAttention(_TRANSFORMERS_WRAPPER):  # type: ignore[misc, valid-type]
        """transformers' singleton, compiling flex_attention with flex_attn_compile_kwargs."""

        _instance = None
        _is_flex_compiled = False
        _compiled_flex_attention = None
        compile_kwargs = options

        @torch.compiler.disable(recursive=False)
        def __init__(self, training: bool) -> None:
            """Compile on first use and when training flips, as transformers does."""
            if not self._is_flex_compiled or training != self.training:
                self.training = training
                log.info("compiling flex attention with %s", options)
                self._compiled_flex_attention = torch.compile(module.flex_attention, **options)
                self._is_flex_compiled = True

    module.WrappedFlexAttention = WrappedFlexAttention


def _adapter_name(model: Any) -> str | None:
    """The active peft adapter's name, or None when the model has no adapter."""
    if not hasattr(model, "peft_config"):
        return None
    active = getattr(model, "active_adapter", "default")
    return active if isinstance(active, str) else active[0]


def check_unfrozen_under_adapter(model: Any, trained: list[str], patterns: list[str]) -> None:
    """With an adapter, peft saves only the adapter's weights: a trained base weight would be
    lost at save, so it is refused."""
    adapter = _adapter_name(model)
    if adapter is None:
        return
    mark = f".{adapter}."
    base = [n for n in trained if mark not in n]
    if base:
        shown = ", ".join(base[:3]) + (f" and {len(base) - 3} more" if len(base) > 3 else "")
        raise ConfigError(
            f"`unfrozen_parameters` {patterns} trains base weights ({shown}) under the adapter, "
            "and peft saves only the adapter's weights, so that training would be lost; "
            "match adapter weights only (e.g. `base_model.+lora_`), train whole modules with "
            "`lora_modules_to_save`, or remove `adapter` for a partial full fine-tune"
        )


def apply_onebitllms(model: Any) -> None:
    """onebitllms' BitNetLinear in place of every linear layer but lm_head (in place). The
    library sets torch's default dtype to the model's and leaves it; it is put back here."""
    onebit = importlib.import_module("onebitllms")  # check_machine made sure it is there
    default = torch.get_default_dtype()
    try:
        onebit.replace_linear_with_bitnet_linear(model)
    finally:
        torch.set_default_dtype(default)
    log.info("use_onebitllms: linear layers replaced by onebitllms' BitNetLinear")


def apply_model_keys4(model: Any, config: NewtuneConfig, trained: list[str] | None) -> None:
    """flex_attn_compile_kwargs, and the adapter check of unfrozen_parameters."""
    if config.attn_implementation == "flex_attention":
        compile_flex_attention_with(config.flex_attn_compile_kwargs)
    if config.unfrozen_parameters and trained is not None:
        check_unfrozen_under_adapter(model, trained, config.unfrozen_parameters)


# -- use_otel_metrics ------------------------------------------------------------------------

OTEL_PREFIX = "axolotl_"  # Axolotl's metric names, so its dashboards and alerts carry over
OTEL_GAUGES = {  # log key -> metric name (without the prefix)
    "loss": "train_loss",
    "eval_loss": "eval_loss",
    "learning_rate": "learning_rate",
    "epoch": "epoch",
    "grad_norm": "gradient_norm",
}


class OtelMetricsCallback(TrainerCallback):
    """Training metrics as OpenTelemetry gauges, read by OpenTelemetry's Prometheus reader and
    served by prometheus_client's HTTP server on host:port (main process only)."""

    def __init__(self, host: str, port: int) -> None:
        """Where the endpoint will listen; nothing starts before training begins."""
        self.host, self.port = host, port
        self.provider: Any = None
        self.server: Any = None
        self.gauges: dict[str, Any] = {}
        self.steps: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Build the meter provider and start the endpoint."""
        if not state.is_world_process_zero or self.provider is not None:
            return
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import start_http_server

        self.provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
        meter = self.provider.get_meter("newtune.training")
        self.meter = meter
        self.steps = meter.create_counter(f"{OTEL_PREFIX}global_steps", unit="1")
        try:
            self.server = start_http_server(self.port, addr=self.host)
        except OSError as exc:
            self.provider.shutdown()
            self.provider = None
            raise ConfigError(
                f"`use_otel_metrics`: the metrics endpoint cannot listen on "
                f"{self.host}:{self.port} ({exc}); choose a free `otel_metrics_port` or "
                "`otel_metrics_host`"
            ) from exc
        _SERVING.add(self)
        log.info("OpenTelemetry metrics at http://%s:%s/metrics", self.host, self.port)

    def _set(self, name: str, value: float) -> None:
        if name not in self.gauges:
            self.gauges[name] = self.meter.create_gauge(f"{OTEL_PREFIX}{name}", unit="1")
        self.gauges[name].set(value)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        """Loss, eval loss, learning rate, epoch and gradient norm as gauges."""
        if self.provider is None:
            return
        for key, name in OTEL_GAUGES.items():
            value = (logs or {}).get(key)
            if isinstance(value, int | float):
                self._set(name, float(value))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """One more optimizer step."""
        if self.provider is not None:
            self.steps.add(1)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any
    ) -> None:
        """Every numeric eval_* metric as a gauge of its own name."""
        if self.provider is None:
            return
        for key, value in (metrics or {}).items():
            if key.startswith("eval_") and isinstance(value, int | float):
                self._set(key, float(value))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Stop the endpoint and the meter provider (the port is free again)."""
        self.stop()

    def stop(self) -> None:
        """Stop the endpoint and the meter provider, if started (also after a failed run)."""
        _SERVING.discard(self)
        if self.provider is None:
            return
        if self.server is not None:
            server, thread = self.server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        self.provider.shutdown()
        self.provider = self.server = None
        self.gauges = {}


_SERVING: set[OtelMetricsCallback] = set()  # endpoints now listening (held until stopped)


@contextmanager
def run_scope4() -> Iterator[None]:
    """A run's process-wide changes undone when it ends, failed or not: transformers' own
    WrappedFlexAttention is put back and no OpenTelemetry endpoint is left listening."""
    try:
        yield
    finally:
        for callback in list(_SERVING):
            callback.stop()
        if _TRANSFORMERS_WRAPPER is not None:
            _flex_module().WrappedFlexAttention = _TRANSFORMERS_WRAPPER


def callbacks4(config: NewtuneConfig) -> list[TrainerCallback]:
    """use_otel_metrics."""
    if not config.use_otel_metrics:
        return []
    host = config.otel_metrics_host or "localhost"
    return [OtelMetricsCallback(host, config.otel_metrics_port or 8000)]
