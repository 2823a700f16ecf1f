"""Masked-diffusion training (Axolotl's DiffusionPlugin / `diffusion:`): forward process, loss,
bidirectional attention with packed samples isolated, denoising samples, and the CLI."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import write_jsonl
from test_cli import ALPACA, cli
from test_streaming import texts

from newtune.config.schema.compat3 import DiffusionArgs
from newtune.train.methods.diffusion import (
    DiffusionMethod,
    denoise,
    diffusion_forward,
    mask_for_sample,
    sample_sequences,
    segments_of,
)

PLUGIN = "axolotl.integrations.diffusion.DiffusionPlugin"
MASK = 49
BOS, EOS, PAD = 1, 2, 0
AXOLOTL = Path("/work/axolotl/examples/llama-3/diffusion")


def tiny_model(attn: str = "sdpa", vocab: int = 50):
    """A 2-layer random Llama (vocab 50) in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def method(sft: bool = True, **settings) -> DiffusionMethod:
    """A DiffusionMethod with mask id 49 and BOS 1 / EOS 2 / PAD 0 as the special ids."""
    config = types.SimpleNamespace(
        diffusion=DiffusionArgs(mask_token_id=MASK, **settings), datasets=[{}] if sft else None
    )
    m = DiffusionMethod(config)
    m._use(types.SimpleNamespace(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD), MASK)
    return m


def sft_batch() -> dict[str, torch.Tensor]:
    """Two padded SFT rows: BOS, a 3-token prompt (labels -100), a completion ending in EOS."""
    ids = torch.tensor(
        [
            [BOS, 5, 6, 7, 10, 11, 12, 13, 14, EOS, 8, 9],
            [BOS, 20, 21, 22, 30, 31, 32, EOS, PAD, PAD, PAD, PAD],
        ]
    )
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 8:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": (ids != PAD).long()}


def pretrain_batch() -> dict[str, torch.Tensor]:
    """A packed row of two pretraining samples and padding (labels: every token but the first
    of each sample, as the packed collator lays them out)."""
    ids = torch.tensor([[BOS, 5, 6, 7, 8, EOS, BOS, 9, 10, 11, PAD, PAD]])
    labels = ids.clone()
    labels[0, [0, 6, 10, 11]] = -100
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1]])
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


# -- forward process ---------------------------------------------------------------------------


