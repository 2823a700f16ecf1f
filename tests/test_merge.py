"""Streaming merge-lora: equal to peft's merge_and_unload, shard by shard, atomic."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from newtune.models import merge as merge_mod
from newtune.models.merge import merge_lora
from newtune.models.streaming_merge import base_shards


def llama(tied: bool = False, vocab: int = 96) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4))


def build(tmp_path, model, lora: dict, resize: int | None = None, perturb: tuple = ()):
    """Save the base in small shards and a random adapter; return (base, adapter) folders."""
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size="40KB")
    assert len(base_shards(base)) > 2
    if resize:
        model.resize_token_embeddings(resize)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if any(p in name for p in perturb):
                param.add_(torch.randn_like(param))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    return base, adapter


def peft_merged(base, adapter, cls, resize: int | None = None) -> dict:
    from peft import PeftModel

    model = cls.from_pretrained(base, dtype=torch.float32)
    if resize:
        model.resize_token_embeddings(resize)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def streamed(tmp_path, base, adapter, cls, monkeypatch, streaming: bool = True) -> dict:
    calls = []
    real = merge_mod._merge_in_memory
    monkeypatch.setattr(
        merge_mod, "_merge_in_memory", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    out = merge_lora(str(base), str(adapter), tmp_path / "merged", "float32", _Tok())
    assert (not calls) is streaming
    return {k: v.detach() for k, v in cls.from_pretrained(out).state_dict().items()}


class _Tok:
    """Stands in for the tokenizer merge-lora saves beside the weights."""

    def save_pretrained(self, folder) -> None:
        (folder / "tokenizer_config.json").write_text("{}")


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)


QV = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.mark.parametrize(
    ("name", "lora", "tied"),
    [
        ("plain", QV, False),
        (
            "rslora and patterns",
            {
                **QV,
                "use_rslora": True,
                "rank_pattern": {"v_proj": 2},
                "alpha_pattern": {"down_proj": 3},
            },
            False,
        ),
        (
            "tied embeddings, LoRA on them",
            {**QV, "target_modules": ["q_proj", "embed_tokens"]},
            True,
        ),
    ],
)
def test_streaming_merge_equals_peft(tmp_path, monkeypatch, name, lora, tied):
    base, adapter = build(tmp_path, llama(tied), lora)
    expected = peft_merged(base, adapter, LlamaForCausalLM)
    assert_same(streamed(tmp_path, base, adapter, LlamaForCausalLM, monkeypatch), expected)


def test_modules_to_save_replace_whole_tensors(tmp_path, monkeypatch):
    lora = {**QV, "modules_to_save": ["lm_head"]}
    base, adapter = build(tmp_path, llama(), lora, perturb=("modules_to_save",))
    expected = peft_merged(base, adapter, LlamaForCausalLM)
    got = streamed(tmp_path, base, adapter, LlamaForCausalLM, monkeypatch)
    assert not torch.equal(
        got["lm_head.weight"],
        load_file(str(base / _shard_of(base, "lm_head.weight")))["lm_head.weight"],
    )
    assert_same(got, expected)


def test_resized_embeddings_from_added_tokens(tmp_path, monkeypatch):
    lora = {**QV, "modules_to_save": ["embed_tokens", "lm_head"]}
    base, adapter = build(tmp_path, llama(), lora, resize=100, perturb=("modules_to_save",))
    expected = peft_merged(base, adapter, LlamaForCausalLM, resize=100)
    got = streamed(tmp_path, base, adapter, LlamaForCausalLM, monkeypatch)
    assert got["model.embed_tokens.weight"].shape == (100, 32)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 100
    assert_same(got, expected)


def test_fan_in_fan_out_conv1d(tmp_path, monkeypatch):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True}
    base, adapter = build(tmp_path, gpt2(), lora)
    expected = peft_merged(base, adapter, GPT2LMHeadModel)
    assert_same(streamed(tmp_path, base, adapter, GPT2LMHeadModel, monkeypatch), expected)


def test_dora_is_merged_through_peft(tmp_path, monkeypatch):
    base, adapter = build(tmp_path, llama(), {**QV, "use_dora": True})
    expected = peft_merged(base, adapter, LlamaForCausalLM)
    got = streamed(tmp_path, base, adapter, LlamaForCausalLM, monkeypatch, streaming=False)
    assert_same(got, expected)


def test_a_failed_merge_leaves_no_merged_folder(tmp_path, monkeypatch):
    from newtune.models import streaming_merge

    base, adapter = build(tmp_path, llama(), QV)
    written = []
    real = streaming_merge.write_shard

    def dies_on_third(src, dst, *args, **kwargs):
        written.append(dst)
        if len(written) == 3:
            raise OSError("disk full")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(streaming_merge, "write_shard", dies_on_third)
    with pytest.raises(OSError, match="disk full"):
        merge_lora(str(base), str(adapter), tmp_path / "merged", "float32", _Tok())
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def _shard_of(base, name: str) -> str:
    index = base / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"][name]


def test_an_adapter_for_another_model_is_a_clear_error(tmp_path):
    from newtune.errors import ModelError

    base, adapter = build(tmp_path, llama(), QV)
    other = tmp_path / "other"
    gpt2().save_pretrained(other)
    with pytest.raises(ModelError, match="the adapter changes tensors the base model does not"):
        merge_lora(str(other), str(adapter), tmp_path / "merged", "float32", _Tok())
    assert not (tmp_path / "merged").exists()
