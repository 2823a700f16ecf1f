"""`fused_attn_kernel`: the q/k RMSNorm + RoPE region compiled by torch.compile is exact on the
Qwen3 and Gemma 4 families (LoRA, packed rows, gradient checkpointing, KV cache), reaches the
model through `newtune train`, and is refused for other model types.

gcc is present on the test machine, so Inductor's CPU backend (a fused C++ loop) runs for real
in the kernel test, one model test and the CLI run; the other model tests compile the region
with the `aot_eager` backend (the same Dynamo/AOTAutograd capture, no code generation) to keep
the suite fast on a 2-core machine.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import write_jsonl
from test_cli import CHATS, cli
from test_trust_config import cli as newtune_cli
from test_trust_config import error_line
from transformers import AutoModelForCausalLM, AutoTokenizer

import newtune.models.fused_attention as fa
from newtune.errors import ModelError
from newtune.models.fused_attention import apply_fused_attention, is_fused

LENGTHS = (5, 7, 4)  # three rows packed into one: position_ids restart at each
VOCAB = 64


@pytest.fixture
def aot_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compile the fused region with aot_eager (no C++ build) in this test."""
    monkeypatch.setattr(fa, "BACKEND", "aot_eager")


def tiny(kind: str, attn: str = "sdpa") -> Any:
    """A small model of `kind` built offline from its config, fp32, seed 0."""
    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    if kind in ("qwen3", "qwen3_moe"):
        from transformers import Qwen3Config, Qwen3MoeConfig

        cls = Qwen3Config if kind == "qwen3" else Qwen3MoeConfig
        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
        extra = moe if kind == "qwen3_moe" else {}
        config = cls(num_hidden_layers=2, num_key_value_heads=2, head_dim=16, **small, **extra)
    elif kind == "qwen3_5":
        from transformers.models.qwen3_5 import Qwen3_5TextConfig

        config = Qwen3_5TextConfig(
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=16,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            **small,
        )
    else:  # gemma4 text, with shared-KV layers and k=v full-attention layers
        from transformers import Gemma4Config, Gemma4TextConfig

        config = Gemma4TextConfig(
            num_hidden_layers=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            layer_types=["sliding_attention", "full_attention"] * 2,
            sliding_window=3,
            hidden_size_per_layer_input=8,  # per-layer inputs (the shared-KV path needs them)
            vocab_size_per_layer_input=VOCAB,
            num_kv_shared_layers=2,
            attention_k_eq_v=True,
            **small,
        )
        if kind == "gemma4_mm":  # Gemma4ForConditionalGeneration, as gemma-4 checkpoints load
            config = Gemma4Config(
                text_config=config.to_dict(), vision_config=None, audio_config=None
            )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def attention_modules(model: Any) -> list[Any]:
    """The attention modules of the classes newtune fuses."""
    return [m for m in model.modules() if type(m).__name__ in fa.FORWARDS]


def packed() -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and restarting position_ids of three rows packed into one (batch 1)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, sum(LENGTHS)), generator=gen)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return ids, pos


def with_lora(model: Any) -> Any:
    """peft LoRA on q/k/v/o with random (non-zero) A and B, the same for the same seed."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    return get_peft_model(model, config)


def train_step(model: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the trainable parameters' gradients of one packed forward/backward."""
    ids, pos = packed()
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def fused_and_plain(kind: str, reentrant: bool = False) -> tuple[Any, Any]:
    """The same model twice, LoRA-wrapped and in train mode: fused (as build_model does,
    before the adapter) and plain; gradient checkpointing on both."""
    plain = tiny(kind)
    fused = copy.deepcopy(plain)
    assert apply_fused_attention(fused) == len(attention_modules(fused))
    pair = []
    for model in (fused, plain):
        model.config.use_cache = False
        model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        if reentrant:  # the frozen embeddings' output must require grad (as build_model does)
            model.enable_input_require_grads()
        pair.append(with_lora(model).train())
    return pair[0], pair[1]