def test_masked_positions_are_exact_for_a_seed():
    m = method(eps=1e-3)
    batch = sft_batch()
    noised = m.noise(batch, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    t = torch.rand(2, generator=gen)
    draws = torch.rand((2, 12), generator=gen)
    p = (1 - 1e-3) * t + 1e-3
    maskable = torch.tensor(
        [
            [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1],  # prompt, BOS and EOS never
            [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0],  # nor padding
        ],
        dtype=torch.bool,
    )
    expected = (draws < p[:, None]) & maskable
    assert torch.equal(noised.masked, expected)
    assert torch.equal(noised.input_ids, torch.where(expected, MASK, batch["input_ids"]))
    assert torch.equal(noised.p_mask, torch.where(maskable, p[:, None].expand(2, 12), 0.0))


@pytest.mark.parametrize("sft", [True, False])
def test_p_one_masks_exactly_the_maskable_tokens(sft):
    m = method(eps=1.0)  # p = 1: every maskable token is masked
    batch = sft_batch() if sft else pretrain_batch()
    noised = m.noise(batch, torch.Generator().manual_seed(0))
    if sft:  # only completion tokens (labels != -100), never BOS/EOS/padding
        assert noised.masked.nonzero().tolist() == [
            [0, 4], [0, 5], [0, 6], [0, 7], [0, 8], [0, 10], [0, 11], [1, 4], [1, 5], [1, 6]
        ]  # fmt: skip
    else:  # pretraining: every token with a label, i.e. all but BOS/EOS/padding
        assert noised.masked.nonzero()[:, 1].tolist() == [1, 2, 3, 4, 7, 8, 9]
    assert noised.input_ids[noised.masked].eq(MASK).all()
    assert torch.equal(noised.input_ids[~noised.masked], batch["input_ids"][~noised.masked])


def test_prompt_tokens_are_never_masked_over_many_draws():
    m = method(eps=1e-3)
    batch = sft_batch()
    seen = torch.zeros(2, 12, dtype=torch.bool)
    for seed in range(200):
        seen |= m.noise(batch, torch.Generator().manual_seed(seed)).masked
    assert not seen[:, :4].any() and not seen[:, 9].any() and not seen[1, 7:].any()
    assert seen[0, 4:9].all() and seen[0, 10:].all() and seen[1, 4:7].all()


# -- loss --------------------------------------------------------------------------------------


def direct_loss(model, m, batch, seed, packed):
    """Axolotl's objective computed directly: full logits under an explicit bidirectional
    same-sample mask, token i read from the output at i - 1 (at a sample start, its own)."""
    noised = m.noise(batch, torch.Generator().manual_seed(seed))
    segments = segments_of(batch)
    allowed = (segments[:, :, None] == segments[:, None, :])[:, None]
    if model.config._attn_implementation == "eager":  # eager adds the mask to the scores
        allowed = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    kwargs = {"position_ids": batch["position_ids"]} if packed else {}
    logits = model(
        input_ids=noised.input_ids, attention_mask=allowed, use_cache=False, **kwargs
    ).logits
    rows = []
    for b in range(batch["input_ids"].shape[0]):
        total = torch.zeros(())
        for i in noised.masked[b].nonzero().squeeze(1).tolist():
            start = i == 0 or segments[b, i] != segments[b, i - 1]
            row = logits[b, i if start else i - 1]
            ce = F.cross_entropy(row[None].float(), batch["input_ids"][b, i][None])
            total = total + ce / noised.p_mask[b, i]
        rows.append(total / max(int((batch["labels"][b] != -100).sum()), 1))
    return torch.stack(rows).mean(), noised


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_loss_equals_a_direct_computation(attn, packed):
    model = tiny_model(attn)
    m = method(sft=not packed, eps=0.5)
    batch = pretrain_batch() if packed else sft_batch()
    loss, metrics = m.loss(model, batch, torch.Generator().manual_seed(11))
    expected, noised = direct_loss(model, m, batch, 11, packed)
    assert noised.masked.sum() >= 3
    assert torch.allclose(loss, expected, atol=1e-5)
    assert metrics["num_masked_tokens"] == noised.masked.sum()
    assert torch.isclose(metrics["mask_ratio"], noised.masked.float().mean())
    p = noised.p_mask[noised.masked]
    assert torch.isclose(metrics["avg_p_mask"], p.mean())
    assert torch.isclose(metrics["importance_weight_avg"], (1 / p).mean())


def test_without_importance_weighting_the_ce_is_not_divided():
    model = tiny_model()
    weighted = method(eps=0.2)
    plain = method(eps=0.2, importance_weighting=False)
    batch = sft_batch()
    a, _ = weighted.loss(model, batch, torch.Generator().manual_seed(3))
    b, metrics = plain.loss(model, batch, torch.Generator().manual_seed(3))
    noised = plain.noise(batch, torch.Generator().manual_seed(3))
    assert "importance_weight_avg" not in metrics
    assert b < a  # p < 1 at every masked token, so dividing by it grows the loss
    logits = diffusion_forward(
        model, noised.input_ids, segments_of(batch), None, noised.masked
    ).float()
    ce = F.cross_entropy(logits, batch["input_ids"][noised.masked], reduction="none")
    rows = noised.masked.nonzero()[:, 0]
    per_row = torch.stack([ce[rows == r].sum() / n for r, n in enumerate((8, 4))])
    assert torch.allclose(b, per_row.mean(), atol=1e-5)


# -- attention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_is_bidirectional_within_a_sample(attn):
    model = tiny_model(attn)
    ids = torch.tensor([[BOS, 5, 6, 7, 8, 9, 10, 11]])
    later = ids.clone()
    later[0, 6] = 30
    seg = torch.ones_like(ids)
    with torch.no_grad():
        a, b = diffusion_forward(model, ids, seg), diffusion_forward(model, later, seg)
        causal_a, causal_b = model(input_ids=ids).logits, model(input_ids=later).logits
    assert not torch.allclose(a[0, 3], b[0, 3], atol=1e-4)  # position 3 sees token 6
    assert torch.allclose(causal_a[0, 3], causal_b[0, 3], atol=1e-6)  # the causal model did not


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_samples_stay_isolated(attn):
    model = tiny_model(attn)
    batch = pretrain_batch()
    other = {**batch, "input_ids": batch["input_ids"].clone()}
    other["input_ids"][0, 7:10] = torch.tensor([40, 41, 42])  # the second sample changes
    seg = segments_of(batch)
    with torch.no_grad():
        a = diffusion_forward(model, batch["input_ids"], seg, batch["position_ids"])
        b = diffusion_forward(model, other["input_ids"], seg, other["position_ids"])
        alone = diffusion_forward(model, batch["input_ids"][:, :6], torch.ones(1, 6).long())
    assert torch.allclose(a[0, :6], b[0, :6], atol=1e-5)  # the first sample does not see it
    assert not torch.allclose(a[0, 7], b[0, 7], atol=1e-4)
    assert torch.allclose(a[0, :6], alone[0], atol=1e-5)  # as if it were alone in its row


def test_logits_to_keep_path_equals_full_logits():
    model = tiny_model()
    batch = pretrain_batch()
    wanted = torch.zeros(1, 12, dtype=torch.bool)
    wanted[0, [1, 2, 6, 7, 9]] = True  # 6 is a sample start: it reads its own output
    seg = segments_of(batch)
    with torch.no_grad():
        full = diffusion_forward(model, batch["input_ids"], seg, batch["position_ids"])
        kept = diffusion_forward(model, batch["input_ids"], seg, batch["position_ids"], wanted)
        raw = model(
            input_ids=batch["input_ids"],
            attention_mask=(seg[:, :, None] == seg[:, None, :])[:, None],
            position_ids=batch["position_ids"],
        ).logits
    assert torch.allclose(kept, full[wanted], atol=1e-5)
    unskipped = diffusion_forward(  # liger's fused head: no logits_to_keep, the same logits
        model, batch["input_ids"], seg, batch["position_ids"], wanted, head_skip=False
    )
    assert torch.allclose(unskipped, kept, atol=1e-5)
    assert torch.allclose(full[0, 6], raw[0, 6]) and torch.allclose(full[0, 7], raw[0, 6])
    assert torch.allclose(full[0, 2], raw[0, 1])


# -- sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_denoise_fills_every_mask_and_keeps_the_rest(temperature):
    model = tiny_model()
    ids = torch.tensor([BOS, 5, 6, MASK, MASK, 9, MASK, MASK, MASK, MASK, 14, EOS])
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    out = denoise(model, ids, MASK, 4, temperature, torch.Generator().manual_seed(0))
    hook.remove()
    assert out.shape == ids.shape and not (out == MASK).any()
    keep = ids != MASK
    assert torch.equal(out[keep], ids[keep])
    assert len(calls) == 4  # 6 masked in 4 steps: 1 (6/4), 1 (5/3), 2 (4/2), then the last 2


def test_complete_fills_new_tokens_and_stops_at_eos(tokenizer):
    from newtune.train.methods.diffusion import complete

    model = tiny_model(vocab=len(tokenizer))
    m = DiffusionMethod(
        types.SimpleNamespace(
            diffusion=DiffusionArgs(mask_token_str="<|im_start|>", num_diffusion_steps=3),
            datasets=None,
        )
    )
    calls, puts = [], []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    streamer = types.SimpleNamespace(put=puts.append, end=lambda: puts.append("end"))
    prompt = tokenizer("The capital of France is")["input_ids"]
    text = complete(m, model, tokenizer, prompt, 6, streamer)
    hook.remove()
    assert m.mask_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert len(calls) == 3  # num_diffusion_steps
    assert puts[0].tolist() == [prompt] and puts[-1] == "end"
    answer = puts[1].tolist()
    assert len(answer) <= 6 and m.mask_token_id not in answer
    assert tokenizer.eos_token_id not in answer
    assert text == tokenizer.decode(answer, skip_special_tokens=True).strip()


def test_samples_mask_the_completion_of_sft_rows_and_random_tokens_otherwise():
    gen = torch.Generator().manual_seed(0)
    picked = sample_sequences(sft_batch(), 5, 100, gen)
    assert len(picked) == 1  # row 2 has 8 real tokens (< 10): skipped
    ids, labels = picked[0]
    assert ids.tolist() == sft_batch()["input_ids"][0].tolist()
    assert mask_for_sample(ids, labels, gen).nonzero().squeeze(1).tolist() == [
        4, 5, 6, 7, 8, 9, 10, 11
    ]  # fmt: skip
    ids = torch.arange(3, 23)
    hidden = mask_for_sample(ids, ids.clone(), torch.Generator().manual_seed(1))
    assert 2 <= int(hidden.sum()) <= 14  # 10-70% of 20 tokens


# -- config ------------------------------------------------------------------------------------


def write(tmp_path: Path, model_dir: Path, **extra) -> Path:
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 2)
    cfg = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "plugins": [PLUGIN],
        **extra,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"plugins": None, "diffusion": {"eps": 0.01}}, "which `plugins` does not list"),
        ({"rl": "dpo"}, "`rl`/`reward_model` ask for preference or reward training"),
        ({"attn_implementation": "flash_attention_2"}, "does not take; use"),
        ({"diffusion": {"min_mask_ratio": 0.9, "max_mask_ratio": 0.1}}, "must be <= max_mask"),
        ({"diffusion": {"noise_schedule": "cubic"}}, "noise_schedule"),
        ({"diffusion": {"epsilon": 0.1}}, "`diffusion.epsilon`"),
        ({"do_causal_lm_eval": True}, "`do_causal_lm_eval` generate token by token"),
        ({"eval_table_size": 4}, "`eval_table_size` generate token by token"),
    ],
)
def test_bad_diffusion_configs_are_refused_at_validate(tmp_path, model_dir, extra, words):
    proc = cli("-m", "newtune.cli.main", "validate", str(write(tmp_path, model_dir, **extra)))
    assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr


