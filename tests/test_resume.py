"""Exact resume: a run interrupted after a checkpoint and resumed ends with the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file
from test_cli import CHATS, make_config
from transformers import TrainerCallback

from newtune.cli.common import load
from newtune.errors import ConfigError
from newtune.train import run
from newtune.train.callbacks import RESUME_FILE


class SimulatedCrash(Exception):
    """Raised by the crash callback once the target checkpoint is on disk."""


class CrashAfterSave(TrainerCallback):
    """Crash the run right after checkpoint `step` was written (as a killed job would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SimulatedCrash(state.global_step)
        return control


class StepCounter(TrainerCallback):
    """Record the optimizer steps this process actually ran."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        return control


def _train(cfg: Path, monkeypatch, *extra: TrainerCallback, **overrides) -> Path:
    if extra:
        real = run.build_callbacks
        monkeypatch.setattr(run, "build_callbacks", lambda *a: [*real(*a), *extra])
    try:
        return run.train(load(str(cfg), overrides))
    finally:
        monkeypatch.undo()


def _weights(out: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else None
    return load_file(out / (name or "model.safetensors"))


def _steps(out: Path) -> int:
    return max(h["step"] for h in json.loads((out / "log_history.json").read_text()))


LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1}
LORA["lora_target_linear"] = True


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("adapter", [None, "lora"], ids=["full", "lora"])
def test_interrupted_then_resumed_run_equals_uninterrupted_run(
    tmp_path, model_dir, monkeypatch, packing, adapter
):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    keys = dict(
        max_steps=None,
        num_epochs=2,  # the resume point lies in the second epoch: its shuffle must be replayed
        gradient_accumulation_steps=2,
        sample_packing=packing,
        learning_rate=0.005,
        warmup_steps=1,
        **(LORA if adapter else {}),
    )
    (tmp_path / "a").mkdir()
    whole = make_config(tmp_path / "a", model_dir, data, "chat_template", **keys)
    out_a = _train(whole, monkeypatch)
    total = _steps(out_a)
    assert total >= 4
    crash_at = total - 1  # a step inside the second epoch (2+ steps per epoch)

    (tmp_path / "b").mkdir()
    resume = {"auto_resume_from_checkpoints": True, "save_steps": crash_at}
    broken = make_config(tmp_path / "b", model_dir, data, "chat_template", **resume, **keys)
    with pytest.raises(SimulatedCrash):
        _train(broken, monkeypatch, CrashAfterSave(crash_at))
    out_b = tmp_path / "b" / "out"
    assert not (out_b / "log_history.json").exists()  # no final model: the run died
    assert json.loads((out_b / f"checkpoint-{crash_at}" / RESUME_FILE).read_text())["data"]
    counter = StepCounter()
    _train(broken, monkeypatch, counter)  # auto_resume_from_checkpoints: checkpoint-{crash_at}
    assert counter.steps == [total]  # only the remaining step ran
    history = json.loads((out_b / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, total + 1))

    a, b = _weights(out_a), _weights(out_b)
    assert a.keys() == b.keys() and len(a) > 0
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    base = _weights(Path(model_dir)) if adapter is None else None
    if base is not None:  # the run did train: weights moved away from the base model
        assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-3


def test_resume_from_a_missing_checkpoint_is_a_config_error(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(
        tmp_path, model_dir, data, "chat_template", resume_from_checkpoint=str(tmp_path / "nope")
    )
    with pytest.raises(ConfigError, match=r"^`resume_from_checkpoint: .*nope` is not a folder"):
        run.train(load(str(cfg), {}))


def test_resume_on_other_prepared_data_is_refused(tmp_path, model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(tmp_path, model_dir, data, "chat_template", save_steps=2, max_steps=2)
    out = _train(cfg, monkeypatch)
    checkpoint = out / "checkpoint-2"
    with pytest.raises(ConfigError, match=r"was trained on prepared data .* but this config"):
        _train(cfg, monkeypatch, resume_from_checkpoint=str(checkpoint), sequence_len=48)
