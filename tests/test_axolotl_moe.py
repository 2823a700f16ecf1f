"""Axolotl's MoE keys (issue 16): quantize_moe_experts (bitsandbytes on the 3-D expert
parameters, LoRA through lora_target_parameters), use_sonicmoe / use_scattermoe /
experts_implementation: scattermoe (transformers' ExpertsInterface)."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from peft import LoraConfig, get_peft_model
from test_trust_config import cli
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from newtune.config.load import load_config
from newtune.config.machine import machine_problems
from newtune.errors import ConfigError, ModelError
from newtune.models import moe
from newtune.train.compat2 import apply_model_keys

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# measured on this model (seed 0, logits up to ~0.46): 4-bit NF4 max |diff| 0.0022, int8 6.3e-5
TOLERANCE = {4: 1e-2, 8: 5e-4}


def tiny_moe(vocab: int = 128, seed: int = 0) -> Qwen3MoeForCausalLM:
    """2 layers, hidden 32, 4 experts (top 2), stored as 3-D gate_up_proj / down_proj."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return Qwen3MoeForCausalLM(config).eval()


def loaded(tmp_path: Path, **keys):
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({**BASE, **keys}, sort_keys=False))
    return load_config(str(path))


def error_of(tmp_path: Path, **keys) -> str:
    with pytest.raises(ConfigError) as info:
        loaded(tmp_path, **keys)
    return str(info.value)


