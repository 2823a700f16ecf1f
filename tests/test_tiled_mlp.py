"""`tiled_mlp`: the MLP over sequence shards is exact and keeps one shard's intermediates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from test_cli import CHATS, cli, make_config
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from newtune.config.load import load_config
from newtune.config.resolve import resolve
from newtune.errors import ModelError
from newtune.models.fused_mlp import FusedGatedMLP
from newtune.models.load import build_model
from newtune.models.tiled_mlp import TOKENS_PER_SHARD, _Tiled, apply_tiled_mlp, shard_count
from newtune.models.tokenizer import load_tokenizer

HIDDEN, INTER = 16, 40


class Holder(torch.nn.Module):
    """One decoder-layer-like parent holding an `mlp`."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = mlp


def _llama_mlp(seed: int = 0) -> LlamaMLP:
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=2)
    torch.manual_seed(seed)
    mlp = LlamaMLP(config)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return mlp


def _run(mlp: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output, and the gradients of x and of every weight under a fixed upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    mlp.zero_grad()
    y = mlp(x)
    torch.manual_seed(1)
    y.backward(torch.randn_like(y))
    grads = {"x": x.grad, **{n: p.grad for n, p in mlp.named_parameters()}}
    return y.detach(), grads


@pytest.mark.parametrize("deepspeed", [False, True], ids=["checkpoint", "deepspeed"])
@pytest.mark.parametrize("seq", [7, 10, 13])
@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_tiled_mlp_equals_the_plain_mlp(shards, seq, deepspeed):
    if deepspeed:
        pytest.importorskip("deepspeed")
    x = torch.randn(2, seq, HIDDEN)
    want_y, want = _run(_llama_mlp(), x)
    holder = Holder(_llama_mlp())
    assert apply_tiled_mlp(holder, num_shards=shards, deepspeed=deepspeed) == 1
    y, got = _run(holder.mlp, x)
    torch.testing.assert_close(y, want_y, atol=1e-6, rtol=0)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)
    if deepspeed:  # ZeRO may reduce the gradients: the last of the (padded) shards was run
        assert all(p.ds_grad_is_ready for p in holder.mlp.parameters())


