"""Multipack: the packer, the batch sampler, the collator, isolation and loss exactness."""

from __future__ import annotations

import bisect
import copy
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import write_jsonl

from newtune.data.collate import PackedCollator, PadCollator
from newtune.data.packing import MultipackBatchSampler, Packing, pack, sample_lengths, split_to
from newtune.errors import DataError
from newtune.train.trainer import packed_loader, padded_loader, token_loss

M = -100


def reference_bfd(lengths: list[int], capacity: int) -> list[int]:
    """Textbook best-fit decreasing, one sample at a time: the sorted list of bin loads."""
    rooms: list[int] = []  # sorted remaining room of open bins
    for size in sorted(lengths, reverse=True):
        at = bisect.bisect_left(rooms, size)
        if at == len(rooms):
            bisect.insort(rooms, capacity - size)
        else:
            room = rooms.pop(at)
            bisect.insort(rooms, room - size)
    return sorted(capacity - r for r in rooms)


@pytest.mark.parametrize("seed", range(8))
def test_pack_is_exact_best_fit_decreasing(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(16, 200))
    lengths = rng.integers(1, capacity + 1, size=int(rng.integers(1, 400)))
    if seed % 2:  # many small samples, many equal lengths
        lengths = rng.integers(1, 9, size=300)
    bins = pack(lengths, capacity)
    loads = sorted(int(lengths[bins.bin(b)].sum()) for b in range(len(bins)))
    assert loads == reference_bfd(lengths.tolist(), capacity)
    assert sorted(bins.items.tolist()) == list(range(len(lengths)))
    assert max(loads) <= capacity


def test_pack_small_example_and_errors():
    bins = pack(np.array([5, 3, 4, 2, 6]), 10, indices=np.array([10, 11, 12, 13, 14]))
    assert bins.as_lists() == [[14, 12], [10, 11, 13]]  # 6+4, 5+3+2
    with pytest.raises(DataError, match="sample 1 has 11 tokens, which cannot be packed"):
        pack(np.array([3, 11]), 10)
    assert len(pack(np.array([], dtype=np.int64), 10)) == 0


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(30), 0.9, n)), 1, 256).astype(np.int64)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sampler_every_sample_once_per_epoch_and_equal_batches_per_rank(world):
    lengths = _lengths(1001)
    samplers = [
        MultipackBatchSampler(
            lengths, 256, 3, seed=7, num_replicas=world, rank=r, epochs=3, group_size=300
        )
        for r in range(world)
    ]
    for epoch in range(4):  # the 4th epoch reuses a packing: still exact
        seen: list[int] = []
        for s in samplers:
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(s) == len(samplers[0])
            for batch in batches:
                assert 1 <= len(batch) <= 3
                assert all(lengths[b].sum() <= 256 for b in batch)
                seen += [i for b in batch for i in b]
        assert sorted(seen) == list(range(1001))


def test_sampler_is_deterministic_from_seed_and_epoch():
    lengths = _lengths(500)

    def order(seed: int, epoch: int) -> list:
        s = MultipackBatchSampler(lengths, 256, 2, seed=seed, epochs=2)
        s.set_epoch(epoch)
        return list(s)

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)


def test_sampler_splits_bins_so_every_rank_gets_a_batch():
    lengths = np.array([2, 3, 4])  # one bin of 9 tokens
    seen = []
    for rank in range(3):
        s = MultipackBatchSampler(lengths, 16, 4, num_replicas=3, rank=rank)
        batches = list(s)
        assert len(batches) == len(s) == 1
        seen += [i for b in batches[0] for i in b]
    assert sorted(seen) == [0, 1, 2]
    with pytest.raises(DataError, match="cannot make 4 batches from 3 samples"):
        split_to(np.array([[0, 3]]), 4)


def test_eval_sampler_packs_in_order_without_shuffling():
    lengths = np.array([4, 4, 4, 4])
    s = MultipackBatchSampler(lengths, 8, 1, shuffle=False)
    assert list(s) == [[[0, 1]], [[2, 3]]]


def test_packed_collator_restarts_positions_and_masks_each_first_label():
    a = {"input_ids": [1, 2, 3], "labels": [M, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [4, 5]}
    c = {"input_ids": [6], "labels": [6]}
    out = PackedCollator(pad_id=0)([[a, b], [c]])
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[M, 2, 3, M, 5], [M, M, M, M, M]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert "attention_mask" not in out
    fixed = PackedCollator(pad_id=0, pad_to=8)([[a]])
    assert fixed["input_ids"].shape == (1, 8)
    assert fixed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]


def test_pad_collator_pads_to_sequence_len_when_asked():
    row = {"input_ids": [1, 2], "labels": [M, 2], "attention_mask": [1, 1]}
    out = PadCollator(pad_id=0, pad_to=5)([row])
    assert out["input_ids"].tolist() == [[1, 2, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0, 0]]
    assert out["labels"].tolist() == [[M, 2, M, M, M]]


