"""ReLoRA: exact merges, re-initialised adapters, pruned Adam state, the jagged schedule, and a
CLI run with two restarts whose merged model is relora_base + the final adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from peft import LoraConfig, PeftModel, get_peft_model
from test_cli import CHATS, cli, make_config
from test_training_options import PEAK, config, trainer_for
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from newtune.train.relora import (
    RELORA_BASE,
    Jagged,
    jagged_factor,
    merge_and_reinit,
    prune_optimizer,
)
from newtune.train.seed_features import attach


def lora_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    torch.manual_seed(1)
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(base, config)
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def lora_state(model) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            out[name] = {
                "W": module.base_layer.weight.detach().clone(),
                "A": module.lora_A["default"].weight.detach().clone(),
                "B": module.lora_B["default"].weight.detach().clone(),
                "s": module.scaling["default"],
            }
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restart_merges_the_delta_exactly_and_reinitialises_the_adapter(model_dir, dtype):
    model = lora_model(model_dir, dtype)
    before = lora_state(model)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        logits_before = model(ids).logits.float()
    assert merge_and_reinit(model) == len(before) == 6  # 2 layers x (q, v, down)
    after = lora_state(model)
    for name, old in before.items():
        new = after[name]
        expected = (old["W"].float() + (old["B"].float() @ old["A"].float()) * old["s"]).to(dtype)
        assert new["W"].dtype == dtype
        torch.testing.assert_close(new["W"].float(), expected.float(), atol=1e-6, rtol=0)
        assert torch.count_nonzero(new["B"]) == 0  # peft's init: B = 0
        assert not torch.equal(new["A"], old["A"])  # A re-drawn (kaiming uniform)
        assert new["A"].abs().max() > 0
    with torch.no_grad():  # same function: the delta moved into the base, the adapter is zero
        logits_after = model(ids).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(logits_after, logits_before, atol=tol, rtol=0)


@pytest.mark.parametrize(
    ("method", "ratio"),
    [("magnitude", 0.9), ("magnitude", 0.5), ("random", 0.75), ("reset", 0.999)],
)
def test_optimizer_state_of_lora_params_is_pruned_at_the_ratio(model_dir, method, ratio):
    model = lora_model(model_dir)
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    before = {
        id(p): {k: optimizer.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in params
    }
    zeros, total = prune_optimizer(optimizer, params, ratio, method)
    expected_zeros = 0
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            value, old = optimizer.state[p][key], before[id(p)][key]
            count = int(ratio * value.numel() + 0.5)
            expected_zeros += count
            assert int((value == 0).sum()) == count  # exactly round(ratio x size), per tensor
            kept = value != 0
            assert torch.equal(value[kept], old[kept])  # the rest is untouched
            if method == "magnitude":  # the zeroed ones are the smallest
                assert old[~kept].abs().max() <= old[kept].abs().min()
    assert (zeros, total) == (expected_zeros, sum(2 * p.numel() for p in params))
    assert optimizer.state[params[0]]["step"] == 1  # the step count is kept


def test_jagged_factor_is_axolotls_schedule():
    jagged = Jagged(restart=4, warmup=2, anneal=2, min_scale=0.001)
    factors = [jagged_factor(s, jagged) for s in range(10)]
    half = 0.5 * 0.999 + 0.001
    assert factors == pytest.approx([1, 1, 1, half, 0.001, half, 1, half, 0.001, half])


def lrs(tmp_path: Path, model_dir: Path, total: int, **keys) -> list[float]:
    """The lr of steps 0..total-1 from the scheduler the trainer builds (with `attach`)."""
    trainer = attach(trainer_for(tmp_path, model_dir, **keys), config(tmp_path, **keys), None)
    trainer.create_optimizer_and_scheduler(num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return out


def test_lr_follows_the_jagged_schedule_over_the_configured_one(tmp_path, model_dir):
    half = 0.5 * 0.999 + 0.001
    constant = lrs(
        tmp_path,
        model_dir,
        10,
        lr_scheduler="constant",
        jagged_restart_steps=4,
        jagged_restart_warmup_steps=2,
        jagged_restart_anneal_steps=2,
    )
    expected = [1, 1, 1, half, 0.001, half, 1, half, 0.001, half]
    assert constant == pytest.approx([PEAK * f for f in expected])
    linear = lrs(tmp_path, model_dir, 10, lr_scheduler="linear", jagged_restart_steps=4)
    # linear decay 1 - s/10, times the defaults (warmup 10: the lr rises over each period)
    jagged = Jagged(4, 10, 1, 0.001)
    assert linear == pytest.approx(
        [PEAK * (1 - s / 10) * jagged_factor(s, jagged) for s in range(10)]
    )


@pytest.mark.slow
def test_cli_run_with_two_restarts_saves_the_merged_base_and_merge_lora_gives_the_final_model(
    tmp_path, model_dir
):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        "chat_template",
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_linear=True,
        max_steps=6,
        learning_rate=0.05,
        relora=True,
        relora_steps=2,  # the seed's spelling of jagged_restart_steps
        relora_warmup_steps=1,
        relora_prune_method="random",
    )
    proc = cli("-m", "newtune.cli.main", "train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = " ".join(proc.stderr.split())
    assert "`relora_steps` is deprecated; read as `jagged_restart_steps: 2`" in log
    assert "ReLoRA restart 1 at step 2" in log and "ReLoRA restart 2 at step 4" in log
    assert "ReLoRA restart 3" not in log
    out = tmp_path / "out"
    history = json.loads((out / "log_history.json").read_text())
    restarts = [h["num_lora_restarts"] for h in history if "loss" in h]
    assert restarts == [0, 0, 1, 1, 2, 2]  # logged after steps 1..6; restarts begin steps 3, 5
    base_dir = out / RELORA_BASE
    assert (base_dir / "config.json").is_file() and (base_dir / "model.safetensors").is_file()

    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        merged_base = AutoModelForCausalLM.from_pretrained(base_dir)
        w0 = base.model.layers[0].self_attn.q_proj.weight
        w1 = merged_base.model.layers[0].self_attn.q_proj.weight
        assert (w1 - w0).abs().max() > 1e-3  # two restarts merged deltas into the base
        assert torch.equal(  # not a LoRA target: unchanged
            merged_base.model.embed_tokens.weight, base.model.embed_tokens.weight
        )
        final = PeftModel.from_pretrained(merged_base, out)(ids).logits
        base_logits = base(ids).logits

    proc = cli("-m", "newtune.cli.main", "merge-lora", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")(ids).logits
    torch.testing.assert_close(merged, final, atol=1e-5, rtol=1e-5)  # relora_base + adapter
    assert (merged - base_logits).abs().max() > 1e-2  # the merged output differs from the base
    saved = yaml.safe_load((out / "newtune_config.yml").read_text())
    assert saved["relora"] is True and saved["jagged_restart_steps"] == 2


REFUSED = {
    "8-bit lora": (
        {"adapter": "lora", "load_in_8bit": True},
        "`relora: true` with `load_in_8bit: true` and `adapter: lora`: ReLoRA merges into "
        "quantized weights only under `adapter: qlora`",
    ),
    "one_cycle": (
        {"lr_scheduler": "one_cycle"},
        "`jagged_restart_steps` with `lr_scheduler: one_cycle`: jagged restarts scale",
    ),
    "one_cycle without relora": (
        {"relora": None, "lr_scheduler": "one_cycle"},
        "`jagged_restart_steps` with `lr_scheduler: one_cycle`",
    ),
    "no steps": ({"jagged_restart_steps": None}, "`relora: true` needs `jagged_restart_steps`"),
    "dora": ({"peft_use_dora": True}, "`relora: true` with `peft_use_dora: true`"),
    "sgd": ({"optimizer": "sgd"}, "`relora: true` with `optimizer: sgd`: restarts prune Adam"),
    "legacy without relora": (
        {"relora": None, "jagged_restart_steps": None, "relora_steps": 5},
        "`relora_steps` (the seed's spelling of `jagged_restart_steps`) turned ReLoRA on",
    ),
    "prune without relora": (
        {"relora": None, "relora_prune_ratio": 0.5},
        "`relora_prune_ratio` set without `relora: true`",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_relora_misuse_is_refused_by_name(tmp_path, model_dir, case):
    changes, expected = REFUSED[case]
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    keys = {"adapter": "lora", "relora": True, "jagged_restart_steps": 2, **changes}
    cfg = make_config(tmp_path, model_dir, data, "chat_template", **keys)
    proc = cli("-m", "newtune.cli.main", "validate", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert expected in " ".join(proc.stderr.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_resume_after_a_restart_loads_the_merged_base_and_ends_as_the_uninterrupted_run(
    tmp_path, model_dir
):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    keys = {
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "max_steps": 5,
        "learning_rate": 0.05,
        "relora": True,
        "jagged_restart_steps": 2,
        "save_steps": 3,
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = make_config(tmp_path / "a", model_dir, data, "chat_template", **keys)
    assert cli("-m", "newtune.cli.main", "train", str(whole)).returncode == 0
    a = tmp_path / "a" / "out"
    assert (a / "checkpoint-3" / RELORA_BASE / "model.safetensors").is_file()  # restart at 2

    keys["resume_from_checkpoint"] = str(a / "checkpoint-3")
    resumed = make_config(tmp_path / "b", model_dir, data, "chat_template", **keys)
    proc = cli("-m", "newtune.cli.main", "train", str(resumed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ReLoRA: merged base loaded from" in proc.stderr
    assert "ReLoRA restart 2 at step 4" in " ".join(proc.stderr.split())
    b = tmp_path / "b" / "out"
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", f"{RELORA_BASE}/model.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(y[key], x[key], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_two_cpu_ranks_restart_together(tmp_path, model_dir):
    from test_cli import train_on_two_cpu_ranks

    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        "chat_template",
        adapter="lora",
        lora_r=2,
        max_steps=3,
        relora=True,
        jagged_restart_steps=2,
        relora_prune_method="random",
    )
    proc = train_on_two_cpu_ranks(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ReLoRA restart 1 at step 2" in " ".join(proc.stderr.split())
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert [h["num_lora_restarts"] for h in history if "loss" in h] == [0, 0, 1]
    assert (tmp_path / "out" / RELORA_BASE / "model.safetensors").is_file()
