"""Trainer options reach the real objects: optimizer, scheduler, TrainingArguments, callbacks."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from test_cli import CHATS, make_config
from transformers import EarlyStoppingCallback, LlamaForCausalLM

from newtune.cli.train import train_command
from newtune.config.load import load_config
from newtune.config.resolve import resolve
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError, ModelError
from newtune.train.args import build_training_args, schedule_for
from newtune.train.callbacks import LossWatchdogCallback, build_callbacks
from newtune.train.kernels import apply_liger
from newtune.train.trainer import NewtuneTrainer

PEAK = 0.01


def config(tmp_path: Path, **keys) -> NewtuneConfig:
    base = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
    return NewtuneConfig(**base, output_dir=str(tmp_path / "out"), **keys)


def trainer_for(tmp_path: Path, model_dir: Path, has_eval: bool = False, **keys):
    cfg = config(tmp_path, learning_rate=PEAK, **keys)
    args = build_training_args(cfg, resolve(cfg, env={}), has_eval, steps_per_epoch=10)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    return NewtuneTrainer(model=model, args=args, schedule=schedule_for(cfg))


def lrs(tmp_path: Path, model_dir: Path, total: int, **keys) -> list[float]:
    """The learning rate of steps 0..total-1, from the scheduler the trainer builds."""
    trainer = trainer_for(tmp_path, model_dir, **keys)
    trainer.create_optimizer_and_scheduler(num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return out


def load_yaml(tmp_path: Path, **keys):
    path = tmp_path / "cfg.yml"
    data = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], **keys}
    path.write_text(yaml.safe_dump(data))
    return load_config(str(path))


# -- optimizer ------------------------------------------------------------------------------


def test_adamw_hyperparameters_reach_the_param_groups(tmp_path, model_dir):
    trainer = trainer_for(
        tmp_path, model_dir, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6
    )
    optimizer = trainer.create_optimizer()
    assert type(optimizer).__name__ == "AdamW" and type(optimizer).__module__.startswith("torch")
    decayed, plain = optimizer.param_groups
    assert (decayed["lr"], decayed["betas"], decayed["eps"]) == (PEAK, (0.8, 0.95), 1e-6)
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)  # norms: no decay


@pytest.mark.parametrize(
    ("name", "cls", "bits", "paged"),
    [
        ("adamw_bnb_8bit", "AdamW", 8, False),
        ("paged_adamw_8bit", "AdamW", 8, True),
        ("paged_adamw_32bit", "AdamW", 32, True),
        ("lion_8bit", "Lion", 8, False),
    ],
)
def test_bitsandbytes_optimizers_are_built_and_step_on_cpu(
    tmp_path, model_dir, name, cls, bits, paged
):
    import bitsandbytes as bnb

    trainer = trainer_for(tmp_path, model_dir, optimizer=name, adam_beta1=0.85)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, getattr(bnb.optim, cls))
    assert optimizer.args.optim_bits == bits and optimizer.is_paged == paged
    assert optimizer.param_groups[0]["betas"][0] == 0.85
    embed = trainer.model.model.embed_tokens.weight
    before = embed.detach().clone()
    trainer.model(
        input_ids=torch.tensor([[1, 5, 6, 7]]), labels=torch.tensor([[1, 5, 6, 7]])
    ).loss.backward()
    optimizer.step()
    assert not torch.equal(before, embed.detach())


def test_optim_args_reach_the_optimizer(tmp_path, model_dir):
    trainer = trainer_for(
        tmp_path, model_dir, optimizer="ademamix", optim_args={"alpha": 8.0, "beta3": 0.995}
    )
    group = trainer.create_optimizer().param_groups[0]
    assert group["alpha"] == 8.0 and group["betas"] == (0.9, 0.999, 0.995)


def test_optimizer_packages_are_warned_and_target_modules_checked_at_validation(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_yaml(tmp_path, optimizer="galore_adamw")
    text = str(err.value)
    assert "set `optim_target_modules`" in text and "galore-torch" not in text
    notes = load_yaml(tmp_path, optimizer="galore_adamw", optim_target_modules=["attn"]).notes
    assert notes == [  # a package missing here is a warning: the config may train elsewhere
        "warning: `optimizer: galore_adamw` needs the galore-torch package, which is not "
        "installed here; the machine that trains needs it (`pip install galore-torch`)."
    ]
    with pytest.raises(ConfigError, match="`optim_target_modules` only applies to the galore_"):
        load_yaml(tmp_path, optim_target_modules=["attn"])
    args = build_training_args(
        config(tmp_path, optimizer="galore_adamw", optim_target_modules=["attn", "mlp"]),
        resolve(config(tmp_path), env={}),
        False,
    )
    assert (args.optim.value, args.optim_target_modules) == ("galore_adamw", ["attn", "mlp"])


# -- schedulers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"lr_scheduler": "constant"}, [1.0] * 6),
        ({"lr_scheduler": "constant_with_warmup", "warmup_steps": 2}, [0, 0.5, 1, 1, 1, 1]),
        ({"lr_scheduler": "linear", "warmup_steps": 2}, [0, 0.5, 1, 0.75, 0.5, 0.25]),
        (
            {"lr_scheduler": "polynomial", "lr_scheduler_kwargs": {"power": 2.0, "lr_end": 0.0}},
            [1, (5 / 6) ** 2, (4 / 6) ** 2, 0.25, (2 / 6) ** 2, (1 / 6) ** 2],
        ),
        ({"lr_scheduler": "cosine"}, [0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)]),
    ],
    ids=["constant", "constant_with_warmup", "linear", "polynomial", "cosine"],
)
def test_transformers_schedulers(tmp_path, model_dir, keys, expected):
    assert lrs(tmp_path, model_dir, 6, **keys) == pytest.approx([PEAK * e for e in expected])


def test_cosine_min_lr_ratio_uses_cosine_with_min_lr(tmp_path, model_dir):
    got = lrs(tmp_path, model_dir, 11, cosine_min_lr_ratio=0.1, warmup_steps=1)
    assert got[0] == 0 and got[1] == pytest.approx(PEAK)
    assert got[6] == pytest.approx(PEAK * (0.1 + 0.9 * 0.5))  # halfway down
    assert got[10] == pytest.approx(PEAK * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9))))
    assert min(got[1:]) > 0.1 * PEAK - 1e-12


def test_cosine_constant_lr_ratio_holds_the_minimum(tmp_path, model_dir):
    got = lrs(tmp_path, model_dir, 10, cosine_min_lr_ratio=0.2, cosine_constant_lr_ratio=0.6)
    assert got[0] == pytest.approx(PEAK)
    assert got[3] == pytest.approx(PEAK * (0.2 + 0.8 * 0.5))  # half of the 6 decay steps
    assert got[6:] == pytest.approx([0.2 * PEAK] * 4)  # constant tail from 60% of training


def test_lr_quadratic_warmup(tmp_path, model_dir):
    got = lrs(tmp_path, model_dir, 8, lr_quadratic_warmup=True, warmup_steps=4)
    assert got[:5] == pytest.approx([0, PEAK / 16, PEAK / 4, PEAK * 9 / 16, PEAK])
    assert got[6] == pytest.approx(PEAK * 0.5)  # then cosine: halfway through the 4 decay steps


def test_one_cycle_honours_lr_div_factor_and_warmup(tmp_path, model_dir):
    trainer = trainer_for(tmp_path, model_dir, lr_scheduler="one_cycle", lr_div_factor=10)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert type(trainer.lr_scheduler) is torch.optim.lr_scheduler.OneCycleLR
    got = lrs(tmp_path, model_dir, 10, lr_scheduler="one_cycle", lr_div_factor=10, warmup_steps=4)
    assert got[0] == pytest.approx(PEAK / 10)
    assert max(got) == pytest.approx(PEAK) and got.index(max(got)) == 3  # pct_start 0.4
    assert got[-1] == pytest.approx(PEAK / 10 / 1e4)  # torch's final_div_factor


def test_scheduler_keys_need_the_right_scheduler(tmp_path):
    with pytest.raises(ConfigError, match="`cosine_min_lr_ratio` shapes the cosine schedule"):
        load_yaml(tmp_path, lr_scheduler="linear", cosine_min_lr_ratio=0.1)
    with pytest.raises(ConfigError, match="set `cosine_min_lr_ratio` too"):
        load_yaml(tmp_path, cosine_constant_lr_ratio=0.8)
    with pytest.raises(ConfigError, match="`lr_div_factor` applies to `lr_scheduler: one_cycle`"):
        load_yaml(tmp_path, lr_div_factor=10)


# -- TrainingArguments fields -----------------------------------------------------------------


def test_training_argument_fields(tmp_path):
    cfg = config(
        tmp_path,
        logging_steps=7,
        eval_batch_size=5,
        neftune_noise_alpha=5.0,
        torch_compile=True,
        torch_compile_backend="eager",
        hub_model_id="me/tiny",
        hub_strategy="end",
        save_safetensors=True,
    )
    args = build_training_args(cfg, resolve(cfg, env={}), False)
    assert (args.logging_steps, args.per_device_eval_batch_size) == (7, 5)
    assert (args.torch_compile, args.torch_compile_backend) == (True, "eager")
    assert args.neftune_noise_alpha == 5.0 and args.disable_tqdm is False
    assert (args.push_to_hub, args.hub_model_id, args.hub_strategy.value) == (
        True,
        "me/tiny",
        "end",
    )
    assert args.hub_token is None  # the token comes from the environment, never the config
    default = build_training_args(config(tmp_path), resolve(config(tmp_path), env={}), False)
    assert (default.push_to_hub, default.torch_compile) == (False, False)
    auto = config(tmp_path, torch_compile="auto")
    assert build_training_args(auto, resolve(auto, env={}), False).torch_compile is False  # CPU


def test_early_stopping_sets_up_best_model_tracking(tmp_path):
    cfg = config(tmp_path, early_stopping_patience=2, eval_steps=3, val_set_size=0.1)
    args = build_training_args(cfg, resolve(cfg, env={}), True, 10)
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"
    assert args.greater_is_better is False
    assert (args.save_strategy.value, args.save_steps) == ("steps", 3)  # a checkpoint per eval
    callbacks = build_callbacks(cfg)
    stopper = [c for c in callbacks if isinstance(c, EarlyStoppingCallback)]
    assert len(stopper) == 1 and stopper[0].early_stopping_patience == 2
    with pytest.raises(ConfigError, match="`early_stopping_patience` keeps the best checkpoint"):
        bad = config(tmp_path, early_stopping_patience=2, save_strategy="epoch", eval_steps=3)
        build_training_args(bad, resolve(bad, env={}), True, 10)
    with pytest.raises(ConfigError, match="`early_stopping_patience` stops on the eval loss"):
        load_yaml(tmp_path, early_stopping_patience=2)


@pytest.mark.slow
def test_early_stopping_stops_when_eval_loss_stops_improving(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        "chat_template",
        max_steps=20,
        learning_rate=3.0,  # diverges: the eval loss rises after the first evals
        lr_scheduler="constant",
        val_set_size=0.25,
        eval_steps=1,
        early_stopping_patience=2,
    )
    train_command(str(cfg))
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    stopped = evals[-1][0]
    assert stopped < 20
    best_step, best = min(evals, key=lambda e: e[1])
    assert stopped == best_step + 2  # two evals in a row without improvement
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(best, abs=1e-6)  # the final model is the best


# -- loss watchdog --------------------------------------------------------------------------


def test_watchdog_counts_consecutive_high_losses():
    from transformers import TrainerControl, TrainerState

    dog = LossWatchdogCallback(threshold=2.0, patience=2)
    state, control = TrainerState(), TrainerControl()
    for step, loss in enumerate([3.0, 1.0, 3.0, float("nan")], start=1):
        state.global_step = step
        dog.on_log(None, state, control, logs={"loss": loss})
        dog.on_log(None, state, control, logs={"eval_loss": 9.0})  # eval logs do not count
    assert control.should_training_stop and dog.tripped == {"step": 4, "loss": dog.tripped["loss"]}
    assert math.isnan(dog.tripped["loss"])


@pytest.mark.slow
def test_watchdog_aborts_the_cli_run_and_keeps_the_checkpoint(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        "chat_template",
        max_steps=8,
        save_steps=1,
        loss_watchdog_threshold=0.5,  # the tiny model starts near ln(vocab) ~ 6
        loss_watchdog_patience=2,
    )
    with pytest.raises(SystemExit) as exit_info:
        train_command(str(cfg))
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert err.count("newtune: error: ") == 1 and "Traceback" not in err
    message = err[err.index("newtune: error: ") :].strip()
    assert "\n\n" not in message  # one paragraph
    flat = " ".join(message.split())
    assert "training aborted at step 2" in flat
    assert "`loss_watchdog_threshold: 0.5` for 2 logs in a row" in flat
    out = tmp_path / "out"
    assert f"the last checkpoint is kept in {out / 'checkpoint-2'}" in flat
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    assert not (out / "checkpoint-3").exists()
    assert not (out / "model.safetensors").exists()  # no final model from a broken run


def test_hub_model_id_pushes_the_final_folder(tmp_path, model_dir, monkeypatch):
    import huggingface_hub
    import transformers

    def offline_repo(self, token=None, private=None):  # no network here: the repo "exists"
        self.hub_model_id, self.push_in_progress = self.args.hub_model_id, None

    uploads = []

    def upload_folder(self, **kwargs):
        uploads.append(
            {**kwargs, "files": sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())}
        )

    monkeypatch.setattr(transformers.Trainer, "init_hf_repo", offline_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        "chat_template",
        max_steps=2,
        hub_model_id="me/tiny",
        hub_strategy="end",
    )
    train_command(str(cfg))
    (upload,) = uploads
    assert upload["repo_id"] == "me/tiny" and upload["folder_path"] == str(tmp_path / "out")
    assert {"README.md", "model.safetensors", "loss_curve.png"} <= set(upload["files"])
    assert "checkpoint-*" in upload["ignore_patterns"]


def test_unreachable_hub_is_a_model_error_before_training(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"^`hub_model_id: me/tiny`: the hub repo cannot be"):
        trainer_for(tmp_path, model_dir, hub_model_id="me/tiny")


# -- liger ----------------------------------------------------------------------------------


def test_liger_missing_is_a_validation_warning_with_the_pip_command(tmp_path):
    notes = load_yaml(tmp_path, liger_rms_norm=True, liger_glu_activation=True).notes
    assert notes == [
        "warning: `liger_rms_norm`, `liger_glu_activation` need liger-kernel, which is not "
        "installed here; the machine that trains needs it (`pip install 'newtune[liger]'` or "
        "`pip install liger-kernel`)."
    ]
    with pytest.raises(ConfigError, match="`liger_cross_entropy` and `liger_fused_linear_cross"):
        load_yaml(tmp_path, liger_cross_entropy=True, liger_fused_linear_cross_entropy=True)
    plugin = "axolotl.integrations.liger.LigerPlugin"
    assert load_yaml(tmp_path, plugins=[plugin]).config.plugins == [plugin]  # Axolotl configs
    with pytest.raises(ConfigError, match="`plugins`: my.Plugin are Axolotl plugins newtune"):
        load_yaml(tmp_path, plugins=[plugin, "my.Plugin"])


def _fake_liger(monkeypatch, supported=("llama",)):
    calls = []
    package = types.ModuleType("liger_kernel")
    module = types.ModuleType("liger_kernel.transformers")
    module._apply_liger_kernel_to_instance = lambda model, **kw: calls.append((model, kw))
    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {name: None for name in supported}
    for name, mod in [
        ("liger_kernel", package),
        ("liger_kernel.transformers", module),
        ("liger_kernel.transformers.monkey_patch", patch),
    ]:
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_liger_kernels_are_applied_to_the_base_model_under_lora(tmp_path, model_dir, monkeypatch):
    from peft import LoraConfig, get_peft_model

    calls = _fake_liger(monkeypatch)
    base = LlamaForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    cfg = config(tmp_path, liger_rope=True, liger_glu_activation=True, liger_rms_norm=True)
    apply_liger(model, cfg)
    assert len(calls) == 1 and calls[0][0] is base
    assert calls[0][1] == {
        "rope": True,
        "rms_norm": True,
        "layer_norm": False,
        "swiglu": True,
        "geglu": True,
        "cross_entropy": False,
        "fused_linear_cross_entropy": False,
        "rms_norm_gated": False,
    }
    apply_liger(model, config(tmp_path))  # no liger key: nothing applied
    assert len(calls) == 1


def test_liger_on_an_unsupported_model_type_is_a_model_error(tmp_path, model_dir, monkeypatch):
    _fake_liger(monkeypatch, supported=("qwen2",))
    model = LlamaForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ModelError, match="liger-kernel has no kernels for model type `llama`"):
        apply_liger(model, config(tmp_path, liger_rope=True))
