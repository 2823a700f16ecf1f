"""Review regressions: shared-prompt DPO packing and MoE patches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

datasets = pytest.importorskip("datasets")

ROWS = [
    {"prompt_ids": [3, 4, 5, 6, 7, 8], "chosen_ids": [9, 10, 11, 12], "rejected_ids": [13, 14, 15]},
    {"prompt_ids": [16, 17, 18], "chosen_ids": [19, 20], "rejected_ids": [21, 22, 23, 24, 25]},
]


def _tiny(kind: str, attn: str):
    """A 2-layer causal LM whose attention is local in some or all layers (window 4)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if kind == "mistral":  # every layer slides
        model = MistralForCausalLM(MistralConfig(sliding_window=4, **common))
    elif kind == "qwen2":  # mixed: layer 0 full, layer 1 sliding
        config = Qwen2Config(
            use_sliding_window=True, sliding_window=4, max_window_layers=1, **common
        )
        model = Qwen2ForCausalLM(config)
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.config._attn_implementation = attn
    return model.eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_reference_logps_equal_padded(kind, attn):
    """precompute's packed scoring of a sliding-window model gives the padded log-probs (a shared
    prompt's 4-D mask would replace the window with full causal attention)."""
    from newtune.train.methods.base import Reference, mask_attention
    from newtune.train.methods.dpo import DPOMethod
    from newtune.train.methods.reference import score_split

    model = _tiny(kind, attn)
    assert mask_attention(model, attn) is None
    method = DPOMethod(SimpleNamespace(rl="dpo"))
    ds = datasets.Dataset.from_list(ROWS)
    ref = Reference("model", model)
    cpu = torch.device("cpu")
    padded = score_split(method, ref, model, ds, 2, 0, cpu)
    packed = score_split(method, ref, model, ds, 2, 0, cpu, capacity=64, attention=attn)
    for key, values in padded.items():
        assert packed[key] == pytest.approx(values, abs=1e-5), key


def test_full_attention_models_keep_shared_prompts():
    from newtune.train.methods.base import mask_attention

    assert mask_attention(_tiny("llama", "sdpa"), "sdpa") == "sdpa"
    assert mask_attention(_tiny("llama", "eager"), "eager") == "eager"