def test_null_diffusion_keys_mean_axolotls_defaults(tmp_path, model_dir):
    from newtune.cli.common import load

    cfg = write(tmp_path, model_dir, diffusion={"eps": None, "generation_interval": None})
    settings = load(str(cfg), {}).config.diffusion
    assert settings == DiffusionArgs()
    assert (settings.eps, settings.generation_interval, settings.mask_token_id) == (1e-3, 100, None)
    assert (settings.noise_schedule, settings.importance_weighting) == ("linear", True)


@pytest.mark.skipif(not AXOLOTL.is_dir(), reason="Axolotl's examples are not here")
@pytest.mark.parametrize("name", ["pretrain-1b.yaml", "sft-1b.yaml"])
def test_axolotl_diffusion_examples_validate(name):
    proc = cli("-m", "newtune.cli.main", "validate", str(AXOLOTL / name))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mask_token_id: 128002" in proc.stdout
    assert "noise_schedule and min/max_mask_ratio do not change it" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("mask_id", "words"),
    [
        (100000, "`diffusion.mask_token_id: 100000` is not a token of the model"),
        (0, "the diffusion mask token (id 0) is the tokenizer's BOS, EOS or pad token"),
    ],
)
def test_unusable_mask_token_id_is_refused_at_train(tmp_path, model_dir, mask_id, words):
    cfg = write(tmp_path, model_dir, diffusion={"mask_token_id": mask_id})
    proc = cli("-m", "newtune.cli.main", "train", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert words in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_trains_sft_diffusion_with_packing_eval_and_samples(tmp_path, model_dir):
    from transformers import AutoTokenizer

    mask_id = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|im_start|>")
    diffusion = {
        "mask_token_id": mask_id,
        "generation_interval": 1,
        "num_generation_samples": 2,
        "generation_steps": 4,
        "eps": 0.001,
    }
    cfg = write(
        tmp_path,
        model_dir,
        diffusion=diffusion,
        sample_packing=True,
        eval_sample_packing=True,
        val_set_size=0.25,
        eval_strategy="steps",
        eval_steps=2,
    )
    proc = cli("-m", "newtune.cli.main", "train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file()
    history = json.loads((out / "log_history.json").read_text())
    train = [h for h in history if "loss" in h]
    assert [h["step"] for h in train] == [1, 2]
    for h in train:
        assert {"accuracy", "mask_ratio", "avg_p_mask", "ce_loss", "answer_ratio"} <= set(h)
    evals = [h for h in history if "eval_loss" in h]
    assert evals and "eval_accuracy" in evals[0]
    assert "diffusion sample 1 at step 1" in proc.stderr
    assert "diffusion sample 1 at step 2" in proc.stderr
    assert "[MASK]" in proc.stderr
    # `newtune evaluate` scores the trained model with the same seeded masks as training's eval
    proc = cli("-m", "newtune.cli.main", "evaluate", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-4)
    assert result["eval_accuracy"] == pytest.approx(evals[-1]["eval_accuracy"])
    assert "perplexity" not in result  # not a next-token loss
    # `newtune inference` answers by denoising max_new_tokens mask tokens
    proc = cli(
        "-m", "newtune.cli.main", "inference", str(cfg), "--prompt=Name a color.",
        "--max_new_tokens=4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "<|im_start|>" not in proc.stdout
    assert "answers fill max_new_tokens mask tokens" in proc.stderr


def test_cli_trains_pretraining_diffusion_and_adds_the_mask_token(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "corpus.jsonl", texts(300))
    cfg = {
        "base_model": str(model_dir),
        "pretraining_dataset": [{"path": str(data), "type": "pretrain", "text_column": "text"}],
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "sample_packing": True,
        "streaming_multipack_buffer_size": 100,
        "plugins": [PLUGIN],
        "diffusion": {"generation_interval": 2, "generation_steps": 3, "eps": 0.001},
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = cli("-m", "newtune.cli.main", "train", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    assert all("answer_ratio" not in h for h in history)  # pretraining: no SFT metrics
    assert "diffusion: added the mask token '<|diffusion_mask|>'" in proc.stderr
    assert "diffusion sample 1 at step 2" in proc.stderr
    tokens = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    added = [t for t in tokens if t["content"] == "<|diffusion_mask|>"]
    assert added and added[0]["special"]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == added[0]["id"] + 1


def test_step_trainer_refuses_diffusion(tmp_path, model_dir):
    from newtune.errors import ConfigError
    from newtune.train.stepwise import StepTrainer

    cfg = write(tmp_path, model_dir, diffusion={"mask_token_id": 3})
    with pytest.raises(ConfigError, match=r"StepTrainer trains next-token SFT steps.*Diffusion"):
        StepTrainer(str(cfg))


def test_installed_trainer_divides_the_micro_batch_loss_over_accumulation(tmp_path):
    from transformers import TrainingArguments

    from newtune.train.trainer import NewtuneTrainer

    model = tiny_model()
    model.train()
    tokenizer = types.SimpleNamespace(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    args = TrainingArguments(
        output_dir=str(tmp_path), gradient_accumulation_steps=4, report_to=[], use_cpu=True
    )
    trainer = NewtuneTrainer(model=model, args=args)
    m = method(eps=0.5, generate_samples=False)
    m.resolve_mask_token = lambda tok, model=None, add=True: m._use(tok, MASK)  # type: ignore
    m.install(trainer, tokenizer)
    assert type(trainer).__name__ == "DiffusionNewtuneTrainer"
    trainer.current_gradient_accumulation_steps = 4
    batch = sft_batch()
    torch.manual_seed(5)
    # Trainer counts the batch's label tokens; the diffusion loss is a mean and ignores it
    step_loss = trainer.training_step(trainer.model, dict(batch), torch.tensor(10))
    torch.manual_seed(5)
    expected, _ = m.loss(model, batch)
    assert torch.allclose(step_loss, expected.detach() / 4, atol=1e-6)


@pytest.mark.parametrize(
    ("world", "fsdp", "zero", "expected"),
    [(1, True, 3, False), (2, True, None, True), (2, False, 3, True), (2, False, 2, False)],
)
def test_samples_are_off_only_when_weights_are_sharded(world, fsdp, zero, expected):
    from newtune.train.methods.diffusion import sharded

    ns = types.SimpleNamespace
    plugin = ns(zero_stage=zero) if zero else None
    trainer = ns(
        args=ns(world_size=world),
        is_fsdp_enabled=fsdp,
        is_deepspeed_enabled=zero is not None,
        accelerator=ns(state=ns(deepspeed_plugin=plugin)),
    )
    assert sharded(trainer) is expected


def test_models_with_layers_outside_the_mask_are_refused(caplog):
    from newtune.errors import ModelError
    from newtune.train.methods.diffusion import check_model

    ns = types.SimpleNamespace
    hybrid = ns(
        config=ns(model_type="qwen3_next", layer_types=["linear_attention", "full_attention"])
    )
    with pytest.raises(ModelError, match="has linear_attention layers, which do not read it"):
        check_model(hybrid)
    with caplog.at_level("WARNING"):
        check_model(tiny_model())
        assert "window is not applied" not in caplog.text
        check_model(ns(config=ns(model_type="mistral", sliding_window=4096)))
    assert "window is not applied" in caplog.text
