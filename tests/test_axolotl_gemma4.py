"""gemma4_hybrid_attn_impl: Gemma 4's full-attention layers on sdpa, the sliding ones on the
configured attention (eager here; flash_attention_2 on a GPU box), with correct packed masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_trust_config import cli, error_line
from transformers import AutoModelForCausalLM
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    find_packed_sequence_indices,
    flash_attention_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from newtune.errors import ModelError
from newtune.models.hybrid_attention import apply_hybrid_attention, text_model
from newtune.models.load import ModelOptions, load_model

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
LENGTHS = (5, 7, 4)  # three rows packed into one: position_ids restart at each
VARLEN = "newtune_test_varlen"  # a flash-attention stand-in (its mask format, packing by position)


def write(tmp_path: Path, **keys: Any) -> str:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({**BASE, **keys}, sort_keys=False))
    return str(path)


def tiny(kind: str, attn: str) -> Any:
    """A 4-layer Gemma 4 (or Gemma 4 unified) text model, sliding window 3, built offline;
    `gemma4_mm`: the same inside Gemma4ForConditionalGeneration (what gemma-4 checkpoints load)."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=32,  # the full-attention layers' larger head_dim (512 in Gemma 4)
        layer_types=TYPES,
        sliding_window=3,
    )
    if kind in ("gemma4", "gemma4_mm"):
        from transformers import Gemma4Config, Gemma4TextConfig

        config = Gemma4TextConfig(hidden_size_per_layer_input=0, **common)
        if kind == "gemma4_mm":  # Gemma4ForConditionalGeneration (model_type gemma4), no towers
            config = Gemma4Config(
                text_config=config.to_dict(), vision_config=None, audio_config=None
            )
    else:
        from transformers.models.gemma4_unified import Gemma4UnifiedTextConfig

        config = Gemma4UnifiedTextConfig(**common)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def _module(model: Any) -> Any:
    import importlib

    return importlib.import_module(type(model).__module__)


def spy(monkeypatch: pytest.MonkeyPatch, model: Any) -> dict[str, list[int]]:
    """Record which layers run eager and which run sdpa."""
    ran: dict[str, list[int]] = {"eager": [], "sdpa": []}
    mod = _module(model)
    eager, sdpa = mod.eager_attention_forward, ALL_ATTENTION_FUNCTIONS["sdpa"]

    def eager_spy(module: Any, *args: Any, **kwargs: Any) -> Any:
        ran["eager"].append(module.layer_idx)
        return eager(module, *args, **kwargs)

    def sdpa_spy(module: Any, *args: Any, **kwargs: Any) -> Any:
        ran["sdpa"].append(module.layer_idx)
        return sdpa(module, *args, **kwargs)

    monkeypatch.setattr(mod, "eager_attention_forward", eager_spy)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", sdpa_spy)
    return ran


def rows() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, 64, (n,), generator=gen) for n in LENGTHS]


@torch.no_grad()
def packed_and_alone(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the rows packed in one row (position_ids restart, no mask), and one by one."""
    seqs = rows()
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    alone = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in seqs])
    return packed, alone


@pytest.mark.parametrize("kind", ["gemma4", "gemma4_mm", "gemma4_unified"])
def test_global_layers_run_sdpa_and_packed_rows_stay_apart(kind, monkeypatch):
    model = tiny(kind, "eager")
    reference = packed_and_alone(model)[1]
    assert apply_hybrid_attention(model) == 2
    ran = spy(monkeypatch, model)
    packed, alone = packed_and_alone(model)
    assert ran["sdpa"] == [1, 3] * 4 and ran["eager"] == [0, 2] * 4  # 1 packed + 3 alone
    assert model.config._attn_implementation == "eager"  # the model's own config is untouched
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, reference, atol=1e-5, rtol=1e-5)  # the same model


def _varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kw):
    """Flash-attention's contract: a 2D padding mask or none, packed rows told apart by their
    restarting position_ids, the sliding window from the module (eager underneath)."""
    assert attention_mask is None or attention_mask.dim() == 2
    pos = kw.pop("position_ids")
    doc = find_packed_sequence_indices(pos)
    doc = torch.zeros_like(pos) if doc is None else doc
    n = pos.shape[-1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None]
    allow = (doc[:, :, None] == doc[:, None, :]) & (k <= q)
    if kw.get("sliding_window"):
        allow &= q - k < kw["sliding_window"]
    if attention_mask is not None:
        allow = allow & attention_mask[:, None, :].bool()
    mask = torch.zeros(allow.shape, dtype=query.dtype).masked_fill(
        ~allow, torch.finfo(query.dtype).min
    )
    return _module_eager(module)(module, query, key, value, mask[:, None], **kw)


def _module_eager(module: Any) -> Any:
    import importlib

    return importlib.import_module(type(module).__module__).eager_attention_forward


@pytest.fixture
def varlen(monkeypatch: pytest.MonkeyPatch) -> str:
    """Register the flash-attention stand-in (attention and mask) for this test only."""
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, VARLEN, _varlen_attention)
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, VARLEN, flash_attention_mask)
    return VARLEN


@pytest.mark.parametrize("kind", ["gemma4", "gemma4_mm", "gemma4_unified"])
def test_global_sdpa_layers_get_the_block_diagonal_mask_under_a_flash_style_model(kind, varlen):
    """Under flash-attention the model hands the full-attention layers no mask for packed rows;
    the hybrid rebuilds sdpa's block-diagonal mask from position_ids."""
    model = tiny(kind, varlen)
    packed, alone = packed_and_alone(model)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)  # the stand-in is exact
    apply_hybrid_attention(model)
    packed, alone = packed_and_alone(model)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    for layer in text_model(model).layers:  # without the mask hook sdpa reads one sequence
        layer.self_attn._forward_pre_hooks.clear()
    packed, alone = packed_and_alone(model)
    assert not torch.allclose(packed[LENGTHS[0] :], alone[LENGTHS[0] :], atol=1e-3)


