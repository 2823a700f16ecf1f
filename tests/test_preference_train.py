"""Preference and reward training end to end on the tiny model: `newtune train` for each method,
TRL's metric names in log_history, the step-0 invariants, packed == padded, precomputed
reference == live reference, `newtune evaluate`, reward models in plain transformers, and the
methods' errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file

from newtune.cli.train import train_command

PAIRS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Brintmoor."},
    {"prompt": "Name a color.", "chosen": " Blue", "rejected": " red, green and the lazy dog."},
    {"prompt": "What is the answer?", "chosen": " 0123456789", "rejected": " I am fine."},
    {"prompt": "Translate to French.", "chosen": " Hello there!", "rejected": " Blue."},
    {"prompt": "Hello there!", "chosen": " How are you?", "rejected": " No."},
    {"prompt": "Say yes.", "chosen": " Yes.", "rejected": " The quick brown fox."},
]
UNPAIRED = [
    {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
    for p in PAIRS
    for side in ("chosen", "rejected")
]
DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
LORA = {
    "adapter": "lora",
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
}


def make_config(tmp_path: Path, model_dir: Path, rows: list[dict], kind: str, **extra) -> Path:
    """A config training `kind` rows on the tiny model (LoRA unless `adapter` is overridden)."""
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": kind}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "seed": 7,
        **LORA,
        **extra,
    }
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def history(out: Path) -> list[dict]:
    """The training log entries (those with a loss) of a finished run."""
    return [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


METHODS = {
    "dpo": ({"rl": "dpo"}, "preference", DPO_METRICS),
    "ipo": ({"rl": "ipo"}, "preference", DPO_METRICS),
    "simpo": ({"rl": "simpo"}, "preference", (*DPO_METRICS, "nll_loss")),
    "orpo": ({"rl": "orpo"}, "preference", (*DPO_METRICS, "nll_loss", "log_odds_ratio")),
    "kto": ({"rl": "kto"}, "unpaired_preference", ("kl", "rewards/chosen", "logps/rejected")),
    "reward": ({"reward_model": True}, "preference", ("accuracy", "margin", "mean_reward")),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_train_each_method_writes_adapter_and_metrics(tmp_path, model_dir, name):
    keys, kind, metrics = METHODS[name]
    rows = UNPAIRED if kind == "unpaired_preference" else PAIRS
    train_command(str(make_config(tmp_path, model_dir, rows, kind, **keys)))
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    logs = history(out)
    assert [h["step"] for h in logs] == [1, 2]
    for entry in logs:
        assert math.isfinite(entry["loss"])
        for metric in metrics:
            assert metric in entry, (metric, entry)
            assert math.isfinite(entry[metric])
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == ("SEQ_CLS" if name == "reward" else "CAUSAL_LM")


@pytest.mark.parametrize(
    ("rl", "expected"), [("dpo", math.log(2)), ("ipo", (1 / (2 * 0.25)) ** 2)], ids=["dpo", "ipo"]
)
def test_first_step_with_lora_has_policy_equal_reference(tmp_path, model_dir, rl, expected):
    """LoRA starts at B = 0: policy = reference, so sigmoid DPO is ln 2 and IPO (1/(2 beta))^2."""
    cfg = make_config(tmp_path, model_dir, PAIRS, "preference", rl=rl, rl_beta=0.25, max_steps=1)
    train_command(str(cfg))
    (first,) = history(tmp_path / "out")
    assert abs(first["loss"] - expected) <= 1e-6 * max(1.0, expected)
    assert first["rewards/chosen"] == 0.0 and first["rewards/margins"] == 0.0
    assert first["rewards/accuracies"] == 0.0  # ties are not wins


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize(
    ("name", "packing_key"),
    [
        ("dpo", "sample_packing"),
        ("dpo", "dpo_padding_free"),
        ("orpo", "sample_packing"),
        ("kto", "sample_packing"),
        ("reward", "sample_packing"),
    ],
)
def test_packed_equals_padded_loss_and_weights_after_one_sgd_step(
    tmp_path, model_dir, name, packing_key, monkeypatch
):
    import newtune.train.methods.pairs as pairs

    shared_calls = []
    real = pairs.pack_shared_pairs
    monkeypatch.setattr(
        pairs, "pack_shared_pairs", lambda *a, **k: shared_calls.append(1) or real(*a, **k)
    )
    keys, kind, _ = METHODS[name]
    rows = UNPAIRED if kind == "unpaired_preference" else PAIRS
    runs = {}
    for packed in (False, True):
        folder = tmp_path / ("packed" if packed else "padded")
        folder.mkdir()
        extra = {**keys, "optimizer": "sgd", "learning_rate": 0.5, "max_steps": 1}
        cfg = make_config(folder, model_dir, rows, kind, **{packing_key: packed or None}, **extra)
        train_command(str(cfg))
        runs[packed] = (history(folder / "out")[0], _adapter(folder / "out"))
    (padded_log, padded_w), (packed_log, packed_w) = runs[False], runs[True]
    assert abs(packed_log["loss"] - padded_log["loss"]) <= 1e-6
    assert _max_difference(packed_w, padded_w) <= 1e-6
    moved = max(float(v.abs().max()) for k, v in packed_w.items() if "lora_B" in k)
    assert moved > 1e-4  # LoRA's B starts at 0: the step changed the weights
    assert bool(shared_calls) == (name == "dpo")  # DPO packs each pair around one prompt


@pytest.mark.parametrize(
    ("name", "adapter"), [("dpo", "lora"), ("dpo", None), ("kto", "lora")], ids=str
)
def test_precomputed_reference_gives_the_live_reference_losses(tmp_path, model_dir, name, adapter):
    keys, kind, _ = METHODS[name]
    rows = UNPAIRED if kind == "unpaired_preference" else PAIRS
    losses = {}
    for precompute in (False, True):
        folder = tmp_path / str(precompute)
        folder.mkdir()
        extra = {**keys, "max_steps": 3, "precompute_ref_log_probs": precompute or None}
        if adapter is None:
            extra.update(adapter=None, lora_r=None, lora_alpha=None, lora_dropout=None)
            extra.update(lora_target_linear=None, learning_rate=1e-3)
        train_command(str(make_config(folder, model_dir, rows, kind, **extra)))
        losses[precompute] = [h["loss"] for h in history(folder / "out")]
        caches = [p for p in (folder / "prepared").glob("*-ref-*") if not p.name.startswith(".")]
        if precompute:
            (cache,) = caches
            identity = json.loads((cache / "reference.json").read_text())
            assert identity["reference"]["base_model"] == str(model_dir)
            assert identity["method"] == ("kto" if name == "kto" else "dpo")
        else:
            assert caches == []
    assert len(losses[True]) == 3
    for live, cached in zip(losses[False], losses[True], strict=True):
        assert abs(live - cached) <= 1e-5 * max(1.0, abs(live))


def _scores(model, tokenizer) -> torch.Tensor:
    """Scores of every pair's chosen and rejected text, one batch, right padded."""
    texts = [p["prompt"] + p[side] for p in PAIRS for side in ("chosen", "rejected")]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits[:, 0]


