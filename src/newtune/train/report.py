"""Reporting: tracker selection and environment, and the loss plot and model card of a run."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from newtune.config.schema import NewtuneConfig
from newtune.config.secrets import redact
from newtune.errors import ConfigError

log = logging.getLogger(__name__)

LOSS_PLOT = "loss_curve.png"
MODEL_CARD = "README.md"
TRACKER_ENV_PREFIXES = ("WANDB_", "MLFLOW_", "HF_MLFLOW_", "SWANLAB_")
FRAMEWORKS = ("newtune", "transformers", "torch", "peft", "accelerate", "datasets")


def report_targets(config: NewtuneConfig) -> list[str] | str:
    """Trackers the config asks for (`report_to`); "none" unless a key says so."""
    targets = []
    if config.wandb_project and config.wandb_mode != "disabled":
        targets.append("wandb")
    if config.mlflow_tracking_uri or config.mlflow_experiment_name:
        targets.append("mlflow")
    if config.use_tensorboard:
        targets.append("tensorboard")
    from newtune.train.compat2 import report_targets2

    targets += report_targets2(config)  # use_swanlab, trackio_project_name
    return targets or "none"


def tracker_env(config: NewtuneConfig) -> dict[str, str]:
    """Environment variables the transformers tracker callbacks read, from the config keys."""
    targets = report_targets(config)
    env: dict[str, str] = {}
    if "wandb" in targets:
        values = {
            "WANDB_PROJECT": config.wandb_project,
            "WANDB_ENTITY": config.wandb_entity,
            "WANDB_WATCH": config.wandb_watch,
            "WANDB_NAME": config.wandb_name,
            "WANDB_RUN_ID": config.wandb_run_id,
            "WANDB_LOG_MODEL": config.wandb_log_model,
            "WANDB_MODE": config.wandb_mode,
        }
        env.update({k: str(v) for k, v in values.items() if v is not None})
        if "WANDB_DIR" not in os.environ:  # the run folder goes with the run's outputs
            env["WANDB_DIR"] = str(Path(config.output_dir).resolve())
    if "mlflow" in targets:
        uri = config.mlflow_tracking_uri
        if uri:
            env["MLFLOW_TRACKING_URI"] = uri
            # a file store is what the config asks for; MLflow 3 refuses it unless opted in
            is_file_store = uri.startswith("file:") or "://" not in uri
            if is_file_store and "MLFLOW_ALLOW_FILE_STORE" not in os.environ:
                env["MLFLOW_ALLOW_FILE_STORE"] = "true"
        if config.mlflow_experiment_name:
            env["MLFLOW_EXPERIMENT_NAME"] = config.mlflow_experiment_name
        env["HF_MLFLOW_LOG_ARTIFACTS"] = "1" if config.hf_mlflow_log_artifacts else "0"
    from newtune.train.compat2 import tracker_env2

    env.update(tracker_env2(config))  # SWANLAB_*
    return env


@contextlib.contextmanager
def tracker_environment(config: NewtuneConfig) -> Iterator[dict[str, str]]:
    """Set the tracker variables for the run; afterwards restore every tracker variable
    (the trackers add their own, e.g. MLFLOW_EXPERIMENT_ID) as it was before."""
    env = tracker_env(config)
    saved = {k: v for k, v in os.environ.items() if k.startswith(TRACKER_ENV_PREFIXES)}
    os.environ.update(env)
    out = Path(config.output_dir)
    created = not out.exists()
    if env:
        out.mkdir(parents=True, exist_ok=True)
    try:
        yield env
    except Exception as exc:
        if not is_wandb_login_error(exc):
            raise
        if created and out.is_dir() and not any(p.is_file() for p in out.rglob("*")):
            shutil.rmtree(out, ignore_errors=True)  # only the tracker's empty run folders
        raise ConfigError(
            f"`wandb_project: {config.wandb_project}` reports to Weights & Biases, which could "
            f"not log in on this machine ({exc}). Log in first (`wandb login`, or set "
            "WANDB_API_KEY), or set `wandb_mode: offline` to keep the run in output_dir/wandb "
            "(`wandb sync` uploads it later), or remove `wandb_project`."
        ) from None
    finally:
        for key in [k for k in os.environ if k.startswith(TRACKER_ENV_PREFIXES)]:
            if key not in saved:
                del os.environ[key]
        os.environ.update(saved)


def is_wandb_login_error(exc: BaseException) -> bool:
    """wandb's error for a run started without credentials (no key, not a terminal)."""
    module = type(exc).__module__ or ""
    text = str(exc).lower()
    return module.startswith("wandb") and ("api key" in text or "wandb login" in text)