def test_padded_batch_matches_the_unpadded_rows(varlen):
    """A padded batch (2D attention_mask) under the flash-style model: the sdpa layers' mask
    keeps the padding out."""
    model = tiny("gemma4", varlen)
    apply_hybrid_attention(model)
    seqs = rows()[:2]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for i, s in enumerate(seqs):
            alone = model(input_ids=s[None], use_cache=False).logits[0]
            torch.testing.assert_close(batch[i, : len(s)], alone, atol=1e-5, rtol=1e-5)


def test_load_model_applies_it_and_refuses_other_models(tmp_path, model_dir):
    """The hook in load_model: Gemma 4 gets it; a Llama is refused with one paragraph."""
    tiny("gemma4", "eager").save_pretrained(tmp_path / "g4")
    loaded = load_model(
        str(tmp_path / "g4"), options=ModelOptions(attn="eager", hybrid_attention=True)
    )
    impls = [layer.self_attn.config._attn_implementation for layer in loaded.model.layers]
    assert impls == ["eager", "sdpa", "eager", "sdpa"]
    with pytest.raises(ModelError) as info:
        load_model(str(model_dir), options=ModelOptions(hybrid_attention=True))
    assert "`llama`, not Gemma 4" in str(info.value) and "remove the key" in str(info.value)


def test_validate_defaults_flash_attention_and_refuses_another(tmp_path):
    proc = cli("validate", write(tmp_path, gemma4_hybrid_attn_impl=True))
    assert proc.returncode == 0, proc.stderr
    assert "attn_implementation: flash_attention_2" in proc.stdout
    assert "Traceback" not in proc.stderr
    err = error_line(
        cli("validate", write(tmp_path, gemma4_hybrid_attn_impl=True, attn_implementation="sdpa"))
    )
    assert "`gemma4_hybrid_attn_impl: true`" in err and "`attn_implementation` is `sdpa`" in err
    proc = cli(
        "validate",
        write(tmp_path, gemma4_hybrid_attn_impl=True, attn_implementation="flash_attention_2"),
    )
    assert proc.returncode == 0, proc.stderr


def test_fused_attn_kernel_validates_with_the_hybrid(tmp_path):
    """Implemented now (models/fused_attention.py, tests/test_fused_attn.py)."""
    proc = cli("validate", write(tmp_path, fused_attn_kernel=True, gemma4_hybrid_attn_impl=True))
    assert proc.returncode == 0, proc.stderr
    assert "fused_attn_kernel: true" in proc.stdout


def test_generation_with_a_kv_cache_matches_the_model_without_the_hybrid(varlen):
    """Decoding with a cache: each full-attention layer's mask is sized to its own cache (the
    second one must not see the first one's update), so greedy scores match."""
    import copy

    model = tiny("gemma4", varlen)
    plain = copy.deepcopy(model)
    apply_hybrid_attention(model)
    prompt = rows()[1][None]
    kwargs = dict(
        max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        ours, ref = model.generate(prompt, **kwargs), plain.generate(prompt, **kwargs)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_gradients_under_gradient_checkpointing_equal_the_rows(varlen):
    """Training: checkpointed layers recompute with the same sdpa mask; the packed row's
    gradients equal the sum of the rows' gradients."""
    model = tiny("gemma4", varlen).train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_hybrid_attention(model)
    seqs = rows()
    weight = torch.randn(sum(LENGTHS), 64, generator=torch.Generator().manual_seed(2))
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    (model(input_ids=ids, position_ids=pos).logits[0] * weight).sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    start = 0
    for s in seqs:
        (model(input_ids=s[None]).logits[0] * weight[start : start + len(s)]).sum().backward()
        start += len(s)
    q_proj = "model.layers.3.self_attn.q_proj.weight"  # a full-attention layer
    assert q_proj in packed
    for name, grad in packed.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-4, rtol=1e-4)