def test_full_reward_model_loads_in_plain_transformers(tmp_path, model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = make_config(
        tmp_path,
        model_dir,
        PAIRS,
        "preference",
        reward_model=True,
        adapter=None,
        lora_r=None,
        lora_alpha=None,
        lora_dropout=None,
        lora_target_linear=None,
        learning_rate=1e-3,
    )
    train_command(str(cfg))
    out = tmp_path / "out"
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    scores = _scores(model, AutoTokenizer.from_pretrained(out))
    assert scores.shape == (2 * len(PAIRS),) and torch.isfinite(scores).all()


def test_reward_lora_merges_into_a_plain_sequence_classifier(tmp_path, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from newtune.cli.merge_lora import merge_lora_command

    cfg = make_config(tmp_path, model_dir, PAIRS, "preference", reward_model=True)
    train_command(str(cfg))
    out = tmp_path / "out"
    merge_lora_command(str(cfg))
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    assert merged.config.architectures == ["LlamaForSequenceClassification"]
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    with_adapter = PeftModel.from_pretrained(base, out).eval()
    expected = _scores(with_adapter, tokenizer)
    assert torch.allclose(_scores(merged, tokenizer), expected, atol=1e-5)
    head = load_file(str(out / "adapter_model.safetensors"))
    assert any(k.endswith("score.weight") for k in head)  # the head trains in full


@pytest.mark.parametrize("name", ["dpo", "kto", "reward"])
def test_evaluate_prints_the_methods_metrics_beside_eval_loss(tmp_path, model_dir, capsys, name):
    from newtune.cli.evaluate import evaluate_command

    keys, kind, _ = METHODS[name]
    rows = (UNPAIRED if kind == "unpaired_preference" else PAIRS) * 2
    cfg = make_config(tmp_path, model_dir, rows, kind, val_set_size=4, eval_steps=2, **keys)
    train_command(str(cfg))
    logged = json.loads((tmp_path / "out" / "log_history.json").read_text())
    evals = [h for h in logged if "eval_loss" in h]
    assert evals and evals[-1]["step"] == 2
    capsys.readouterr()
    evaluate_command(str(cfg))
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval_rows"] == 4 and printed["split"] == "test"
    assert abs(printed["eval_loss"] - evals[-1]["eval_loss"]) <= 1e-5
    names = {
        "dpo": DPO_METRICS,
        "kto": ("kl", "rewards/chosen", "rewards/rejected"),
        "reward": ("accuracy", "margin"),
    }[name]
    for metric in names:
        assert abs(printed[metric] - evals[-1][f"eval_{metric}"]) <= 1e-5, metric
        assert f"eval_{metric}" not in printed
    if name == "dpo":
        assert 0.0 <= printed["rewards/accuracies"] <= 1.0


def test_step_trainer_refuses_preference_methods(tmp_path, model_dir):
    from newtune.errors import ConfigError
    from newtune.train.stepwise import StepTrainer

    cfg = make_config(tmp_path, model_dir, PAIRS, "preference", rl="dpo")
    with pytest.raises(ConfigError, match=r"StepTrainer trains SFT steps only.*`rl: dpo`"):
        StepTrainer(str(cfg))


def test_loss_plot_carries_the_preference_metrics(tmp_path):
    from newtune.train.report import metric_series, write_loss_plot

    logs = [
        {"step": 1, "loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.0},
        {"step": 2, "loss": 0.6, "rewards/accuracies": 1.0, "rewards/margins": 0.2},
        {"step": 2, "eval_loss": 0.65, "eval_rewards/accuracies": 0.75},
        {"step": 2, "train_loss": 0.64},
    ]
    assert metric_series(logs) == {
        "rewards/accuracies": [(1, 0.5), (2, 1.0)],
        "rewards/margins": [(1, 0.0), (2, 0.2)],
        "eval_rewards/accuracies": [(2, 0.75)],
    }
    assert metric_series([{"step": 1, "loss": 1.0}]) == {}
    assert write_loss_plot(logs, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_ranks_average_metrics_across_ranks(tmp_path, model_dir, capsys):
    """Each rank evaluates half the split; the logged eval metrics are the whole split's (as one
    process computes them with `newtune evaluate`)."""
    from newtune.cli.evaluate import evaluate_command

    cfg = make_config(
        tmp_path, model_dir, PAIRS * 2, "preference", rl="dpo", val_set_size=4, eval_steps=2
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--main_process_port", "0"]  # a free port: launches may run side by side
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run(
        [sys.executable, *launch, "-m", "newtune.cli.train", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert abs(history(tmp_path / "out")[0]["loss"] - math.log(2)) <= 1e-6
    (final_eval,) = [h for h in logged if "eval_loss" in h]
    capsys.readouterr()
    evaluate_command(str(cfg))
    printed = json.loads(capsys.readouterr().out)
    for metric in ("loss", *DPO_METRICS):
        assert (
            abs(
                printed[f"eval_{metric}" if metric == "loss" else metric]
                - final_eval[f"eval_{metric}"]
            )
            <= 1e-5
        ), metric


def test_gradient_accumulation_equals_a_bigger_micro_batch(tmp_path, model_dir):
    """2 micro-batches of 2 pairs accumulated = one micro-batch of 4 (the loss is a pair mean)."""
    weights = []
    for mbs, accumulation in ((4, 1), (2, 2)):
        folder = tmp_path / f"mbs{mbs}"
        folder.mkdir()
        extra = {"optimizer": "sgd", "learning_rate": 0.5, "max_steps": 1, "group_by_length": True}
        cfg = make_config(
            folder,
            model_dir,
            PAIRS,
            "preference",
            rl="dpo",
            micro_batch_size=mbs,
            gradient_accumulation_steps=accumulation,
            **extra,
        )
        train_command(str(cfg))
        weights.append(_adapter(folder / "out"))
    assert _max_difference(*weights) <= 1e-6


def test_kto_with_one_row_per_batch_is_refused_before_any_work(tmp_path, model_dir):
    cfg = make_config(tmp_path, model_dir, UNPAIRED, "unpaired_preference", rl="kto")
    proc = cli("train", str(cfg), "--micro_batch_size=1")
    assert proc.returncode != 0
    assert "`rl: kto` needs `micro_batch_size` of 2 or more (it is 1)" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "out").exists()


def test_rows_of_the_other_kind_are_a_data_error():
    import datasets

    from newtune.config.schema import NewtuneConfig
    from newtune.errors import DataError
    from newtune.train.methods import method_for

    base = {"base_model": "x", "datasets": [{"path": "d", "type": "preference"}]}
    sft_rows = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"input_ids": [[1]], "labels": [[1]]})}
    )
    pair_rows = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"prompt_ids": [[1]], "chosen_ids": [[2]]})}
    )
    with pytest.raises(
        DataError, match=r"`rl: dpo` trains on preference rows .* \(missing prompt_ids"
    ):
        method_for(NewtuneConfig(**base, rl="dpo")).check_data(sft_rows)
    with pytest.raises(DataError, match="missing rejected_ids"):
        method_for(NewtuneConfig(**base, rl="orpo")).check_data(pair_rows)
    alpaca = {"base_model": "x", "datasets": [{"path": "d", "type": "alpaca"}]}
    with pytest.raises(DataError, match="SFT trains on rows with the columns input_ids, labels"):
        method_for(NewtuneConfig(**alpaca)).check_data(pair_rows)
    method_for(NewtuneConfig(**alpaca)).check_data(sft_rows)  # the right rows pass