def loss_series(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) pairs of the logged training loss and of the eval loss."""
    series: dict[str, list[tuple[int, float]]] = {"train": [], "eval": []}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        if "loss" in entry:
            series["train"].append((int(step), float(entry["loss"])))
        if "eval_loss" in entry:
            series["eval"].append((int(step), float(entry["eval_loss"])))
    return series


# Preference metrics drawn beside the loss when a run logged them (TRL's names).
PLOT_METRICS = ("rewards/accuracies", "rewards/margins", "accuracy", "margin", "kl")


def metric_series(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of each logged preference metric, train (`name`) and eval
    (`eval_name`); only the names some entry has."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for name in PLOT_METRICS:
            for key in (name, f"eval_{name}"):
                if key in entry:
                    series.setdefault(key, []).append((int(step), float(entry[key])))
    return series


def write_loss_plot(log_history: list[dict[str, Any]], path: Path) -> bool:
    """Plot train and eval loss against the step as a PNG; False when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        log.info(
            "loss plot skipped: matplotlib is not installed (pip install 'newtune[plot]' "
            "or pip install matplotlib)"
        )
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = loss_series(log_history)
    metrics = metric_series(log_history)
    figure = Figure(figsize=(12 if metrics else 7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 2 if metrics else 1, 1)
    if metrics:
        side = figure.add_subplot(1, 2, 2)
        for key, points in metrics.items():
            steps, values = zip(*points, strict=True)
            side.plot(steps, values, marker="o" if key.startswith("eval_") else None, label=key)
        side.set_xlabel("step")
        side.set_ylabel("preference metrics")
        side.grid(alpha=0.3)
        side.legend()
    for name, marker in (("train", None), ("eval", "o")):
        if series[name]:
            steps, losses = zip(*series[name], strict=True)
            axes.plot(steps, losses, marker=marker, label=f"{name} loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if any(series.values()):
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    return True


def framework_versions() -> dict[str, str]:
    """Installed versions of newtune and the libraries it trains with."""
    versions = {}
    for name in FRAMEWORKS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _hyperparameters(config: NewtuneConfig, args: Any) -> dict[str, Any]:
    rows = {
        "adapter": config.adapter or "full fine-tune",
        "learning_rate": config.learning_rate,
        "lr_scheduler": config.lr_scheduler,
        "optimizer": config.optimizer,
        "micro_batch_size": config.micro_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "num_epochs": config.num_epochs,
        "max_steps": config.max_steps,
        "sequence_len": config.sequence_len,
        "sample_packing": bool(config.sample_packing),
        "warmup": config.warmup_steps or config.warmup_ratio,
        "weight_decay": config.weight_decay,
        "seed": config.seed,
    }
    if config.adapter:
        rows.update(lora_r=config.lora_r, lora_alpha=config.lora_alpha)
    return {k: v for k, v in rows.items() if v is not None}


def _final_losses(log_history: list[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    series = loss_series(log_history)
    out: dict[str, Any] = {}
    if series["train"]:
        out["final train loss (last logged)"] = round(series["train"][-1][1], 4)
    if "train_loss" in metrics:
        out["mean train loss"] = round(float(metrics["train_loss"]), 4)
    if "eval_loss" in metrics:
        out["final eval loss"] = round(float(metrics["eval_loss"]), 4)
    elif series["eval"]:
        out["final eval loss"] = round(series["eval"][-1][1], 4)
    if log_history and "step" in log_history[-1]:
        out["optimizer steps"] = log_history[-1]["step"]
    return out


def _table(rows: dict[str, Any], head: tuple[str, str]) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    return lines + [f"| {k} | {v} |" for k, v in rows.items()]


def _is_hub_id(value: str) -> bool:
    return "://" not in value and not Path(value).exists() and value.count("/") <= 1


def model_card(
    config: NewtuneConfig,
    args: Any,
    metrics: dict[str, Any],
    log_history: list[dict[str, Any]],
    stats: dict[str, Any],
    plot: bool,
) -> str:
    """The README.md of the trained model: base, data, hyperparameters, losses, versions."""
    base = redact(config.base_model)
    datasets = [redact(d.path) for d in config.datasets]
    front = ["---", f"library_name: {'peft' if config.adapter else 'transformers'}"]
    if _is_hub_id(base):  # the hub's metadata only takes repo ids, not local paths
        front.append(f"base_model: {base}")
    front += ["tags:", "- newtune", "- text-generation"]
    hub_data = [d for d in datasets if _is_hub_id(d)]
    if hub_data:
        front += ["datasets:", *[f"- {d}" for d in hub_data]]
    front += ["---", ""]
    kind = f"a {config.adapter} adapter" if config.adapter else "a full fine-tune"
    lines = [f"# {Path(config.output_dir).resolve().name}", ""]
    lines += [f"This model is {kind} of `{base}`, trained with newtune.", ""]
    lines += ["## Training data", "", "| dataset | type | rows |", "|---|---|---|"]
    rows_by_path = {d.get("path"): d.get("rows") for d in stats.get("datasets", [])}
    for entry, path in zip(config.datasets, datasets, strict=True):
        lines.append(f"| `{path}` | {entry.type} | {rows_by_path.get(entry.path, '')} |")
    split_rows = stats.get("rows", {})
    lines += [
        "",
        f"Training rows: {split_rows.get('train', '?')}, eval rows: "
        f"{split_rows.get('test', 0)}, trained tokens: {stats.get('total_tokens', '?')}.",
        "",
    ]
    lines += ["## Hyperparameters", "", *_table(_hyperparameters(config, args), ("key", "value"))]
    lines += [
        "",
        "## Results",
        "",
        *_table(_final_losses(log_history, metrics), ("metric", "value")),
    ]
    if plot:
        lines += ["", f"![loss curve]({LOSS_PLOT})"]
    lines += [
        "",
        "## Framework versions",
        "",
        *_table(framework_versions(), ("package", "version")),
    ]
    return redact("\n".join(front + lines) + "\n")