def test_packing_for_run_uses_one_long_row_only_under_flash_attention():
    assert Packing.for_run(512, 4, "sdpa") == Packing(512, 4)
    assert Packing.for_run(512, 4, "eager") == Packing(512, 4)
    assert Packing.for_run(512, 4, "flash_attention_2") == Packing(2048, 1)


def _tiny_model(model_dir, attn: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn
    )
    model.config.use_cache = False
    return model.eval()


def _samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(3, 20))
        ids = rng.integers(5, 200, size=k).tolist()
        labels = [M] * int(rng.integers(1, k)) + ids
        out.append({"input_ids": ids, "labels": labels[-k:], "attention_mask": [1] * k})
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_per_sample_logits(model_dir, attn):
    model = _tiny_model(model_dir, attn)
    samples = _samples(5)
    batch = PackedCollator(pad_id=0, pad_to=80)([samples[:3], samples[3:]])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        for row, group in ((0, samples[:3]), (1, samples[3:])):
            at = 0
            for s in group:
                alone = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
                n = len(s["input_ids"])
                assert torch.allclose(packed[row, at : at + n], alone, atol=1e-5), (row, at)
                at += n


def _dataset(samples: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(samples)


def test_eval_loss_is_the_same_packed_and_unpacked(model_dir):
    model = _tiny_model(model_dir, "sdpa")
    ds = _dataset(_samples(9, seed=3))
    packed = packed_loader(ds, Packing(48, 2), 0, seed=0, shuffle=False)
    padded = padded_loader(ds, 4, 0)
    a_total, a_count = token_loss(model, packed, "cpu")
    b_total, b_count = token_loss(model, padded, "cpu")
    expected = sum(sum(1 for t in s["labels"][1:] if t != M) for s in _samples(9, seed=3))
    assert a_count == b_count == expected
    assert a_total / a_count == pytest.approx(b_total / b_count, abs=1e-6)


def _one_step(model_dir, ds, args_kw: dict, packing: Packing | None):
    from transformers import AutoTokenizer, TrainingArguments

    from newtune.train.trainer import NewtuneTrainer

    torch.manual_seed(0)
    model = _tiny_model(model_dir, "sdpa").train()
    before = copy.deepcopy(model.state_dict())
    args = TrainingArguments(
        output_dir=str(model_dir.parent / "unused"),
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
        dataloader_drop_last=False,
        **args_kw,
    )
    trainer = NewtuneTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=PadCollator(0),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        packing=packing,
    )
    trainer.train()
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    return after


def test_one_step_packed_equals_unpacked_and_resplits_agree(model_dir):
    ds = _dataset(_samples(4, seed=5))
    unpacked = _one_step(model_dir, ds, {"per_device_train_batch_size": 4}, None)
    accum = _one_step(
        model_dir, ds, {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}, None
    )
    # 4 samples of <= 19 tokens pack into one 80-token row: one micro-batch, one step
    packed = _one_step(model_dir, ds, {"per_device_train_batch_size": 1}, Packing(80, 1))
    for key, value in unpacked.items():
        assert torch.allclose(value, accum[key], atol=1e-6), key
        assert torch.allclose(value, packed[key], atol=1e-6), key


@pytest.mark.parametrize("packing", [None, Packing(80, 1)], ids=["padded", "packed"])
def test_head_on_trained_positions_only_gives_the_same_step(model_dir, monkeypatch, packing):
    import newtune.train.trainer as trainer_mod

    ds = _dataset(_samples(4, seed=7))
    kw = {"per_device_train_batch_size": 4 if packing is None else 1}
    seen = []
    real = trainer_mod.trained_positions_only
    monkeypatch.setattr(
        trainer_mod, "trained_positions_only", lambda inputs: seen.append(1) or real(inputs)
    )
    skipped = _one_step(model_dir, ds, kw, packing)
    assert seen  # the output head ran on trained positions only
    monkeypatch.setattr(trainer_mod, "head_can_skip", lambda model: False)
    full = _one_step(model_dir, ds, kw, packing)
    for key, value in full.items():
        assert torch.allclose(value, skipped[key], atol=1e-6), key
    mask = trainer_mod.trained_positions_only(
        {"labels": torch.tensor([[M, M, 7, 8], [M, 5, M, M]])}
    )["logits_to_keep"]
    assert mask.tolist() == [[False, True, True, False], [True, False, False, False]]


def test_sample_lengths_reads_the_arrow_column(tmp_path):
    ds = _dataset(_samples(6, seed=1))
    expected = [len(s["input_ids"]) for s in _samples(6, seed=1)]
    assert sample_lengths(ds).tolist() == expected
    split = ds.train_test_split(test_size=2, seed=0)["train"]  # an indices mapping
    assert sample_lengths(split).tolist() == [len(x) for x in split["input_ids"]]


