"""ReLoRA under QLoRA (Axolotl's llama-2/relora.yml): the merged base is kept at full precision
and the 4-bit weights are re-quantized from it at each restart, so rounding errors do not
compound; and ReLoRA's optimizer pruning reaches bitsandbytes' 8-bit Adam state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_cli import CHATS, cli, make_config
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from newtune.train.relora import RELORA_BASE, check_master, merge_quantized, prune_optimizer

bnb = pytest.importorskip("bitsandbytes")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def qlora_model(model_dir: Path) -> torch.nn.Module:
    """The tiny Llama in 4-bit NF4 with a trained-looking LoRA (B != 0) on q, v and down."""
    torch.manual_seed(1)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.float32
    )
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_b(model)
    return model


def randomize_b(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)


def targets(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Checkpoint key of each LoRA target's weight -> its peft layer."""
    return {
        f"{name.removeprefix('base_model.model.')}.weight": module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def dequantized(layer: torch.nn.Module) -> torch.Tensor:
    weight = layer.get_base_layer().weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


def quantize_like(layer: torch.nn.Module, full: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes makes of `full` with the layer's 4-bit settings, dequantized."""
    old = layer.get_base_layer().weight
    fresh = bnb.nn.Params4bit(
        full.clone(),
        requires_grad=False,
        quant_type=old.quant_type,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
    ).to("cpu")
    return bnb.functional.dequantize_4bit(fresh.data, fresh.quant_state).float()


def deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        key: layer.get_delta_weight("default").detach().float()
        for key, layer in targets(model).items()
    }


def test_two_restarts_keep_a_full_precision_master_and_requantize_from_it(tmp_path, model_dir):
    model = qlora_model(model_dir)
    original = load_file(str(model_dir / "model.safetensors"))
    check_master(model, model_dir)
    d1 = deltas(model)
    assert merge_quantized(model, model_dir, tmp_path / "m1") == 6  # 2 layers x (q, v, down)
    randomize_b(model)  # the second cycle's adapter
    d2 = deltas(model)
    merge_quantized(model, tmp_path / "m1", tmp_path / "m2")

    master = load_file(str(tmp_path / "m2" / "model.safetensors"))
    assert master.keys() == original.keys()
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["model_type"] == "llama"
    for key, layer in targets(model).items():
        first = (original[key].float() + d1[key]).to(original[key].dtype)
        expected = (first.float() + d2[key]).to(original[key].dtype)
        assert torch.equal(master[key], expected)  # the deltas add up at full precision
        # the 4-bit weight is quantize(master): one rounding, not one per restart
        assert torch.equal(dequantized(layer), quantize_like(layer, expected))
        requantized_twice = quantize_like(layer, quantize_like(layer, first) + d2[key])
        assert not torch.equal(dequantized(layer), requantized_twice)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # re-drawn: B = 0
    for key in original.keys() - targets(model).keys():  # not LoRA targets: untouched
        assert torch.equal(master[key], original[key])


def test_a_master_without_a_target_is_refused_by_name(tmp_path, model_dir):
    from safetensors.torch import save_file

    from newtune.errors import ModelError

    model = qlora_model(model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    (tmp_path / "bad").mkdir()
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ModelError, match=r"first: model\.layers\.1\.mlp\.down_proj\.weight"):
        check_master(model, tmp_path / "bad")


@pytest.mark.parametrize(("method", "ratio"), [("magnitude", 0.5), ("random", 0.75)])
def test_bitsandbytes_8bit_adam_state_is_pruned(method, ratio):
    """Before, ReLoRA looked only for exp_avg/exp_avg_sq and pruned nothing of AdamW8bit."""
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(5000))  # 8-bit state (blocks of 256)
    small = torch.nn.Parameter(torch.randn(300))  # bitsandbytes keeps it in 32 bits
    optimizer = bnb.optim.AdamW8bit([big, small], lr=1e-3)
    for _ in range(2):
        big.grad, small.grad = torch.randn(5000), torch.randn(300)
        optimizer.step()
    state = optimizer.state[big]
    before = bnb.functional.dequantize_blockwise(
        state["state1"], absmax=state["absmax1"], code=state["qmap1"], blocksize=256
    )
    assert state["state1"].dtype == torch.uint8 and optimizer.state[small]["state1"].dtype == (
        torch.float32
    )
    zeros, total = prune_optimizer(optimizer, [big, small], ratio, method)
    assert total == 2 * (5000 + 300)
    after = bnb.functional.dequantize_blockwise(
        state["state1"], absmax=state["absmax1"], code=state["qmap1"], blocksize=256
    )
    pruned = after == 0
    assert int(pruned.sum()) >= int(ratio * 5000 + 0.5)
    assert zeros >= int(ratio * 5000 + 0.5) * 2 + int(ratio * 300 + 0.5) * 2
    assert int((optimizer.state[small]["state1"] == 0).sum()) == int(ratio * 300 + 0.5)
    if method == "magnitude":
        assert before[pruned].abs().max() <= before[~pruned].abs().min() + 1e-6
    assert torch.equal(after[~pruned], before[~pruned])  # the kept entries keep their codes


@pytest.mark.slow
def test_cli_qlora_relora_run_writes_the_master_and_merge_lora_gives_the_final_model(
    tmp_path, model_dir
):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(  # the shape of Axolotl's llama-2/relora.yml
        tmp_path,
        model_dir,
        data,
        "chat_template",
        adapter="qlora",
        load_in_4bit=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_linear=True,
        max_steps=5,
        learning_rate=0.05,
        relora=True,
        relora_prune_ratio=0.9,
        relora_cpu_offload=False,
        jagged_restart_steps=2,
        jagged_restart_warmup_steps=1,
        optimizer="adamw_bnb_8bit",
    )
    proc = cli("-m", "newtune.cli.main", "train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = " ".join(proc.stderr.split())
    assert "ReLoRA restart 1 at step 2: 14 LoRA layers merged into the base (full-precision" in log
    assert "ReLoRA restart 2 at step 4" in log and "ReLoRA restart 3" not in log
    out = tmp_path / "out"
    master = load_file(str(out / RELORA_BASE / "model.safetensors"))
    original = load_file(str(model_dir / "model.safetensors"))
    assert master.keys() == original.keys()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (master[q] - original[q]).abs().max() > 1e-3  # two restarts merged their deltas
    assert torch.equal(master["model.embed_tokens.weight"], original["model.embed_tokens.weight"])

    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(out / RELORA_BASE)
        expected = PeftModel.from_pretrained(base, out)(ids).logits
    proc = cli("-m", "newtune.cli.main", "merge-lora", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")(ids).logits
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)  # master + final adapter
