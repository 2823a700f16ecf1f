"""`flash_attn_fuse_mlp`: the packed gate/up MLP is exact and saves the model's own layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file
from test_cli import CHATS, cli, make_config
from transformers import AutoConfig, AutoModelForCausalLM

from newtune.cli.common import load
from newtune.config.load import load_config
from newtune.config.resolve import resolve
from newtune.errors import ModelError
from newtune.models.fused_mlp import SUPPORTED, FusedGatedMLP, fuse_gated_mlps, mlp_class
from newtune.models.load import build_model
from newtune.models.tokenizer import load_tokenizer
from newtune.train import run

AXOLOTL = Path("/work/axolotl/examples")


def _mlp(model_type: str, **extra) -> torch.nn.Module:
    """A transformers MLP of `model_type` with random weights (hidden 16, intermediate 24)."""
    config = AutoConfig.for_model(
        model_type,
        hidden_size=16,
        intermediate_size=24,
        num_attention_heads=2,
        num_key_value_heads=2,
        **extra,
    )
    torch.manual_seed(0)
    mlp = mlp_class(model_type)(config)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return mlp


def _assert_same_function(plain: torch.nn.Module, fused: torch.nn.Module) -> None:
    """Outputs and input gradients equal to 1e-6 (fp32) on a (3, 7, 16) input."""
    x = torch.randn(3, 7, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = plain(x), fused(x2)
    torch.testing.assert_close(y2, y, atol=1e-6, rtol=0)
    y.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_every_supported_mlp_fuses_exactly(model_type):
    plain = _mlp(model_type)
    fused = FusedGatedMLP(_mlp(model_type))
    assert fused.gate_up_proj.weight.shape == (48, 16)
    _assert_same_function(plain, fused)
    # weight gradients: the packed gradient is the gate gradient over the up gradient
    gate, up = fused.gate_up_proj.weight.grad.split(24)
    torch.testing.assert_close(gate, plain.gate_proj.weight.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(up, plain.up_proj.weight.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused.down_proj.weight.grad, plain.down_proj.weight.grad)


def test_biased_mlp_keeps_its_biases_and_their_keys():
    plain = _mlp("llama", mlp_bias=True)
    fused = FusedGatedMLP(_mlp("llama", mlp_bias=True))
    _assert_same_function(plain, fused)
    state = fused.state_dict()
    assert sorted(state) == sorted(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(state[key], value), key
    again = FusedGatedMLP(_mlp("llama", mlp_bias=True))
    with torch.no_grad():
        again.gate_up_proj.bias.zero_()
    again.load_state_dict(state)  # strict: the gate/up keys are all it takes
    assert torch.equal(again.gate_up_proj.bias, fused.gate_up_proj.bias)


def _model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def test_trained_fused_model_saves_the_weights_of_the_unfused_one(tmp_path, model_dir):
    plain, fused = _model(model_dir), _model(model_dir)
    assert fuse_gated_mlps(fused) == 2
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2], [4, 4, 8, 15, 16, 23, 42, 1]])
    for model in (plain, fused):
        # SGD keeps the 1e-7 rounding differences of the packed GEMM at their size (Adam's
        # first steps are sign-like on tiny gradients and would amplify them)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    a, b = plain.state_dict(), fused.state_dict()
    assert sorted(a) == sorted(b)
    assert "model.layers.0.mlp.gate_proj.weight" in b and not any("gate_up" in k for k in b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    base = _model(model_dir).state_dict()
    assert not torch.equal(
        a["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"]
    )

    fused.save_pretrained(tmp_path / "saved")
    on_disk = load_file(tmp_path / "saved" / "model.safetensors")
    assert sorted(on_disk) == sorted(load_file(model_dir / "model.safetensors"))
    reloaded = _model(tmp_path / "saved")  # plain transformers, no newtune
    assert type(reloaded.model.layers[0].mlp).__name__ == "LlamaMLP"
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, a[key], atol=1e-6, rtol=0, msg=key)

    resumed = _model(model_dir)  # resume: a fused model loads the saved (unfused) keys
    fuse_gated_mlps(resumed)
    resumed.load_state_dict(on_disk, strict=False)
    assert torch.equal(
        resumed.model.layers[1].mlp.gate_up_proj.weight,
        fused.model.layers[1].mlp.gate_up_proj.weight,
    )


def test_key_reaches_the_model_and_only_the_training_build(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    path = make_config(tmp_path, model_dir, data, "chat_template", flash_attn_fuse_mlp=True)
    config = load_config(path).config
    tok, new_ids = load_tokenizer(config)
    model = build_model(config, resolve(config), tok, new_ids)
    assert [type(layer.mlp) for layer in model.model.layers] == [FusedGatedMLP] * 2
    assert model.model.layers[0].mlp.gate_up_proj.weight.requires_grad


def test_unsupported_model_type_is_refused_with_the_list():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ModelError) as err:
        fuse_gated_mlps(model)
    message = str(err.value)
    assert "model's type is `gpt2`" in message and "llama, ministral, mistral" in message
    assert "qwen2, qwen3" in message


def _validate(tmp_path: Path, model_dir: Path, **keys) -> subprocess.CompletedProcess:
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    path = make_config(tmp_path, model_dir, data, "chat_template", flash_attn_fuse_mlp=True, **keys)
    return cli("-m", "newtune.cli.main", "validate", str(path))


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"adapter": "lora"}, "`adapter: lora` puts LoRA on those projections"),
        ({"adapter": "qlora", "load_in_4bit": True}, "`adapter: qlora` puts LoRA on those"),
        ({"liger_glu_activation": True}, "both replace the MLP's forward"),
        ({"unfrozen_parameters": ["model.layers.0.mlp.up_proj"]}, "name `mlp.gate_up_proj`"),
    ],
)
def test_fused_mlp_conflicts_are_refused_at_validate(tmp_path, model_dir, keys, message):
    proc = _validate(tmp_path, model_dir, **keys)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_zero3_is_refused_when_training_starts(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    path = make_config(
        tmp_path, model_dir, data, "chat_template", flash_attn_fuse_mlp=True,
        deepspeed={"zero_optimization": {"stage": 3}},
    )  # fmt: skip
    config = load_config(path).config
    tok, new_ids = load_tokenizer(config)
    with pytest.raises(ModelError, match=r"ZeRO-3 gathers the weights it saves by parameter name"):
        build_model(config, resolve(config), tok, new_ids)


def test_cli_trains_two_steps_and_saves_the_model_layout(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    path = make_config(
        tmp_path, model_dir, data, "chat_template", flash_attn_fuse_mlp=True, max_steps=2
    )
    proc = cli("-m", "newtune.cli.main", "train", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 LlamaMLP modules fused" in proc.stderr
    out = tmp_path / "out"
    history = json.loads((out / "log_history.json").read_text())
    assert max(h["step"] for h in history) == 2
    saved, base = load_file(out / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert sorted(saved) == sorted(base)
    key = "model.layers.0.mlp.gate_proj.weight"
    assert saved[key].shape == base[key].shape and not torch.equal(saved[key], base[key])


@pytest.mark.slow
def test_resumed_fused_run_equals_an_unfused_run(tmp_path, model_dir, monkeypatch):
    from test_resume import CrashAfterSave, SimulatedCrash

    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    keys = {"max_steps": 4, "learning_rate": 0.005, "save_steps": 2}
    for name, extra in (("plain", {}), ("fused", {"flash_attn_fuse_mlp": True})):
        (tmp_path / name).mkdir()
        cfg = make_config(tmp_path / name, model_dir, data, "chat_template", **keys, **extra)
        if extra:  # crash after checkpoint-2, then resume from it
            real = run.build_callbacks
            monkeypatch.setattr(
                run, "build_callbacks", lambda *a, real=real: [*real(*a), CrashAfterSave(2)]
            )
            with pytest.raises(SimulatedCrash):
                run.train(load(str(cfg), {}))
            monkeypatch.undo()
            ckpt = load_file(tmp_path / name / "out" / "checkpoint-2" / "model.safetensors")
            assert "model.layers.0.mlp.up_proj.weight" in ckpt and not any(
                "gate_up" in k for k in ckpt
            )
            overrides = {"resume_from_checkpoint": str(tmp_path / name / "out" / "checkpoint-2")}
            run.train(load(str(cfg), overrides))
        else:
            run.train(load(str(cfg), {}))
    a = load_file(tmp_path / "plain" / "out" / "model.safetensors")
    b = load_file(tmp_path / "fused" / "out" / "model.safetensors")
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("example", ["llama-2/fft_optimized.yml", "llama-2/lisa.yml"])
def test_axolotl_examples_with_the_key_validate(example):
    if not (AXOLOTL / example).is_file():
        pytest.skip("Axolotl examples not here")
    text = yaml.safe_load((AXOLOTL / example).read_text())
    assert text["flash_attn_fuse_mlp"] is True
    proc = subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", "validate", str(AXOLOTL / example)],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and "flash_attn_fuse_mlp" not in proc.stderr, proc.stderr


def test_train_refuses_a_model_type_without_a_gated_mlp(tmp_path, chat_tok_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(chat_tok_dir)
    gpt2 = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    path = make_config(tmp_path, gpt2, data, "chat_template", flash_attn_fuse_mlp=True)
    proc = cli("-m", "newtune.cli.main", "train", str(path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "this model's type is `gpt2`, which newtune does not fuse; supported model types: " in (
        proc.stderr
    )
    assert "llama, ministral, mistral, olmo, olmo2, olmo3, qwen2, qwen3" in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_lisa_trains_the_fused_model(tmp_path, model_dir):
    """llama-2/lisa.yml's combination: LISA switches whole layers, packed MLP weights included."""
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    lisa = {"lisa_n_layers": 1, "lisa_step_interval": 1, "lisa_layers_attribute": "model.layers"}
    path = make_config(tmp_path, model_dir, data, "chat_template", flash_attn_fuse_mlp=True, **lisa)
    proc = cli("-m", "newtune.cli.main", "train", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved, base = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(model_dir / "model.safetensors"),
    )
    assert sorted(saved) == sorted(base)
    moved = {k for k in base if not torch.equal(saved[k], base[k])}
    assert {k for k in moved if ".mlp.gate_proj" in k or ".mlp.up_proj" in k}