def test_packing_report_in_stats(tmp_path, model_dir, capsys):
    from test_cli import CHATS, make_config

    from newtune.cli.preprocess import preprocess_command

    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(tmp_path, model_dir, data, "chat_template", sample_packing=True)
    preprocess_command(str(cfg))
    path = capsys.readouterr().out.strip().splitlines()[-1]
    stats = json.loads((Path(path) / "stats.json").read_text())
    lengths = sample_lengths(datasets.load_from_disk(path)["train"])
    rows = stats["packing"]["packed_rows"]
    assert stats["packing"]["row_capacity"] == 64
    assert stats["packing"]["efficiency"] == pytest.approx(lengths.sum() / (rows * 64), abs=1e-6)
    assert rows == len(pack(lengths, 64))  # one group: exactly the packer's bins
    # turning packing off removes the report from the same (reused) cache
    cfg2 = make_config(tmp_path, model_dir, data, "chat_template")
    preprocess_command(str(cfg2))
    stats = json.loads((Path(path) / "stats.json").read_text())
    assert "packing" not in stats


def test_train_packed_then_evaluate_packed_equals_unpacked(tmp_path, model_dir, capsys):
    from test_cli import CHATS, make_config

    from newtune.cli.evaluate import evaluate_command
    from newtune.cli.train import train_command

    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        "chat_template",
        sample_packing=True,
        val_set_size=4,
        adapter="lora",
        lora_r=2,
        lora_target_linear=True,
        max_steps=2,
    )
    train_command(str(cfg))
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["packing"]["packed_rows"] < stats["rows"]["train"] == 12
    results = json.loads((out / "train_results.json").read_text())
    capsys.readouterr()

    def evaluate(**kw) -> dict:
        evaluate_command(str(cfg), **kw)
        return json.loads(capsys.readouterr().out)

    packed = evaluate()
    unpacked = evaluate(eval_sample_packing=False)
    base = evaluate(base=True)
    assert packed["sample_packing"] and not unpacked["sample_packing"]
    assert packed["adapter"] == str(out) and base["adapter"] is None
    assert packed["eval_tokens"] == unpacked["eval_tokens"] == results["eval_tokens"] > 0
    assert packed["eval_loss"] == pytest.approx(unpacked["eval_loss"], abs=1e-6)
    assert packed["eval_loss"] == pytest.approx(results["eval_loss"], abs=1e-5)
    assert packed["perplexity"] == pytest.approx(np.exp(packed["eval_loss"]), rel=1e-9)
    assert base["eval_loss"] != pytest.approx(packed["eval_loss"], abs=1e-4)
    assert packed["eval_rows"] == 4


def test_evaluate_without_an_eval_split_says_what_to_set(tmp_path, model_dir):
    from test_cli import CHATS, cli, make_config

    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(tmp_path, model_dir, data, "chat_template")
    proc = cli("-m", "newtune.cli.main", "evaluate", str(cfg), "--base")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "the prepared data has no `test` split (it has: train). Set `val_set_size`" in (
        proc.stderr.replace("\n", " ")
    )


def test_accelerate_two_cpu_ranks_train_packed_batches(tmp_path, model_dir):
    from test_cli import ALPACA, make_config, train_on_two_cpu_ranks

    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 2)  # 24 rows
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        "alpaca",
        adapter="lora",
        lora_r=2,
        sample_packing=True,
        max_steps=None,
        num_epochs=1,
        micro_batch_size=1,
        val_set_size=4,
    )
    proc = train_on_two_cpu_ranks(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prepared = next(p for p in (tmp_path / "prepared").iterdir() if not p.name.startswith("."))
    lengths = sample_lengths(datasets.load_from_disk(str(prepared))["train"])
    per_rank = len(MultipackBatchSampler(lengths, 64, 1, seed=42, num_replicas=2))
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    # each rank runs its own share of the packed batches: one optimizer step per batch
    assert history[-1]["step"] == per_rank
    assert history[-1]["epoch"] == pytest.approx(1.0)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert evals and all(np.isfinite(evals))  # eval sums reduced over both ranks
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    test = datasets.load_from_disk(str(prepared))["test"]
    trained = sum(sum(1 for t in labels[1:] if t != M) for labels in test["labels"])
    assert results["eval_tokens"] == trained > 0  # every eval row once, over both ranks
    assert f"{per_rank} micro-batches per rank and {per_rank} optimizer steps per epoch" in (
        proc.stderr
    )


def test_eval_sampler_deals_batches_without_repeats_even_to_idle_ranks():
    lengths = np.array([4, 4, 4])  # one bin per sample at capacity 6
    got = []
    for rank in range(4):
        s = MultipackBatchSampler(
            lengths, 6, 1, shuffle=False, num_replicas=4, rank=rank, even=False
        )
        batches = list(s)
        assert len(batches) == len(s) == (1 if rank < 3 else 0)
        got += [i for b in batches for bin in b for i in bin]
    assert got == [0, 1, 2]