def lora_on_experts(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    """peft LoRA on `targets`, its B matrices made non-zero so the adapter changes outputs."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[],
                        target_parameters=targets)  # fmt: skip
    torch.manual_seed(1)
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return peft_model


# -- quantize_moe_experts ---------------------------------------------------------------------


def test_transformers_stores_these_experts_as_3d_parameters():
    shapes = {n: tuple(p.shape) for n, p in tiny_moe().named_parameters() if p.ndim == 3}
    assert shapes == {
        f"model.layers.{i}.mlp.experts.{name}": shape
        for i in range(2)
        for name, shape in (("gate_up_proj", (4, 32, 32)), ("down_proj", (4, 32, 16)))
    }


@pytest.mark.parametrize(("bits", "dtype"), [(4, torch.uint8), (8, torch.int8)])
def test_experts_are_stored_quantized_and_the_outputs_stay_close(bits, dtype):
    plain = tiny_moe()
    model = copy.deepcopy(plain)
    before = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "expert" in n)
    names = moe.quantize_expert_parameters(model, bits)
    assert names == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in
                     ("gate_up_proj", "down_proj")]  # fmt: skip
    stored = {n: p for n, p in model.named_parameters() if "expert" in n}
    assert set(stored) == {
        f"model.layers.{i}.mlp.experts.parametrizations.{p}.original"
        for i in range(2)
        for p in ("gate_up_proj", "down_proj")
    }
    assert all(p.dtype == dtype and not p.requires_grad for p in stored.values())
    after = sum(p.numel() * p.element_size() for p in stored.values())
    assert after * (8 if bits == 4 else 4) == before  # fp32 -> 4 bits / 8 bits per weight
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 32, 32)  # read back dequantized, in fp32
    assert experts.gate_up_proj.dtype == torch.float32
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        diff = (model(ids).logits - plain(ids).logits).abs().max().item()
    assert 0 < diff < TOLERANCE[bits]


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_quantized_experts_equals_lora_on_their_dequantized_weights(bits):
    quantized = tiny_moe()
    moe.quantize_expert_parameters(quantized, bits)
    # the same model in plain parameters holding exactly the dequantized values
    plain = tiny_moe()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            for pname in getattr(module, "parametrizations", {}):
                getattr(plain.get_submodule(name), pname).copy_(getattr(module, pname))
    targets = moe.expand_target_parameters(quantized, EXPERTS)
    assert targets == [*EXPERTS, *(f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                   for p in ("gate_up_proj", "down_proj"))]  # fmt: skip
    tuned = lora_on_experts(quantized, targets)
    assert moe.guard_expert_lora(tuned) == 4
    reference = lora_on_experts(plain, EXPERTS)
    reference.load_state_dict(
        {k: v for k, v in tuned.state_dict().items() if "lora_" in k}, strict=False
    )
    ids = torch.randint(0, 128, (2, 12))
    first = tuned(ids).logits
    assert torch.allclose(first, reference(ids).logits, atol=1e-5)
    assert torch.equal(tuned(ids).logits, first)  # no LoRA term left stacked by the forward
    for module in tuned.modules():
        for chain in getattr(module, "parametrizations", {}).values():
            assert len(chain) == 1  # only the dequantization between forwards
    tuned(ids, labels=ids).loss.backward()
    trained = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    assert len(trained) == 8 and all("lora_" in n for n in trained)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())
    frozen = [p for n, p in tuned.named_parameters() if n.endswith(".original")]
    assert len(frozen) == 4 and all(not p.requires_grad and p.grad is None for p in frozen)


def test_a_saved_expert_adapter_loads_onto_quantized_experts(tmp_path):
    """lora_model_dir: an adapter trained on plain experts (suffix targets, peft's nesting)
    loads onto the quantized model under expert_lora, each weight in its own wrapper."""
    from peft import PeftModel

    plain = lora_on_experts(tiny_moe(), EXPERTS)
    plain.save_pretrained(tmp_path / "adapter")
    quantized = tiny_moe()
    moe.quantize_expert_parameters(quantized, 4)
    dequantized = tiny_moe()  # plain parameters holding the dequantized values
    with torch.no_grad():
        for name, module in quantized.named_modules():
            for pname in getattr(module, "parametrizations", {}):
                getattr(dequantized.get_submodule(name), pname).copy_(getattr(module, pname))
    from peft.tuners.tuners_utils import BaseTuner

    original = BaseTuner._inject_parameters
    with moe.expert_lora(quantized):
        loaded_model = PeftModel.from_pretrained(quantized, tmp_path / "adapter")
    assert BaseTuner._inject_parameters is original  # peft's method is put back
    ours, theirs = loaded_model.state_dict(), plain.state_dict()
    keys = [k for k in theirs if "lora_" in k]
    assert len(keys) == 8 and all(torch.equal(ours[k], theirs[k]) for k in keys)
    wrappers = [m for m in loaded_model.modules() if isinstance(m, moe.QuantizedParamWrapper)]
    assert len(wrappers) == 4
    reference = PeftModel.from_pretrained(dequantized, tmp_path / "adapter")
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.allclose(loaded_model(ids).logits, reference(ids).logits, atol=1e-5)


def test_quantize_experts_reads_the_config_and_expands_the_targets(tmp_path):
    cfg = loaded(
        tmp_path, adapter="qlora", load_in_4bit=True, quantize_moe_experts=True,
        lora_target_parameters=EXPERTS, lora_dropout=0,
        bnb_config_kwargs={"bnb_4bit_quant_type": "fp4"},
    ).config  # fmt: skip
    model = tiny_moe()
    out = moe.quantize_experts(model, cfg)
    chain = model.model.layers[1].mlp.experts.parametrizations["down_proj"]
    assert chain[0].quant_state.quant_type == "fp4"
    assert out.lora_target_parameters[:2] == EXPERTS and len(out.lora_target_parameters) == 6
    assert cfg.lora_target_parameters == EXPERTS  # the loaded config is left as it was
    with pytest.raises(ModelError, match="has no 3-D expert parameters"):
        moe.quantize_experts(torch.nn.Sequential(torch.nn.Linear(2, 2)), cfg)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            {"adapter": "lora"},
            "`quantize_moe_experts: true` quantizes the experts with the bits of `load_in_4bit` "
            "or `load_in_8bit`; set one",
        ),
        (
            {"load_in_8bit": True},
            "`quantize_moe_experts: true` freezes the quantized experts; it needs `adapter: "
            "lora` or `qlora`",
        ),
    ],
)
def test_quantize_moe_experts_needs_bits_and_an_adapter(tmp_path, keys, expected):
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({**BASE, "quantize_moe_experts": True, **keys}))
    proc = cli("validate", str(path))
    assert proc.returncode != 0
    assert expected in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr


def moe_folder(tmp_path: Path, chat_tok_dir: Path) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_tok_dir)
    folder = tmp_path / "moe"
    model = tiny_moe(vocab=len(tok))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(tok, key))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("keys", "logged"),
    [
        ({"adapter": "qlora", "load_in_4bit": True}, "4 expert parameters stored in 4-bit (nf4)"),
        (
            {"adapter": "lora", "load_in_8bit": True, "gradient_checkpointing": True},
            "4 expert parameters stored in 8-bit (int8 rows)",
        ),
    ],
)
def test_train_quantizes_the_experts_and_trains_lora_on_them(tmp_path, chat_tok_dir, keys, logged):
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = moe_folder(tmp_path, chat_tok_dir)
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a b c", "output": "d e"}] * 4)
    keys = {
        "base_model": str(folder),
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "output_dir": str(tmp_path / "out"),
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "quantize_moe_experts": True, "lora_target_modules": ["q_proj"],
        "lora_target_parameters": EXPERTS, "lora_dropout": 0, "max_steps": 2,
        "micro_batch_size": 1, "learning_rate": 0.01, "sequence_len": 64, **keys,
    }  # fmt: skip
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(keys))
    proc = cli("train", str(tmp_path / "cfg.yml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"quantize_moe_experts: {logged}" in proc.stderr
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    expert_keys = sorted(k for k in saved if ".experts." in k)
    assert len(expert_keys) == 8  # lora_A/B of gate_up_proj and down_proj in 2 layers
    assert all(saved[k].abs().sum() > 0 for k in expert_keys)
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.experts.gate_up_proj" in adapter["target_parameters"]
    # the adapter loads onto the unquantized model (merge): peft nests the wrappers alike
    plain = PeftModel.from_pretrained(Qwen3MoeForCausalLM.from_pretrained(folder), tmp_path / "out")
    state = plain.state_dict()
    for key in expert_keys:
        assert torch.equal(state[key.replace(".weight", ".default.weight")], saved[key])


# -- experts kernels --------------------------------------------------------------------------


def test_use_sonicmoe_means_transformers_sonicmoe_experts(tmp_path):
    cfg = loaded(tmp_path, use_sonicmoe=True).config
    assert cfg.experts_implementation == "sonicmoe"
    assert any("`experts_implementation: sonicmoe` needs the kernels package" in p
               for p in machine_problems(cfg, "cuda"))  # fmt: skip
    err = error_of(tmp_path, use_sonicmoe=True, experts_implementation="grouped_mm")
    assert "`use_sonicmoe: true` means `experts_implementation: sonicmoe`" in err
    err = error_of(tmp_path, use_sonicmoe=True, use_scattermoe=True)
    assert "`use_scattermoe` and `use_sonicmoe` both choose the experts kernel" in err
    assert loaded(tmp_path, use_sonicmoe=False).config.experts_implementation is None
    model = tiny_moe()
    apply_model_keys(model, cfg)
    assert model.config._experts_implementation == "sonicmoe"
    with pytest.raises(ImportError, match="sonic-moe requires the `kernels` package"):
        model(torch.randint(0, 128, (1, 4)))  # transformers loads the hub kernel on first use


def fake_scattermoe(calls: list) -> types.SimpleNamespace:
    """The two functions of kernels-community/scattermoe, in plain torch (reference semantics:
    rows of x routed to expert weights (experts, in, out) in expert-sorted order)."""

    def flatten_sort_count(expert_idxs, num_experts):
        flat = expert_idxs.flatten()
        sorted_experts, sorted_scattered = torch.sort(flat)
        return (
            sorted_experts,
            sorted_scattered,
            torch.bincount(flat, minlength=num_experts).cumsum(0),
        )

    def parallel_linear(x, weights, k, sorted_experts, sorted_scattered, offsets,
                        expert_biases=None, gates=None, grouped_in=False, grouped_out=False):  # fmt: skip
        calls.append((tuple(weights.shape), k, grouped_in, grouped_out, gates is not None))
        rows = x if grouped_in else x[sorted_scattered // k]
        y = torch.einsum("ni,nio->no", rows, weights[sorted_experts])
        if not grouped_out:
            y = torch.zeros_like(y).index_copy(0, sorted_scattered, y)
        if gates is not None:
            y = (gates.unsqueeze(1) @ y.view(gates.size(0), gates.size(1), -1)).squeeze(1)
        return y

    return types.SimpleNamespace(
        flatten_sort_count=flatten_sort_count, parallel_linear=parallel_linear
    )


def test_scattermoe_registers_the_hub_kernel_and_matches_the_eager_experts(tmp_path, monkeypatch):
    cfg = loaded(tmp_path, use_scattermoe=True).config
    assert cfg.experts_implementation == "scattermoe"
    assert loaded(tmp_path, experts_implementation="scattermoe").config is not None
    problems = " ".join(machine_problems(cfg, "cpu"))
    assert "`experts_implementation: scattermoe` needs the kernels package" in problems
    calls: list = []
    monkeypatch.setattr(moe, "load_scattermoe", lambda: fake_scattermoe(calls))
    eager = tiny_moe()
    eager.set_experts_implementation("eager")
    model = copy.deepcopy(eager)
    assert moe.prepare_experts(model, cfg) is cfg
    assert model.config._experts_implementation == "scattermoe"
    apply_model_keys(model, cfg)  # the Trainer path sets it again: accepted
    ids = torch.randint(0, 128, (2, 12))
    out = model(ids, labels=ids)
    ref = eager(ids, labels=ids)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    assert calls[:2] == [((4, 32, 32), 2, False, True, False), ((4, 16, 32), 1, True, False, True)]
    out.loss.backward()
    ref.loss.backward()
    grad = model.model.layers[0].mlp.experts.down_proj.grad
    assert torch.allclose(grad, eager.model.layers[0].mlp.experts.down_proj.grad, atol=1e-6)


def test_scattermoe_names_the_hub_repo_and_fails_clearly_without_cuda(monkeypatch):
    assert moe.SCATTERMOE_REPO == "kernels-community/scattermoe"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="kernels-community/scattermoe.*needs a CUDA GPU"):
        moe.load_scattermoe()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fetched = []
    fake = types.ModuleType("kernels")
    fake.get_kernel = lambda repo: fetched.append(repo) or fake_scattermoe([])
    monkeypatch.setitem(__import__("sys").modules, "kernels", fake)
    assert moe.load_scattermoe().parallel_linear is not None
    assert fetched == ["kernels-community/scattermoe"]

    def offline(repo):
        raise OSError("offline")

    fake.get_kernel = offline
    with pytest.raises(ModelError, match="could not be loaded from the Hugging Face hub"):
        moe.load_scattermoe()


# -- llama4_linearized_experts ----------------------------------------------------------------


def tiny_llama4() -> torch.nn.Module:
    """2 Llama 4 text layers, both MoE (4 experts, top 1), experts given non-trivial weights."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    config = Llama4TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, intermediate_size_mlp=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
    )  # fmt: skip
    model = Llama4ForCausalLM(config).eval()
    for name, param in model.named_parameters():
        if ".experts." in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def linearized(model: torch.nn.Module) -> torch.nn.Module:
    out = copy.deepcopy(model)
    for layer in out.model.layers:
        fused = layer.feed_forward.experts
        layer.feed_forward.experts = moe.LinearizedLlama4Experts.from_fused(fused, out.config)
    return out


def test_linearized_llama4_experts_equal_the_fused_module():
    fused_model = tiny_llama4()
    fused = fused_model.model.layers[0].feed_forward.experts
    lin = moe.LinearizedLlama4Experts.from_fused(fused, fused_model.config)
    assert len(lin.gate_projs) == 4 and lin.gate_projs[0].weight.shape == (16, 32)
    assert lin.down_projs[3].weight.shape == (32, 16)
    x = torch.randn(4 * 6, 32)
    with torch.no_grad():
        assert (lin(x) - fused(x)).abs().max() < 1e-6
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():  # measured max |diff| 7.5e-8 on the logits
        assert (linearized(fused_model)(ids).logits - fused_model(ids).logits).abs().max() < 1e-6


def test_a_linearized_checkpoint_loads_with_the_key_and_lora_targets_its_experts(tmp_path):
    from newtune.models.load import ModelOptions, load_model

    fused = tiny_llama4()
    linearized(fused).save_pretrained(tmp_path / "lin")
    fused.save_pretrained(tmp_path / "fused")
    cfg = loaded(tmp_path, llama4_linearized_experts=True).config
    options = ModelOptions.from_config(cfg, quantize=False)
    assert options.linearized_llama4 is True
    model = load_model(str(tmp_path / "lin"), options=options).eval()
    experts = model.model.layers[1].feed_forward.experts
    assert type(experts) is moe.LinearizedLlama4Experts
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert (model(ids).logits - fused(ids).logits).abs().max() < 1e-6
    from transformers.models.llama4 import modeling_llama4

    assert modeling_llama4.Llama4TextExperts is not moe.LinearizedLlama4Experts  # restored
    lora = get_peft_model(model, LoraConfig(target_modules=r".*experts\.gate_projs\.[0-9]+$"))
    wrapped = [n for n, _ in lora.named_modules() if n.endswith("lora_A.default")]
    assert len(wrapped) == 8  # 4 experts x 2 layers
    with pytest.raises(ModelError, match="stores Llama 4's fused experts"):
        load_model(str(tmp_path / "fused"), options=options)
    with pytest.raises(ModelError, match="is not a Llama 4 model"):
        tiny_moe().save_pretrained(tmp_path / "qwen")
        load_model(str(tmp_path / "qwen"), options=options)


def test_linearized_llama4_experts_with_reinit_weights_is_refused(tmp_path):
    """reinit_weights loads no checkpoint, so linearizing would load nothing (was ignored)."""
    path = tmp_path / "cfg.yml"
    keys = {"llama4_linearized_experts": True, "reinit_weights": True}
    path.write_text(yaml.safe_dump({**BASE, **keys}))
    proc = cli("validate", str(path))
    assert proc.returncode != 0
    assert (
        "`llama4_linearized_experts: true` with `reinit_weights: true`: linearizing loads a "
        "linearized checkpoint's expert weights, and reinit_weights loads none"
    ) in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr
