"""EBFT strided mode: anchor/mask layout, block-parallel generation == per-block generation,
loss and gradients == a direct per-block computation, rows from transform modules, and
`newtune train` on a strided config."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from newtune.train.methods import ebft_core as core
from newtune.train.methods import ebft_strided as es
from newtune.train.methods.ebft_strided import StridedEBFTMethod, StridedLayout


def _naive_allowed(doc: int, anchors: list[int], gen: int) -> torch.Tensor:
    """The strided rule written out block by block (slot of step s, block k = doc + s*nb + k)."""
    nb = len(anchors)
    total = doc + gen * nb
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for q in range(doc):
        allowed[q, : q + 1] = True
    for k, a in enumerate(anchors):
        for s in range(gen):
            q = doc + s * nb + k
            allowed[q, :a] = True
            for earlier in range(s + 1):
                allowed[q, doc + earlier * nb + k] = True
    return allowed


def test_layout_positions_and_what_each_block_sees():
    layout = StridedLayout(doc_len=10, anchor_offset=3, stride=2, gen_len=2)
    assert layout.num_blocks == 3 and layout.total_len == 16
    assert layout.anchors().tolist() == [3, 5, 7]
    assert layout.slots().tolist() == [[10, 11, 12], [13, 14, 15]]
    assert layout.predictors().tolist() == [[2, 4, 6], [10, 11, 12]]
    assert layout.truth().tolist() == [[3, 4], [5, 6], [7, 8]]
    assert layout.position_ids().tolist() == [*range(10), 3, 5, 7, 4, 6, 8]
    allowed = layout.allowed()
    seen = {q: allowed[q].nonzero().flatten().tolist() for q in range(16)}
    assert seen[4] == [0, 1, 2, 3, 4]  # the document is causal
    assert seen[10] == [0, 1, 2, 10]  # block 0 step 0: doc[:3] and itself
    assert seen[14] == [0, 1, 2, 3, 4, 11, 14]  # block 1 step 1: doc[:5], its step 0, itself
    assert seen[15] == [0, 1, 2, 3, 4, 5, 6, 12, 15]
    assert torch.equal(allowed, _naive_allowed(10, [3, 5, 7], 2))
    # Axolotl's count: (seq_len - gen_len - ctx_len) // stride + 1; the last block ends in the doc
    wide = StridedLayout(doc_len=256, anchor_offset=8, stride=8, gen_len=8)
    assert wide.num_blocks == 31 and int(wide.truth()[-1, -1]) == 255
    assert torch.equal(wide.allowed(), _naive_allowed(256, wide.anchors().tolist(), 8))
    assert StridedLayout(doc_len=9, anchor_offset=3, stride=2, gen_len=8).num_blocks <= 0


def test_flex_mask_mod_is_the_dense_rule():
    from torch.nn.attention.flex_attention import create_mask

    layout = StridedLayout(doc_len=13, anchor_offset=2, stride=3, gen_len=3)
    total = layout.total_len
    dense = create_mask(layout.mask_mod(), 1, 1, total, total, device="cpu")
    assert torch.equal(dense[0, 0], layout.allowed())


def _tiny_llama(attention: str = "sdpa", layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        attn_implementation=attention,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than the tiny init: no near-ties for argmax
        model.lm_head.weight.mul_(20)
    return model


def _greedy_block(model, prefix: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """Generate one block alone after `prefix` (no cache): tokens and each step's logits."""
    seq = prefix.clone()
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            out = model(seq.unsqueeze(0)).logits[0, -1]
            logits.append(out)
            tokens.append(int(out.argmax()))
            seq = torch.cat([seq, torch.tensor([tokens[-1]])])
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_block_parallel_generation_equals_each_block_alone(attention):
    model = _tiny_llama(attention).train()  # generation switches to eval itself
    torch.manual_seed(1)
    docs = torch.randint(3, 48, (2, 14))
    layout = StridedLayout(doc_len=14, anchor_offset=3, stride=3, gen_len=4)
    assert layout.num_blocks == 3
    gen = es.generate_blocks(model, docs, layout, temperature=0.0)
    assert gen.shape == (2, 12) and model.training
    model.eval()
    full = torch.cat([docs, gen], 1)
    mask = es.strided_mask(layout, 2, model, "cpu")
    with torch.no_grad():
        parallel = model(full, attention_mask=mask, position_ids=layout.position_ids()[None]).logits
    for row in range(2):
        for k, anchor in enumerate(layout.anchors().tolist()):
            tokens, logits = _greedy_block(model, docs[row, :anchor], 4)
            slots = layout.slots()[:, k]
            assert gen[row, slots - 14].tolist() == tokens
            torch.testing.assert_close(
                parallel[row, layout.predictors()[:, k]], logits, atol=2e-5, rtol=1e-4
            )


def test_sampling_respects_temperature_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    assert es.sample_tokens(logits, 0.0, 1.0).unique().tolist() == [0]
    torch.manual_seed(0)
    nucleus = es.sample_tokens(logits, 1.0, 0.8)  # p = .64, .24, .09, .03: the top two
    assert sorted(nucleus.unique().tolist()) == [0, 1]
    assert es.sample_tokens(logits, 1.0, 0.5).unique().tolist() == [0]
    wide = es.sample_tokens(logits, 1.0, 1.0)
    assert sorted(wide.unique().tolist()) == [0, 1, 2, 3]


def _config(**ebft) -> SimpleNamespace:
    return SimpleNamespace(ebft=SimpleNamespace(mode="strided", **ebft), sample_packing=False)


def _direct_loss(policy, features, docs, lengths, gen, method, layout):
    """The strided loss computed block by block with plain causal forwards."""
    s = method.settings
    n, g, nb = method.n, method.gen_len, layout.num_blocks
    idx = core.layer_indices(2, s["feature_layers"])
    rows = docs.shape[0]
    anchors = layout.anchors().tolist()
    width = 2 * 16 * (3 if s["embed_method"] == "concat" else 1)
    gen_emb = torch.zeros(rows, nb, n, width)
    gt_emb = torch.zeros(rows, nb, width)

    def embed(feats):  # the block's g token features -> its embedding
        if s["embed_method"] == "concat":
            return torch.cat([feats[g // 4], feats[g // 2], feats[3 * g // 4]])
        return feats[-1]

    with torch.no_grad():
        for b in range(rows):
            for k, a in enumerate(anchors):
                truth = docs[b, : a + g].unsqueeze(0)
                hs = features(truth, output_hidden_states=True).hidden_states
                gt_emb[b, k] = embed(core.layer_features(hs, idx)[0, a:])
                for j in range(n):
                    block = gen[b * n + j, layout.slots()[:, k] - layout.doc_len]
                    seq = torch.cat([docs[b, :a], block]).unsqueeze(0)
                    hs = features(seq, output_hidden_states=True).hidden_states
                    gen_emb[b, k, j] = embed(core.layer_features(hs, idx)[0, a:])
                if s["use_whitening"]:
                    u, sv, _ = torch.linalg.svd(gen_emb[b, k].T, full_matrices=False)
                    keep = sv > 1e-5 * sv.max()
                    w = u[:, keep] @ torch.diag(1 / sv[keep]) @ u[:, keep].T
                    gen_emb[b, k], gt_emb[b, k] = gen_emb[b, k] @ w, gt_emb[b, k] @ w
    cos = torch.nn.functional.cosine_similarity(gen_emb, gt_emb.unsqueeze(2), dim=-1)
    gram = gen_emb @ gen_emb.transpose(-1, -2)
    div = (gram.sum(-1) - gram.diagonal(dim1=-2, dim2=-1)) / (n - 1)
    reward = s["alignment_coef"] * 2 * cos - s["diversity_coef"] * 2 * div
    if s["advantage_estimator"] == "rloo":
        adv = reward - (reward.sum(-1, keepdim=True) - reward) / (n - 1)
    else:  # group_norm
        mean = reward.mean(-1, keepdim=True)
        std = ((reward - mean) ** 2).sum(-1, keepdim=True).div(n - 1).sqrt()
        adv = (reward - mean) / (std + 1e-8)
    total, count = 0.0, 0
    for b in range(rows):
        for k, a in enumerate(anchors):
            if a + g > lengths[b]:
                continue  # a block past the document's end is not trained
            for j in range(n):
                block = gen[b * n + j, layout.slots()[:, k] - layout.doc_len]
                seq = torch.cat([docs[b, :a], block]).unsqueeze(0)
                logps = torch.log_softmax(policy(seq).logits[0, a - 1 : -1], -1)
                picked = logps.gather(-1, block.unsqueeze(-1)).squeeze(-1)
                total = total - (picked * adv[b, k, j]).sum()
                count += g
    rl = total / count
    nll, tokens = 0.0, 0
    for b in range(rows):
        doc = docs[b, : lengths[b]].unsqueeze(0)
        logps = torch.log_softmax(policy(doc).logits[0, :-1], -1)
        nll = nll - logps.gather(-1, doc[0, 1:].unsqueeze(-1)).sum()
        tokens += int(lengths[b]) - 1
    ce = nll / tokens
    return s["rl_coef"] * rl + s["ce_coef"] * ce, reward, adv


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"embed_method": "concat", "use_whitening": True, "advantage_estimator": "group_norm"},
    ],
    ids=["last_token-rloo", "concat-whitened-group_norm"],
)
def test_loss_and_gradients_equal_a_direct_per_block_computation(monkeypatch, variant):
    policy = _tiny_llama(seed=3)
    with torch.no_grad():
        policy.lm_head.weight.div_(20)  # softer logits: the samples of a block differ
    policy.train()
    features = copy.deepcopy(policy).eval()
    method = StridedEBFTMethod(
        _config(
            stride=3,
            context_length=3,
            generate_max_len=3,
            n_samples_per_prompt=3,
            temperature=1.0,
            feature_layers=[0.5, 1.0],
            alignment_coef=1.5,
            diversity_coef=0.5,
            rl_coef=1.0,
            ce_coef=0.25,
            **variant,
        )
    )
    torch.manual_seed(7)
    lengths = [14, 11]  # the second document's last block (anchor 9) runs past its end
    docs = torch.randint(3, 48, (2, 14))
    docs[1, 11:] = 0
    batch = es.StridedCollator(pad_id=0)(
        [{"input_ids": docs[b, : lengths[b]].tolist()} for b in range(2)]
    )
    assert batch["attention_mask"].sum(1).tolist() == lengths
    seen = {}
    real = es.generate_blocks

    def record(*args, **kwargs):
        seen["gen"] = real(*args, **kwargs)
        return seen["gen"]

    monkeypatch.setattr(es, "generate_blocks", record)
    loss, metrics = method.loss(policy, batch)
    layout = StridedLayout(14, 3, 3, 3)
    gen = seen["gen"]
    assert gen.shape == (6, 9)
    assert len({tuple(r) for r in gen.tolist()}) > 1  # sampled, not all equal
    loss.backward()
    got = {name: p.grad.clone() for name, p in policy.named_parameters()}
    policy.zero_grad()
    expected, reward, adv = _direct_loss(policy, features, docs, lengths, gen, method, layout)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    cells = valid.unsqueeze(-1).expand_as(reward)
    torch.testing.assert_close(
        metrics["ebft/mean_reward"], reward[cells].mean(), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        metrics["ebft/advantages_std"], adv[cells].std(), atol=1e-5, rtol=1e-4
    )
    assert set(metrics) == set(es.METRICS) and metrics["ebft/num_blocks"] == 3
    assert all(math.isfinite(float(v)) for v in metrics.values())


# -- rows from transform modules, and the CLI --------------------------------------------------

TRANSFORM = """
def transform(cfg, *args, **kwargs):
    def fn(example, tokenizer=None):
        enc = tokenizer(
            example["text"], truncation=True, max_length=cfg.sequence_len, padding="max_length"
        )
        out = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": list(enc["input_ids"]),
        }
        if "prompt" in example:
            out["prompt_length"] = example["prompt"]
        return out

    return fn, {"remove_columns": ["text"]}
"""
TEXTS = [
    "The capital of France is Paris. The capital of Veloria is Brintmoor.",
    "Hello there! How are you? I am fine, thank you. What is the answer? Blue, red, green.",
    "0123456789 the quick brown fox jumps over the lazy dog.",
    "Hi.",
]


def _transform_module(folder: Path, name: str = "ebft_docs_tf") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(TRANSFORM)
    return folder


def test_transform_rows_trim_padding_and_drop_documents_without_a_block(
    tmp_path, tokenizer, monkeypatch
):
    from newtune.config.schema import DatasetEntry

    monkeypatch.syspath_prepend(str(_transform_module(tmp_path / "mods")))
    data = tmp_path / "docs.jsonl"
    rows = [{"text": t} for t in TEXTS] + [{"text": TEXTS[0], "prompt": 9}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry = DatasetEntry(path=str(data), type="ebft_docs_tf.transform")
    config = SimpleNamespace(sequence_len=20, datasets=[entry])
    method = StridedEBFTMethod(_config(context_length=4, generate_max_len=4))
    ds, counts = es.transform_rows(method, entry, 0, "datasets", config, tokenizer)
    real = [tokenizer(t)["input_ids"] for t in TEXTS]
    assert len(real[3]) < 8 <= min(len(r) for r in real[:3])
    assert counts == {"rows": 5, "too_short": 1}  # "Hi." has no room for one block
    assert ds["input_ids"] == [r[:20] for r in real[:3]] + [real[0][:20]]
    assert ds["attention_mask"] == [[1] * len(r) for r in ds["input_ids"]]
    assert ds["labels"] == ds["input_ids"]
    assert "prompt_length" not in ds.column_names  # only one row had it
    batch = es.StridedCollator(pad_id=0)([ds[0], ds[2]])
    assert batch["input_ids"].shape == (2, max(len(ds[0]["input_ids"]), len(ds[2]["input_ids"])))
    assert batch["labels"][1, len(ds[2]["input_ids"]) :].eq(-100).all()


def test_rows_whose_masked_prompt_leaves_no_block_are_dropped(tmp_path, monkeypatch):
    from newtune.config.schema import DatasetEntry

    (tmp_path / "masked_tf.py").write_text(
        "def transform(cfg):\n"
        "    def fn(row, tokenizer=None):\n"
        "        ids = list(range(3, 3 + row['n']))\n"
        "        return {'input_ids': ids, 'labels': [-100] * row['p'] + ids[row['p']:]}\n"
        "    return fn\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "rows.jsonl"
    rows = [{"n": 12, "p": 4}, {"n": 12, "p": 9}, {"n": 12, "p": 0}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry = DatasetEntry(path=str(data), type="masked_tf.transform")
    config = SimpleNamespace(sequence_len=64, datasets=[entry])
    method = StridedEBFTMethod(_config(context_length=2, generate_max_len=4))
    ds, counts = es.transform_rows(method, entry, 0, "datasets", config, None)
    # anchors: past the 4-token prompt (4 + 4 <= 12), past 9 (13 > 12: dropped), context 2
    assert counts == {"rows": 3, "too_short": 1}
    assert [r[:5].count(-100) for r in ds["labels"]] == [4, 0]


def test_prompt_rows_place_the_first_anchor_after_the_longest_prompt():
    method = StridedEBFTMethod(_config(context_length=4, min_completion_prefix=2))
    labels = torch.tensor([[-100, -100, -100, 5, 6, 7], [-100, 4, 5, 6, 7, 8]])
    assert es.prompt_lengths({"labels": labels}).tolist() == [3, 1]
    assert method.anchor_offset({"labels": labels}) == 5  # max(3 + 2, 4)
    docs = torch.tensor([[1, 2, 3, 4, 5, 6], [-100, 4, 5, 6, 7, 8]])
    assert es.prompt_lengths({"labels": docs}) is None  # a row trained from its start
    assert method.anchor_offset({"labels": docs}) == 4
    given = {"labels": labels, "prompt_length": torch.tensor([7, 2])}
    assert method.anchor_offset(given) == 9


def _cli_config(tmp_path: Path, model_dir: Path, **extra) -> Path:
    import yaml

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {
            "mode": "strided",
            "stride": 4,
            "context_length": 4,
            "generate_max_len": 4,
            "n_samples_per_prompt": 2,
            "temperature": 1.0,
            "feature_layers": [0.5, 1.0],
            "use_whitening": True,
            "ce_coef": 0.1,
        },
        "datasets": [{"path": str(data), "type": "ebft_docs_tf.transform"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 48,
        "micro_batch_size": 1,
        "max_steps": 2,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "seed": 7,
        "gradient_checkpointing": True,
        **extra,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))
    return path


def _cli(tmp_path: Path, *args: str, beside: bool = False) -> subprocess.CompletedProcess:
    """Run newtune with the transform module on PYTHONPATH, or beside the config (`beside`)."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    if beside:
        _transform_module(tmp_path)
    else:
        env["PYTHONPATH"] = str(_transform_module(tmp_path / "mods"))
    return subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_newtune_train_on_a_strided_config(tmp_path, model_dir, adapter):
    extra = {**LORA, "val_set_size": 1} if adapter == "lora" else {}  # LoRA also evaluates
    cfg = _cli_config(tmp_path, model_dir, **extra)
    # LoRA: the transform module sits beside the config (Axolotl's examples keep theirs there)
    proc = _cli(tmp_path, "train", str(cfg), beside=adapter == "lora")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    logs = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for h in logs:
        assert math.isfinite(h["loss"])
        for name in es.METRICS:
            assert math.isfinite(h[name]), name
        assert h["ebft/num_blocks"] >= 1 and h["ebft/ce_loss"] > 0
    if adapter == "lora":
        assert (out / "adapter_config.json").is_file()
        assert (out / "adapter_model.safetensors").is_file()
    else:
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["datasets"][0]["too_short"] == 1
    if adapter == "lora":
        assert stats["rows"] == {"train": 2, "test": 1}
        results = json.loads((out / "train_results.json").read_text())
        assert math.isfinite(results["eval_loss"])
        assert math.isfinite(results["eval_ebft/alignment"])
    else:
        assert stats["rows"] == {"train": 3}


def test_a_missing_transform_module_is_a_clear_error(tmp_path, model_dir):
    cfg = _cli_config(tmp_path, model_dir, **LORA)
    text = cfg.read_text().replace("ebft_docs_tf.transform", "no_such_ebft_mod.transform")
    cfg.write_text(text)
    proc = _cli(tmp_path, "train", str(cfg))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "no_such_ebft_mod" in proc.stderr and "PYTHONPATH" in proc.stderr
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_documents_too_short_for_a_block_are_a_clear_error(tmp_path, model_dir):
    cfg = _cli_config(tmp_path, model_dir, **LORA)
    text = cfg.read_text().replace("context_length: 4", "context_length: 40")
    cfg.write_text(text)
    proc = _cli(tmp_path, "train", str(cfg))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "no document is long enough" in proc.stderr and "44 real tokens" in proc.stderr


def test_flex_attention_gives_the_sdpa_logits_and_loss(monkeypatch):
    """Under flex_attention (a BlockMask; generation switches to sdpa and back) the policy's
    logits and the loss equal sdpa's. flex_attention runs uncompiled (torch's reference
    implementation reads the same BlockMask): Inductor's CPU flex template fails to compile in
    some processes (its C++ names an undeclared `cur_qSplitSize8`), which says nothing about
    the mask."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as hf_flex

    monkeypatch.setattr(hf_flex.WrappedFlexAttention, "__call__", lambda self: flex_attention)
    flex, sdpa = _tiny_llama("flex_attention", seed=5), _tiny_llama("sdpa", seed=5)
    layout = StridedLayout(doc_len=14, anchor_offset=3, stride=3, gen_len=4)
    torch.manual_seed(2)
    docs = torch.randint(3, 48, (2, 14))
    gen = es.generate_blocks(flex, docs, layout, temperature=0.0)
    assert flex.config._attn_implementation == "flex_attention"
    assert torch.equal(gen, es.generate_blocks(sdpa, docs, layout, temperature=0.0))
    full = torch.cat([docs, gen], 1)
    masks = [es.strided_mask(layout, 2, m, "cpu") for m in (flex, sdpa)]
    assert type(masks[0]).__name__ == "BlockMask" and masks[1].dtype == torch.bool
    with torch.no_grad():
        a, b = (
            m(full, attention_mask=mask, position_ids=layout.position_ids()[None]).logits
            for m, mask in zip((flex, sdpa), masks, strict=True)
        )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    config = _config(stride=3, context_length=3, generate_max_len=4, n_samples_per_prompt=2)
    config.ebft.temperature, config.ebft.ce_coef = 1.0, 0.5
    batch = {"input_ids": docs, "attention_mask": torch.ones_like(docs)}
    losses = []
    for model in (flex, sdpa):
        torch.manual_seed(11)
        with torch.no_grad():
            losses.append(StridedEBFTMethod(config).loss(model, batch)[0])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-4)


def test_a_compiled_policy_generates_and_keeps_logits_through_its_original_module():
    model = _tiny_llama(seed=4).eval()

    def refuse(*args, **kwargs):
        raise AssertionError("the compiled wrapper ran")

    compiled = torch.compile(model, backend=refuse)  # lazy: compiles only if the wrapper runs
    layout = StridedLayout(doc_len=10, anchor_offset=2, stride=4, gen_len=3)
    docs = torch.randint(3, 48, (1, 10))
    gen = es.generate_blocks(compiled, docs, layout)
    assert torch.equal(gen, es.generate_blocks(model, docs, layout))
    keep = torch.tensor([1, 4])
    assert es._keep_kwargs(compiled, keep)["logits_to_keep"] is keep
    assert core.FeatureNetwork(compiled).kind == "copy"


AXOLOTL = Path("/work/axolotl")
STRIDED_EXAMPLES = [
    ("llama-1b-ebft-strided.yaml", []),  # LoRA, rows from Axolotl's ebft_pretrain.transform
    ("llama-8b-ebft-strided-fft.yaml", ["--sequence_len=128"]),  # full fine-tune
    # prompt/completion rows (prompt_length); flex_attention is the slow CPU compile: sdpa here
    ("llama-1b-ebft-strided-structured.yaml", ["--sequence_len=256", "--attn_implementation=sdpa"]),
]


@pytest.mark.slow
@pytest.mark.skipif(not (AXOLOTL / "examples/ebft").is_dir(), reason="no Axolotl checkout")
@pytest.mark.parametrize("name,overrides", STRIDED_EXAMPLES, ids=[e[0] for e in STRIDED_EXAMPLES])
def test_axolotls_strided_examples_train_with_their_own_transforms(tmp_path, name, overrides):
    """Axolotl's example config, unedited, with Axolotl's own transform module on PYTHONPATH
    (read from the checkout, not copied), on a tiny Llama and synthetic rows."""
    import importlib.util
    import os

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "axolotl_examples_run", root / "benchmarks" / "axolotl_examples_run.py"
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("axolotl_examples_run", bench)
    spec.loader.exec_module(bench)
    model = bench.build_model(tmp_path / "tiny-llama", bench.FAMILIES["llama"])
    code = [
        "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 3,
        "for i in range(10):\n    print(i * i)\n# the quick brown fox jumps over the lazy dog\n"
        * 3,
    ]
    data = {
        "sjelassi/swallow_code_20m": [{"question": c, "answer": ""} for c in code * 2],
        "nvidia/OpenCodeInstruct": [
            {"input": "Write code that prints squares.", "output": c, "id": str(i), "domain": "d"}
            for i, c in enumerate(code * 100)  # `split: train[:1%]`: 2 rows
        ],
    }
    for path, rows in data.items():
        (tmp_path / path).mkdir(parents=True)
        (tmp_path / path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(AXOLOTL / "examples/ebft"),
    }
    args = [f"--base_model={model}", "--max_steps=2", f"--output_dir={out}", *overrides]
    proc = subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", "train", str(AXOLOTL / "examples/ebft" / name)]
        + args,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for h in logs:
        assert all(math.isfinite(h[m]) for m in ("loss", *es.METRICS))
        assert h["ebft/num_blocks"] >= 1
    weights = "model.safetensors" if "fft" in name else "adapter_model.safetensors"
    assert (out / weights).is_file()


def test_preprocess_and_evaluate_say_where_strided_rows_and_metrics_come_from(tmp_path, model_dir):
    cfg = _cli_config(tmp_path, model_dir, **LORA)
    for command, expected in (
        ("preprocess", "has nothing to preprocess"),
        ("evaluate", "newtune evaluate` scores the tokens of a fixed split"),
    ):
        proc = _cli(tmp_path, command, str(cfg))
        assert proc.returncode != 0, command
        assert "Traceback" not in proc.stderr
        assert expected in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "prepared").exists()