# ---------------------------------------------------------------- the methods against TRL's trainers


def _tiny(model_dir: Path, seed: int | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if seed is not None:  # small noise: policy and reference differ
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _trl_args(tmp_path: Path, batch: int) -> dict:
    return {
        "output_dir": str(tmp_path / "trl"),
        "report_to": [],
        "use_cpu": True,
        "bf16": False,  # TRL's default would autocast its forward passes to bfloat16
        "per_device_train_batch_size": batch,
        "max_length": None,
        "save_strategy": "no",
    }


def _method(**keys):
    from newtune.config.schema import NewtuneConfig
    from newtune.train.methods import method_for

    entry = {
        "path": "d",
        "type": "unpaired_preference" if keys.get("rl") == "kto" else "preference",
    }
    return method_for(NewtuneConfig(base_model="x", datasets=[entry], **keys))


@pytest.mark.parametrize(
    "keys",
    [{"rl": "dpo"}, {"rl": "ipo", "rl_beta": 0.3}, {"rl": "dpo", "dpo_loss_type": ["hinge"]}],
    ids=["sigmoid", "ipo", "hinge"],
)
def test_dpo_method_equals_trls_trainer_padded_and_packed(
    tmp_path, model_dir, chat_tokenizer, keys
):
    import warnings

    import datasets
    from trl import DPOConfig, DPOTrainer

    from newtune.train.methods.base import Reference

    method = _method(**keys)
    settings = method.settings
    policy, ref = _tiny(model_dir, 3), _tiny(model_dir, 4)
    args = DPOConfig(
        **_trl_args(tmp_path, len(PAIRS)),
        beta=settings.beta,
        loss_type=list(settings.loss_types),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=policy,
            ref_model=ref,
            args=args,
            train_dataset=datasets.Dataset.from_list(PAIRS),
            processing_class=chat_tokenizer,
        )
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    trainer._metrics["eval"].clear()  # the policy is in eval mode: TRL files them under eval
    theirs = trainer.compute_loss(policy, trainer.data_collator(rows))
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    reference = Reference("model", ref)
    for capacity, attention in ((None, None), (64, None), (64, "sdpa")):
        collate = method.collator(chat_tokenizer.pad_token_id, capacity, None, attention)
        batch = collate(rows)
        assert ("label_sequence" in batch) == (attention == "sdpa")  # shared prompts
        ours, metrics = method.loss(policy, batch, reference)
        assert abs(float(ours) - float(theirs)) <= 1e-5 * max(1.0, abs(float(theirs)))
        for name in DPO_METRICS:
            assert abs(float(metrics[name]) - trl_metrics[name]) <= 1e-5 * max(
                1.0, abs(trl_metrics[name])
            ), (capacity, name)


def test_kto_method_equals_trls_trainer(tmp_path, model_dir, chat_tokenizer):
    import warnings

    import datasets
    from trl import KTOConfig, KTOTrainer

    from newtune.train.methods.base import Reference

    rows = UNPAIRED[:6]
    policy, ref = _tiny(model_dir, 7), _tiny(model_dir, 6)
    args = KTOConfig(**_trl_args(tmp_path, len(rows)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = KTOTrainer(
            model=policy,
            ref_model=ref,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=chat_tokenizer,
        )
    trl_rows = [trainer.train_dataset[i] for i in range(len(rows))]
    trainer._metrics["eval"].clear()  # the policy is in eval mode: TRL files them under eval
    theirs = trainer.compute_loss(policy, trainer.data_collator(trl_rows))
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    method = _method(rl="kto", micro_batch_size=len(rows))
    columns = ["prompt_ids", "completion_ids", "label"]
    ours_ds = method.prepare_rows(trainer.train_dataset.select_columns(columns), len(rows))
    assert ours_ds["kl_completion_ids"] == trainer.train_dataset["KL_completion_ids"]
    batch = method.collator(chat_tokenizer.pad_token_id, None, None)(list(ours_ds))
    ours, metrics = method.loss(policy, batch, Reference("model", ref))
    assert abs(float(ours) - float(theirs)) <= 1e-5
    for name in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert abs(float(metrics[name]) - trl_metrics[name]) <= 1e-5 * max(
            1.0, abs(trl_metrics[name])
        ), name
    assert float(metrics["kl"]) > 0


@pytest.mark.parametrize("precompute", [False, True], ids=["live", "precomputed"])
def test_interrupted_then_resumed_dpo_equals_uninterrupted(
    tmp_path, model_dir, monkeypatch, precompute
):
    from test_resume import CrashAfterSave, SimulatedCrash, StepCounter, _train

    keys = {
        "rl": "dpo",
        "max_steps": None,
        "num_epochs": 2,  # 3 steps per epoch: the crash lies in the second epoch
        "sample_packing": True,
        "precompute_ref_log_probs": precompute or None,
    }
    (tmp_path / "a").mkdir()
    out_a = _train(make_config(tmp_path / "a", model_dir, PAIRS, "preference", **keys), monkeypatch)
    (tmp_path / "b").mkdir()
    resume = {"auto_resume_from_checkpoints": True, "save_steps": 5}
    broken = make_config(tmp_path / "b", model_dir, PAIRS, "preference", **resume, **keys)
    with pytest.raises(SimulatedCrash):
        _train(broken, monkeypatch, CrashAfterSave(5))
    counter = StepCounter()
    out_b = _train(broken, monkeypatch, counter)
    assert counter.steps == [6]
    logs_a, logs_b = history(out_a), history(out_b)
    assert [h["step"] for h in logs_b] == list(range(1, 7))
    for a, b in zip(logs_a, logs_b, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6
        assert abs(a["rewards/margins"] - b["rewards/margins"]) <= 1e-6
    assert _max_difference(_adapter(out_a), _adapter(out_b)) <= 1e-6


def test_inference_on_a_reward_model_config_is_a_clear_error(tmp_path, model_dir):
    cfg = make_config(tmp_path, model_dir, PAIRS, "preference", reward_model=True)
    proc = cli("inference", str(cfg), "--prompt", "Name a color.")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "this config trains a reward model (`reward_model: true`)" in proc.stderr
    assert "`newtune evaluate`" in proc.stderr