def assert_same(fused: Any, plain: Any) -> None:
    """Equal logits (1e-5) and equal LoRA gradients (1e-5) on the packed rows."""
    logits, grads = train_step(fused)
    ref_logits, ref_grads = train_step(plain)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert sorted(grads) == sorted(ref_grads)
    assert any("q_proj.lora_B" in n for n in grads) and any("k_proj.lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_inductor_fuses_norm_and_rope_of_q_and_k_into_one_kernel():
    """What the key buys: Inductor (C++ on CPU) turns both norms, both rotations and the
    transposes into a single generated loop, with no library call, equal to eager math."""
    from torch._inductor.utils import run_and_get_code
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    q_norm, k_norm = Qwen3RMSNorm(16), Qwen3RMSNorm(16)
    with torch.no_grad():
        q_norm.weight.uniform_(0.5, 1.5)
        k_norm.weight.uniform_(0.5, 1.5)
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    angle = torch.randn(2, 5, 16)
    cos, sin = angle.cos(), angle.sin()
    fn = torch.compile(fa.norm_rope_qk, backend="inductor")
    (fq, fk), codes = run_and_get_code(fn, q_norm, k_norm, q, k, cos, sin)
    kernels = {name for code in codes for name in re.findall(r"cpp_fused_\w+", code)}
    assert len(kernels) == 1, kernels
    assert not any("extern_kernels." in code for code in codes)
    # transformers' unfused path: norm, transpose, rotate
    eq, ek = apply_rotary_pos_emb(q_norm(q).transpose(1, 2), k_norm(k).transpose(1, 2), cos, sin)
    torch.testing.assert_close(fq, eq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fk, ek, atol=1e-6, rtol=1e-6)


def test_partial_rotary_passes_the_rest_through():
    """Qwen3.5's partial rotary (cos narrower than head_dim): only the first dims rotate."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb

    x, y = torch.randn(2, 5, 3, 16), torch.randn(2, 5, 1, 16)
    angle = torch.randn(2, 5, 8)
    q, k = apply_rotary_pos_emb(x.transpose(1, 2), y.transpose(1, 2), angle.cos(), angle.sin())
    torch.testing.assert_close(fa.rotate(x, angle.cos(), angle.sin()).transpose(1, 2), q)
    torch.testing.assert_close(fa.rotate(y, angle.cos(), angle.sin()).transpose(1, 2), k)
    assert torch.equal(fa.rotate(x, angle.cos(), angle.sin())[..., 8:], x[..., 8:])


# module, attention class, text config class of every class newtune fuses
CLASSES = [
    ("qwen3", "Qwen3Attention", "Qwen3Config"),
    ("qwen3_moe", "Qwen3MoeAttention", "Qwen3MoeConfig"),
    ("qwen3_vl", "Qwen3VLTextAttention", "Qwen3VLTextConfig"),
    ("qwen3_5", "Qwen3_5Attention", "Qwen3_5TextConfig"),
    ("qwen3_5_moe", "Qwen3_5MoeAttention", "Qwen3_5MoeTextConfig"),
    ("gemma4", "Gemma4TextAttention", "Gemma4TextConfig"),
    ("gemma4_unified", "Gemma4UnifiedTextAttention", "Gemma4UnifiedTextConfig"),
]


def attention_pair(module: str, name: str, config_name: str, dtype: torch.dtype) -> tuple:
    """Two copies of one attention layer of `name` (random norm weights), the second fused."""
    import importlib

    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    configuration = importlib.import_module(f"transformers.models.{module}")
    config = getattr(configuration, config_name)(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    plain = getattr(modeling, name)(config, layer_idx=0).to(dtype)
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    fused = copy.deepcopy(plain)
    assert fa.fuse(fused) and is_fused(fused) and not is_fused(plain)
    return plain, fused


def run_layer(layer: Any, hidden: torch.Tensor, rotary: int) -> torch.Tensor:
    """The layer's output on `hidden` with random positions' cos/sin over `rotary` dims."""
    angle = torch.randn(*hidden.shape[:2], rotary, generator=torch.Generator().manual_seed(4))
    cos, sin = angle.cos().to(hidden.dtype), angle.sin().to(hidden.dtype)
    extra = {"shared_kv_states": {}} if "Gemma4" in type(layer).__name__ else {}
    return layer(hidden, (cos, sin), None, **extra)[0]


@pytest.mark.parametrize(("module", "name", "config_name"), CLASSES)
def test_every_fused_class_equals_its_transformers_forward(module, name, config_name, aot_eager):
    """Output, input and weight gradients of one layer; Qwen3.5 with a partial rotary."""
    plain, fused = attention_pair(module, name, config_name, torch.float32)
    rotary = 4 if module.startswith("qwen3_5") else 16
    x = torch.randn(2, 6, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, got = run_layer(plain, x, rotary), run_layer(fused, x2, rotary)
    torch.testing.assert_close(got, out, atol=1e-6, rtol=1e-5)
    out.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-6, rtol=1e-5)
    for (n, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_bf16_inductor_kernel_gives_the_unfused_values_bit_for_bit():
    """Half precision: the region rounds where eager code casts (emulate_precision_casts)."""
    plain, fused = attention_pair("qwen3", "Qwen3Attention", "Qwen3Config", torch.bfloat16)
    x = torch.randn(2, 6, 32).bfloat16()
    with torch.no_grad():
        assert torch.equal(run_layer(fused, x, 16), run_layer(plain, x, 16))


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "qwen3_5", "gemma4", "gemma4_mm"])
def test_fused_equals_plain_under_lora_packing_and_checkpointing(kind, aot_eager):
    fused, plain = fused_and_plain(kind)
    modules = attention_modules(fused)
    assert modules and all(is_fused(m) for m in modules)
    assert not any(is_fused(m) for m in attention_modules(plain))
    assert type(modules[0].q_proj).__module__.startswith("peft.")  # LoRA on the projections
    if kind.startswith("gemma4"):  # shared-KV layers and k=v layers are fused too
        assert any(m.is_kv_shared_layer for m in modules)
        assert any(m.v_proj is None for m in modules if not m.is_kv_shared_layer)
    assert_same(fused, plain)
    assert (fa.norm_rope_qk if kind.startswith("qwen") else fa.norm_rope_q, "aot_eager") in (
        fa._COMPILED
    )


def test_reentrant_checkpointing_recomputes_the_fused_region(aot_eager):
    fused, plain = fused_and_plain("qwen3", reentrant=True)
    assert_same(fused, plain)


def test_inductor_compiled_model_equals_plain_under_lora_packing_and_checkpointing():
    """The real Inductor kernel (C++ on this CPU) in a checkpointed LoRA model on packed rows."""
    fused, plain = fused_and_plain("qwen3")
    assert_same(fused, plain)
    assert (fa.norm_rope_qk, "inductor") in fa._COMPILED


def test_packed_rows_equal_the_rows_alone(aot_eager):
    """Restarting position_ids restart the rotation inside the fused region."""
    model = tiny("qwen3").eval()
    apply_fused_attention(model)
    ids, pos = packed()
    with torch.no_grad():
        whole = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        start = 0
        for n in LENGTHS:
            alone = model(input_ids=ids[:, start : start + n]).logits[0]
            torch.testing.assert_close(whole[start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


@pytest.mark.parametrize("kind", ["qwen3", "gemma4"])
def test_generation_with_a_kv_cache_matches_the_plain_model(kind, aot_eager):
    plain = tiny(kind).eval()
    fused = copy.deepcopy(plain)
    apply_fused_attention(fused)
    prompt = packed()[0][:, :6]
    kwargs = dict(
        max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        ours, ref = fused.generate(prompt, **kwargs), plain.generate(prompt, **kwargs)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_whole_model_torch_compile_traces_through_the_fused_attention(aot_eager):
    """`torch_compile: true`: Dynamo compiles the model with the rewritten attention inside."""
    plain = tiny("qwen3").eval()
    fused = copy.deepcopy(plain)
    apply_fused_attention(fused)
    whole = torch.compile(fused, backend="aot_eager")
    ids, pos = packed()
    with torch.no_grad():
        got = whole(input_ids=ids, position_ids=pos, use_cache=False).logits
        want = plain(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_with_gemma4_hybrid_attention(aot_eager):
    """The Gemma 4 examples also set gemma4_hybrid_attn_impl: the fused forward reads each
    layer's own attention config and mask (sdpa on the full-attention layers)."""
    from newtune.models.hybrid_attention import apply_hybrid_attention

    plain = tiny("gemma4", "eager").eval()
    fused = copy.deepcopy(plain)
    apply_hybrid_attention(plain)
    apply_hybrid_attention(fused)
    apply_fused_attention(fused)
    ids, pos = packed()
    with torch.no_grad():
        got = fused(input_ids=ids, position_ids=pos, use_cache=False).logits
        want = plain(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_other_model_types_are_refused_when_the_model_loads(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ModelError) as info:
        apply_fused_attention(model)
    message = str(info.value)
    assert "the loaded model is of type `llama`" in message
    assert "Supported model types: qwen3, qwen3_moe, qwen3_vl" in message and "gemma4" in message
    assert not any(is_fused(m) for m in model.modules())


def _config(tmp_path: Path, base: str, **keys: Any) -> str:
    path = tmp_path / "cfg.yml"
    data = {"base_model": base, "datasets": [{"path": "d.jsonl", "type": "alpaca"}], **keys}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_validate_refuses_a_local_model_of_another_type(tmp_path, model_dir):
    err = error_line(
        newtune_cli("validate", _config(tmp_path, str(model_dir), fused_attn_kernel=True))
    )
    assert f"the model `{model_dir}` is of type `llama`" in err
    assert "Supported model types: qwen3, qwen3_moe" in err and "Remove the key" in err


def test_validate_accepts_supported_and_not_yet_downloaded_models(tmp_path):
    folder = tmp_path / "g4"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma4"}))
    for base in (str(folder), "Qwen/not-in-this-cache-xyz"):  # the hub id is checked at load
        proc = newtune_cli("validate", _config(tmp_path, base, fused_attn_kernel=True))
        assert proc.returncode == 0, proc.stderr
        assert "fused_attn_kernel: true" in proc.stdout
        assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory, chat_tok_dir: Path) -> Path:
    """A 2-layer Qwen3 with the ChatML tokenizer, saved as a transformers folder."""
    from conftest import save_tiny
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(chat_tok_dir)
    folder = tmp_path_factory.mktemp("qwen3")
    return save_tiny(folder, tok, Qwen3Config, Qwen3ForCausalLM, head_dim=16)


@pytest.mark.parametrize(
    "example", ["qwen3/8b-lora-fused-attn.yaml", "qwen3/8b-lora-fused-attn-compile.yaml"]
)
def test_axolotl_examples_validate(example):
    path = Path("/work/axolotl/examples") / example
    if not path.is_file():
        pytest.skip("Axolotl examples not here")
    assert yaml.safe_load(path.read_text())["fused_attn_kernel"] is True
    proc = newtune_cli("validate", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "fused_attn_kernel: true" in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [{}, {"torch_compile": True, "torch_compile_backend": "aot_eager"}],
    ids=["fused", "whole_model_compiled"],
)
def test_cli_trains_two_steps_with_the_fused_attention(tmp_path, qwen3_dir, extra):
    """`newtune train` (Inductor on CPU) with LoRA, packing and gradient checkpointing; and
    under `torch_compile: true` (aot_eager here: Inductor over the whole model is minutes on
    this CPU), where the whole-model compile traces the fused attention."""
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    cfg = {
        "base_model": str(qwen3_dir),
        "datasets": [{"path": str(data), "type": "chat_template"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_linear": True,
        "sample_packing": True,
        "gradient_checkpointing": True,
        "fused_attn_kernel": True,
        **extra,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = cli("-m", "newtune.cli.main", "train", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fused_attn_kernel: 2 attention modules run the fused q/k norm + RoPE" in proc.stderr
    out = tmp_path / "out"
    history = json.loads((out / "log_history.json").read_text())
    assert max(h["step"] for h in history) == 2
    assert all(h["loss"] == h["loss"] for h in history if "loss" in h)  # no NaN
    assert (out / "adapter_model.safetensors").is_file()