def test_generic_gated_forward_and_the_fused_mlp_tile_exactly():
    x = torch.randn(1, 11, HIDDEN)
    want_y, want = _run(_llama_mlp(), x)
    generic = Holder(_llama_mlp())
    apply_tiled_mlp(generic, num_shards=3, use_original_mlp=False)
    y, got = _run(generic.mlp, x)
    torch.testing.assert_close(y, want_y, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["x"], want["x"], atol=1e-6, rtol=0)
    fused = Holder(FusedGatedMLP(_llama_mlp()))
    apply_tiled_mlp(fused, num_shards=4)
    y, got = _run(fused.mlp, x)
    torch.testing.assert_close(y, want_y, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["x"], want["x"], atol=1e-6, rtol=0)
    gate, up = got["gate_up_proj.weight"].split(INTER)
    torch.testing.assert_close(gate, want["gate_proj.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(up, want["up_proj.weight"], atol=1e-6, rtol=0)


def _saved_activation_bytes(mlp: torch.nn.Module, x: torch.Tensor) -> tuple[int, list]:
    """Bytes of the non-weight tensors autograd keeps from forward to backward, and the shapes
    of the act_fn inputs computed during backward (the recomputed shards)."""
    weights = {p.data_ptr() for p in mlp.parameters()}
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mlp(x)
    in_backward: list = []
    inner = mlp.act_fn
    handle = inner.register_forward_hook(lambda m, a, o: in_backward.append(tuple(a[0].shape)))
    y.sum().backward()
    handle.remove()
    return sum(saved), in_backward


def test_only_shard_inputs_are_kept_and_backward_recomputes_one_shard_at_a_time():
    batch, seq = 2, 12
    x = torch.randn(batch, seq, HIDDEN, requires_grad=True)
    plain, plain_recomputed = _saved_activation_bytes(_llama_mlp(), x)
    f32 = 4
    # gate/up inputs (x twice), silu input, silu output and up (the mul), the down input
    assert plain == f32 * batch * seq * (2 * HIDDEN + 4 * INTER)
    assert plain_recomputed == []  # nothing recomputed without tiling
    holder = Holder(_llama_mlp())
    apply_tiled_mlp(holder, num_shards=3)
    tiled, recomputed = _saved_activation_bytes(holder.mlp, x)
    assert tiled == f32 * batch * seq * HIDDEN  # the three shards of x, nothing else
    assert plain / tiled == (2 * HIDDEN + 4 * INTER) / HIDDEN  # 12x less here
    # backward rebuilt the intermediates one shard at a time, last shard first
    assert recomputed == [(batch, 4, INTER)] * 3


def test_default_shard_count_is_one_per_32k_tokens():
    assert TOKENS_PER_SHARD == 32768
    assert [shard_count(n, None, False) for n in (1, 32768, 32769, 500_000)] == [1, 1, 2, 16]
    assert shard_count(10, 4, False) == 4


def test_models_without_a_dense_mlp_are_refused():
    with pytest.raises(ModelError, match=r"this model has none \(its `mlp` modules: none"):
        apply_tiled_mlp(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ModelError, match=r"`transformer.h.0.mlp` \(GPT2MLP\) has no such layout"):
        apply_tiled_mlp(gpt2, use_original_mlp=False)
    assert apply_tiled_mlp(gpt2, num_shards=2) == 1  # its own forward tiles


def _built(tmp_path: Path, model_dir: Path, **keys):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    path = make_config(tmp_path, model_dir, data, "chat_template", **keys)
    config = load_config(path).config
    tok, new_ids = load_tokenizer(config)
    return build_model(config, resolve(config), tok, new_ids)


def test_keys_reach_the_model(tmp_path, model_dir):
    model = _built(tmp_path, model_dir, tiled_mlp=True, tiled_mlp_num_shards=3)
    tiles = [layer.mlp.forward for layer in model.model.layers]
    assert all(isinstance(t, _Tiled) for t in tiles) and len(tiles) == 2
    assert [(t.num_shards, t.deepspeed, t.inner) for t in tiles] == [
        (3, False, LlamaMLP.forward)
    ] * 2
    ds = _built(tmp_path, model_dir, tiled_mlp=True, deepspeed="zero3")
    assert [layer.mlp.forward.deepspeed for layer in ds.model.layers] == [True, True]
    both = _built(tmp_path, model_dir, tiled_mlp=True, flash_attn_fuse_mlp=True)
    mlp = both.model.layers[0].mlp
    assert isinstance(mlp, FusedGatedMLP) and mlp.forward.inner is FusedGatedMLP.forward


def test_tiled_model_with_gradient_checkpointing_matches_the_plain_model(model_dir):
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tiled = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    apply_tiled_mlp(tiled, num_shards=4)
    tiled.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiled.train()
    plain.train()
    ids = torch.tensor(
        [[1, 5, 9, 42, 7, 3, 11, 2, 8, 13, 21], [4, 4, 8, 15, 16, 23, 42, 1, 1, 2, 3]]
    )
    losses = []
    for model in (plain, tiled):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    grads = dict(plain.named_parameters())
    for name, p in tiled.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=0, msg=name)


def _validate(tmp_path: Path, model_dir: Path, **keys):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    path = make_config(tmp_path, model_dir, data, "chat_template", **keys)
    return cli("-m", "newtune.cli.main", "validate", str(path))


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"tiled_mlp_num_shards": 4},
            "`tiled_mlp_num_shards: 4` configure `tiled_mlp`, which is off",
        ),
        ({"tiled_mlp_use_original_mlp": False}, "`tiled_mlp_use_original_mlp: false` configure"),
        ({"tiled_mlp": True, "liger_glu_activation": True}, "would silently undo the tiling"),
        (
            {"tiled_mlp": True, "tiled_mlp_use_original_mlp": False, "flash_attn_fuse_mlp": True},
            "packs those into `gate_up_proj`",
        ),
        ({"tiled_mlp": True, "tiled_mlp_num_shards": 0}, "tiled_mlp_num_shards"),
    ],
)
def test_tiled_mlp_conflicts_are_refused_at_validate(tmp_path, model_dir, keys, message):
    proc = _validate(tmp_path, model_dir, **keys)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_trains_two_steps_with_the_losses_of_the_plain_run(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    losses = []
    for name, keys in (("plain", {}), ("tiled", {"tiled_mlp": True, "tiled_mlp_num_shards": 3})):
        (tmp_path / name).mkdir()
        cfg = make_config(tmp_path / name, model_dir, data, "chat_template", max_steps=2, **keys)
        proc = cli("-m", "newtune.cli.main", "train", str(cfg))
        assert proc.returncode == 0, proc.stderr[-3000:]
        if keys:
            assert "tiled_mlp: 2 MLP modules tiled (3 shards, torch checkpoint per shard)" in (
                proc.stderr
            )
        history = json.loads((tmp_path / name / "out" / "log_history.json").read_text())
        losses.append([h["loss"] for h in history if "loss" in h])
    assert len(losses[0]) == 2
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert (tmp_path / "tiled" / "out" / "model.safetensors").is_file()


def test_each_weight_gradient_is_accumulated_once_per_backward():
    """DDP's and FSDP2's gradient hooks run when a weight's gradient is accumulated: with the
    checkpoint per shard the engine sums the shards' gradients first, so they run once."""
    holder = Holder(_llama_mlp())
    apply_tiled_mlp(holder, num_shards=4)
    calls = {name: 0 for name, _ in holder.mlp.named_parameters()}
    for name, p in holder.mlp.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda _p, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    holder.mlp(torch.randn(2, 10, HIDDEN, requires_grad=True)).sum().backward()
    assert calls == {"gate_proj.weight": 1, "up_proj.weight": 1, "down_proj.weight": 1}


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def _assert_same_weights(a: dict, b: dict, tol: float) -> None:
    assert sorted(a) == sorted(b) and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


@pytest.mark.slow
def test_ddp_two_cpu_ranks_train_the_same_weights_tiled_or_not(tmp_path, model_dir):
    from test_cli import train_on_two_cpu_ranks

    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    for name, keys in (("plain", {}), ("tiled", {"tiled_mlp": True, "tiled_mlp_num_shards": 3})):
        (tmp_path / name).mkdir()
        cfg = make_config(tmp_path / name, model_dir, data, "chat_template", max_steps=2, **keys)
        proc = train_on_two_cpu_ranks(cfg)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("MLP modules tiled" in proc.stderr) == bool(keys)
    plain, tiled = (_final_weights(tmp_path / n / "out") for n in ("plain", "tiled"))
    _assert_same_weights(plain, tiled, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # ZeRO-2 passed too; left out to keep the suite short
def test_zero_two_cpu_ranks_run_deepspeeds_tiled_mlp(tmp_path, model_dir, stage):
    """ZeRO reduces the MLP gradients after the last shard (and ZeRO-3 gathers the weights once
    per shard on both ranks): the weights equal a run without tiling."""
    pytest.importorskip("deepspeed")
    from test_distributed import _ds_run

    from newtune.train.distributed import load_deepspeed_config

    ds = load_deepspeed_config(f"zero{stage}")
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition tiny weights
    outs = {}
    for name, keys in (("plain", {}), ("tiled", {"tiled_mlp": True, "tiled_mlp_num_shards": 3})):
        (tmp_path / name).mkdir()
        _ds_run(tmp_path / name, model_dir, ds, **keys)
        outs[name] = _final_weights(tmp_path / name / "out")
    _assert_same_weights(outs["plain"], outs["tiled"], 1e-5)
