"""Reporting: trackers only when asked (wandb offline, mlflow file store, tensorboard), the loss
plot and the model card."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml
from conftest import write_jsonl
from test_cli import CHATS, make_config

from newtune.cli.train import train_command
from newtune.config.load import load_config
from newtune.config.resolve import resolve
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError
from newtune.train.args import build_training_args
from newtune.train.report import loss_series, tracker_env, write_loss_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKEN = "hf_" + "a1B2c3D4e5F6g7H8i9J0kLmN"  # token-shaped: must never reach the model card


def cfg_of(tmp_path, **keys) -> NewtuneConfig:
    base = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
    return NewtuneConfig(**base, output_dir=str(tmp_path / "out"), **keys)


def test_nothing_is_reported_by_default(tmp_path):
    cfg = cfg_of(tmp_path)
    args = build_training_args(cfg, resolve(cfg, env={}), False)
    assert args.report_to == [] and tracker_env(cfg) == {}


def test_tracker_keys_become_report_to_and_environment(tmp_path):
    cfg = cfg_of(
        tmp_path,
        wandb_project="proj",
        wandb_entity="team",
        wandb_name="run-1",
        wandb_run_id="abc",
        wandb_log_model="end",
        wandb_watch="gradients",
        wandb_mode="offline",
        mlflow_tracking_uri="file:///tmp/mlruns",
        mlflow_experiment_name="exp",
        hf_mlflow_log_artifacts=True,
        use_tensorboard=True,
    )
    args = build_training_args(cfg, resolve(cfg, env={}), False)
    assert args.report_to == ["wandb", "mlflow", "tensorboard"] and args.run_name == "run-1"
    env = tracker_env(cfg)
    assert {k: v for k, v in env.items() if k != "WANDB_DIR"} == {
        "WANDB_PROJECT": "proj",
        "WANDB_ENTITY": "team",
        "WANDB_WATCH": "gradients",
        "WANDB_NAME": "run-1",
        "WANDB_RUN_ID": "abc",
        "WANDB_LOG_MODEL": "end",
        "WANDB_MODE": "offline",
        "MLFLOW_TRACKING_URI": "file:///tmp/mlruns",
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 needs the opt-in for a file: store
        "MLFLOW_EXPERIMENT_NAME": "exp",
        "HF_MLFLOW_LOG_ARTIFACTS": "1",
    }
    off = cfg_of(tmp_path, wandb_project="proj", wandb_mode="disabled")
    assert build_training_args(off, resolve(off, env={}), False).report_to == []


def test_tracker_values_and_hub_keys_are_checked(tmp_path):
    def load(**keys):
        path = tmp_path / "cfg.yml"
        data = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], **keys}
        path.write_text(yaml.safe_dump(data))
        return load_config(str(path))

    with pytest.raises(ConfigError, match="`wandb_mode: sometimes` is not one of online, offline"):
        load(wandb_project="p", wandb_mode="sometimes")
    with pytest.raises(ConfigError, match="`hub_strategy` is set without `hub_model_id`"):
        load(hub_strategy="end")


@pytest.mark.slow
def test_wandb_offline_mlflow_file_store_tensorboard_plot_and_card(tmp_path, model_dir):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("matplotlib")
    data = write_jsonl(tmp_path / f"{TOKEN}.jsonl", CHATS)
    mlruns = tmp_path / "mlruns"
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        "chat_template",
        max_steps=4,
        val_set_size=0.25,
        eval_steps=2,
        wandb_project="newtune-test",
        wandb_mode="offline",
        wandb_name="tiny",
        mlflow_tracking_uri=mlruns.as_uri(),
        mlflow_experiment_name="newtune-exp",
        use_tensorboard=True,
    )
    before = dict(os.environ)
    train_command(str(cfg))
    out = tmp_path / "out"
    assert {k: v for k, v in os.environ.items() if k.startswith(("WANDB_", "MLFLOW_"))} == {
        k: v for k, v in before.items() if k.startswith(("WANDB_", "MLFLOW_"))
    }  # the tracker variables were restored

    # wandb: a real offline run folder with its run file
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))

    # mlflow: the file store holds the experiment, the run and its logged metrics
    import mlflow

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # to read the store back here
    client = mlflow.MlflowClient(tracking_uri=mlruns.as_uri())
    experiment = client.get_experiment_by_name("newtune-exp")
    (run,) = client.search_runs([experiment.experiment_id])
    history = json.loads((out / "log_history.json").read_text())
    train_losses = [h["loss"] for h in history if "loss" in h]
    logged = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert logged == pytest.approx(train_losses) and len(logged) == 4
    assert run.data.params["learning_rate"] == "0.01"

    # tensorboard event file
    assert list((out / "runs").rglob("events.out.tfevents.*"))

    # loss curve PNG and model card
    png = (out / "loss_curve.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    card = (out / "README.md").read_text()
    results = json.loads((out / "train_results.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\n") and "base_model:" not in card
    assert f"a full fine-tune of `{model_dir}`" in card  # local paths stay out of the metadata
    assert "| chat_template | 16 |" in card and TOKEN not in card and "<redacted>" in card
    assert "| learning_rate | 0.01 |" in card and "| max_steps | 4 |" in card
    assert f"| final train loss (last logged) | {round(train_losses[-1], 4)} |" in card
    assert f"| final eval loss | {round(results['eval_loss'], 4)} |" in card
    import transformers

    assert f"| transformers | {transformers.__version__} |" in card
    assert "![loss curve](loss_curve.png)" in card


def test_loss_plot_without_matplotlib_is_skipped(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level("INFO", logger="newtune.train.report"):
        assert write_loss_plot([{"loss": 1.0, "step": 1}], tmp_path / "p.png") is False
    assert not (tmp_path / "p.png").exists()
    assert "pip install 'newtune[plot]'" in caplog.text


def test_loss_series_splits_train_and_eval():
    history = [
        {"loss": 3.0, "step": 1},
        {"loss": 2.0, "step": 2},
        {"eval_loss": 2.5, "step": 2},
        {"train_runtime": 1.0, "step": 2},
    ]
    assert loss_series(history) == {"train": [(1, 3.0), (2, 2.0)], "eval": [(2, 2.5)]}