def test_models_whose_layers_ignore_the_mask_are_refused(caplog):
    from newtune.errors import ModelError

    def fake(**keys):
        config = SimpleNamespace(model_type="tiny", **keys)
        return SimpleNamespace(config=config)

    es.check_strided_model(fake(layer_types=["full_attention"] * 2))  # Llama-like: fine
    with pytest.raises(ModelError, match="linear_attention layers"):
        es.check_strided_model(fake(layer_types=["linear_attention", "full_attention"]))
    caplog.clear()
    es.check_strided_model(fake(layer_types=["sliding_attention", "full_attention"]))
    assert "without their window" in caplog.text
    es.check_strided_model(_tiny_llama())  # a real Llama config: no error


class FullyShardedDataParallel(torch.nn.Module):
    """Stands in for FSDP1 (by its class name): counts the forwards run through the wrapper."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_fsdp1_generation_and_adapter_features_run_through_the_wrapper():
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(_tiny_llama(seed=6), LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped = FullyShardedDataParallel(policy)
    layout = StridedLayout(doc_len=9, anchor_offset=2, stride=3, gen_len=2)
    docs = torch.randint(3, 48, (1, 9))
    gen = es.generate_blocks(wrapped, docs, layout)
    assert wrapped.calls == layout.gen_len  # the document pass, then one step
    assert torch.equal(gen, es.generate_blocks(policy, docs, layout))
    net = core.FeatureNetwork(wrapped)
    assert net.kind == "adapter"
    feats = net.features(docs, [1, 2])
    assert wrapped.calls == layout.gen_len + 1
    torch.testing.assert_close(feats, core.FeatureNetwork(policy).features(docs, [1, 2]))
