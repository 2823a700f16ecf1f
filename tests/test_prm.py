"""Process reward models (`process_reward_model: true`, `type: stepwise_supervised`): exact
token ids and labels of rows against TRL's PRM layout (TRL 1.16 no longer ships PRMTrainer,
so its published tokenize_row algorithm is restated below as the oracle), the loss against a
direct cross-entropy, `newtune train` (LoRA and full) and `newtune evaluate` on tiny models,
the saved model in plain transformers, merging, and the refusals."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from conftest import write_jsonl

from newtune.cli.train import train_command
from newtune.data.strategies.stepwise_supervised import Steps, step_rows
from newtune.train.methods.base import Reference
from newtune.train.methods.prm import PRMMethod, StepCollator

ROWS = [
    {
        "prompt": "What is the answer?",
        "completions": ["The capital of France is Paris.", "Blue, red, green.", "0123"],
        "labels": [True, False, True],
    },
    {
        "prompt": "Name a color.",
        "completions": ["Blue.", "The quick brown fox."],
        "labels": [True, False],
    },
    {"prompt": "Hello there!", "completions": ["How are you?"], "labels": [False]},
    {
        "prompt": "Translate to French.",
        "completions": ["Hello", "there!", "I am fine, thank you."],
        "labels": [False, True, True],
    },
]
LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}


def oracle(tok, row: dict, sep: str, max_completion: int | None, last_only: bool, limit: int):
    """TRL PRMTrainer.tokenize_row's layout, restated from its documentation (training split)."""
    steps = [tok(s, add_special_tokens=False)["input_ids"] for s in row["completions"]]
    sep_ids = tok(sep, add_special_tokens=False)["input_ids"]
    wanted = [int(x) for x in row["labels"]]
    if last_only:
        wanted = [-100 for _ in wanted[:-1]] + wanted[-1:]
    ids, labels = [], []
    for step, label in zip(steps, wanted, strict=True):
        piece = step + sep_ids
        ids.extend(piece)
        labels.extend([-100] * (len(piece) - 1))
        labels.append(label)
    if max_completion is not None:
        del ids[max_completion:], labels[max_completion:]
    prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None:
        prompt.insert(0, tok.bos_token_id)
    ids, labels = prompt + ids, [-100] * len(prompt) + labels
    return ids[:limit], labels[:limit]


def _samples(rows: list[dict]) -> list[Steps]:
    return [Steps(r["prompt"], tuple(r["completions"]), tuple(map(int, r["labels"]))) for r in rows]


@pytest.fixture(scope="module")
def no_bos(tokenizer):
    """The tiny tokenizer without a BOS token (Qwen2's layout: no BOS is prepended)."""
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = None
    assert tok.bos_token_id is None
    return tok


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
@pytest.mark.parametrize(
    ("sep", "max_completion", "last_only", "limit"),
    [
        ("\n", None, False, 512),
        ("\n", None, True, 512),
        (" ки\n", None, False, 512),  # a multi-token separator: the label is on its last token
        ("\n", 9, False, 512),  # max_completion_length cuts inside a step
        ("\n", None, False, 14),  # sequence_len cuts inside the steps
        ("\n", 12, True, 10),
    ],
)
def test_rows_are_trl_prm_layout(tokenizer, no_bos, bos, sep, max_completion, last_only, limit):
    tok = tokenizer if bos else no_bos
    got = step_rows(tok, _samples(ROWS), sep, max_completion, last_only, limit)
    for row, (ids, labels) in zip(ROWS, got, strict=True):
        assert (ids, labels) == oracle(tok, row, sep, max_completion, last_only, limit)
        assert len(ids) == len(labels)


def test_exact_ids_and_labels_of_a_row(tokenizer):
    """One row spelled out: BOS, prompt, then each step + separator with its label last."""
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    row = Steps("Name a color.", ("Blue.", "The quick brown fox."), (1, 0))
    ((ids, labels),) = step_rows(tokenizer, [row], "\n", None, False, 512)
    bos, prompt, s1, s2, nl = (
        tokenizer.bos_token_id,
        enc("Name a color."),
        enc("Blue."),
        enc("The quick brown fox."),
        enc("\n"),
    )
    assert ids == [bos, *prompt, *s1, *nl, *s2, *nl]
    assert len(nl) == 1
    step1_end = 1 + len(prompt) + len(s1)  # the separator's (only) token
    expected = [-100] * len(ids)
    expected[step1_end] = 1
    expected[-1] = 0
    assert labels == expected
    ((_, last),) = step_rows(tokenizer, [row], "\n", None, True, 512)
    assert [x for x in last if x != -100] == [0] and last[-1] == 0


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=cwd,
    )


def make_config(tmp_path: Path, base: Path, rows: list[dict], **extra) -> Path:
    """A process-reward config on the tiny model (LoRA unless overridden)."""
    data = write_jsonl(tmp_path / "steps.jsonl", rows)
    entry = {"path": str(data), "type": "stepwise_supervised", "step_separator": "\n"}
    entry.update(extra.pop("entry", {}))
    cfg = {
        "base_model": str(base),
        "process_reward_model": True,
        "datasets": [entry],
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


def _prepared(tmp_path: Path, split: str) -> datasets.Dataset:
    (folder,) = [p for p in (tmp_path / "prepared").iterdir() if (p / split).is_dir()]
    return datasets.load_from_disk(str(folder / split))


def _accuracy_and_loss(model, rows: datasets.Dataset) -> tuple[float, float]:
    """Step accuracy and mean CE over every labelled step of `rows`, one row at a time."""
    right, total, nll = 0, 0, 0.0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            for pos, label in enumerate(row["labels"]):
                if label == -100:
                    continue
                logp = torch.log_softmax(logits[pos].double(), -1)
                nll -= float(logp[label])
                right += int(int(logits[pos].argmax()) == label)
                total += 1
    return right / total, nll / total


def test_loss_is_the_cross_entropy_of_the_labelled_steps(tokenizer):
    from transformers import LlamaConfig, LlamaForTokenClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForTokenClassification(config)
    rows = step_rows(tokenizer, _samples(ROWS), "\n", None, False, 512)
    batch = StepCollator(tokenizer.pad_token_id, None)(
        [{"input_ids": i, "labels": lab} for i, lab in rows]
    )
    method = PRMMethod(type("C", (), {"num_labels": None})())
    model.train()  # the head's dropout (0.1 by default) is switched off by the method
    loss, metrics = method.loss(model, batch, Reference("none"))
    assert model.dropout.p == 0.0
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms, hits = [], []
    for r, (_, labels) in enumerate(rows):
        for pos, label in enumerate(labels):
            if label != -100:
                terms.append(-torch.log_softmax(logits[r, pos].double(), -1)[label])
                hits.append(float(int(logits[r, pos].argmax()) == label))
    assert len(terms) == sum(len(r["labels"]) for r in ROWS) == method.batch_rows(batch)
    assert abs(float(loss) - float(torch.stack(terms).mean())) < 1e-6
    assert abs(float(metrics["accuracy"]) - sum(hits) / len(hits)) < 1e-6
    builtin = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert abs(float(loss) - float(builtin)) < 1e-6  # transformers' own token-classification loss
    loss.backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0


def test_lora_train_evaluate_and_merge(tmp_path, model_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification

    from newtune.cli.evaluate import evaluate_command
    from newtune.cli.merge_lora import merge_lora_command

    cfg = make_config(tmp_path, model_dir, ROWS * 3, val_set_size=4, eval_steps=2)
    train_command(str(cfg))
    out = tmp_path / "out"
    logged = json.loads((out / "log_history.json").read_text())
    steps = [h for h in logged if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert all(math.isfinite(h["loss"]) and 0.0 <= h["accuracy"] <= 1.0 for h in steps)
    (last_eval,) = [h for h in logged if "eval_loss" in h]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "TOKEN_CLS"
    assert "score" in adapter["modules_to_save"] and "score" not in adapter["target_modules"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["training_method"] == "prm"
    test = _prepared(tmp_path, "test")
    assert len(test) == 4
    base = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=2)
    trained = PeftModel.from_pretrained(base, out).eval()
    accuracy, loss = _accuracy_and_loss(trained, test)
    assert abs(last_eval["eval_accuracy"] - accuracy) < 1e-6
    assert abs(last_eval["eval_loss"] - loss) < 1e-5
    capsys.readouterr()
    evaluate_command(str(cfg))
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval_rows"] == 4 and printed["split"] == "test"
    assert abs(printed["accuracy"] - accuracy) < 1e-6
    assert abs(printed["eval_loss"] - loss) < 1e-5
    merge_lora_command(str(cfg))
    merged = AutoModelForTokenClassification.from_pretrained(out / "merged").eval()
    assert merged.config.architectures == ["LlamaForTokenClassification"]
    ids = torch.tensor([test[0]["input_ids"]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Qwen2 with a BOS-less tokenizer (as Qwen2.5's), saved as a transformers folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = copy.deepcopy(tokenizer)
    tok.bos_token = None
    from conftest import save_tiny

    folder = tmp_path_factory.mktemp("qwen2")
    return save_tiny(folder, tok, Qwen2Config, Qwen2ForCausalLM, max_position_embeddings=256)


def test_full_finetune_saves_a_token_classifier(tmp_path, qwen_dir, capsys):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from newtune.cli.evaluate import evaluate_command

    no_lora = dict.fromkeys(LORA)
    cfg = make_config(
        tmp_path,
        qwen_dir,
        ROWS * 3,
        model_type="AutoModelForTokenClassification",
        num_labels=2,
        val_set_size=4,
        learning_rate=1e-3,
        entry={"train_on_last_step_only": True, "max_completion_length": 20},
        **no_lora,
    )
    train_command(str(cfg))
    out = tmp_path / "out"
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2ForTokenClassification"]
    model = AutoModelForTokenClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 2
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.bos_token_id is None
    train, test = _prepared(tmp_path, "train"), _prepared(tmp_path, "test")
    want = [oracle(tok, r, "\n", 20, True, 64) for r in ROWS * 3]
    want = sorted(row for row in want if any(x != -100 for x in row[1]))  # the rest are dropped
    assert len(want) == 6
    got = sorted((r["input_ids"], r["labels"]) for split in (train, test) for r in split)
    assert got == want  # no BOS; the last step's label only; steps cut at 20 tokens
    assert all(sum(x != -100 for x in lab) <= 1 for _, lab in got)
    accuracy, loss = _accuracy_and_loss(model, test)
    capsys.readouterr()
    evaluate_command(str(cfg))
    printed = json.loads(capsys.readouterr().out)
    assert abs(printed["accuracy"] - accuracy) < 1e-6
    assert abs(printed["eval_loss"] - loss) < 1e-5


def test_prepared_rows_equal_the_oracle(tmp_path, model_dir):
    """`newtune preprocess` writes exactly TRL's rows (order aside), with the cut counted."""
    from transformers import AutoTokenizer

    cfg = make_config(tmp_path, model_dir, ROWS, sequence_len=16)
    proc = _cli("preprocess", str(cfg))
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = _prepared(tmp_path, "train")
    got = sorted((r["input_ids"], r["labels"]) for r in rows)
    want = [oracle(tok, r, "\n", None, False, 16) for r in ROWS]
    want = sorted((i, lab) for i, lab in want if any(x != -100 for x in lab))
    assert got == want
    assert all(len(i) <= 16 for i, _ in got)


def test_validate_accepts_axolotl_prm_example():
    path = Path("/work/axolotl/examples/qwen2/prm.yaml")
    if not path.is_file():
        pytest.skip("Axolotl's examples are not on this machine")
    proc = _cli("validate", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_misuse_is_refused_at_validate(tmp_path, model_dir):
    cfg = make_config(
        tmp_path,
        model_dir,
        ROWS,
        sample_packing=True,
        chat_template="chatml",
        num_labels=3,
        model_type="AutoModelForCausalLM",
        reward_model=True,
    )
    proc = _cli("validate", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    err = proc.stderr
    for text in (
        "`sample_packing: true` with `process_reward_model: true`: process reward rows are "
        "padded one per batch row",
        "`chat_template: chatml` with `process_reward_model: true`: `type: stepwise_supervised` "
        "tokenizes the prompt and steps as plain text",
        "`num_labels: 3` with `process_reward_model: true`: each step is labelled right or wrong",
        "`model_type: AutoModelForCausalLM` with `process_reward_model: true`: a process reward "
        "model is a token classifier",
        "`process_reward_model: true` and `reward_model: true` are both set",
    ):
        assert text in err, (text, err)
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "out").exists()


def test_formats_and_keys_are_checked(tmp_path, model_dir):
    sft = tmp_path / "sft"
    sft.mkdir()
    cfg = make_config(sft, model_dir, ROWS, process_reward_model=None)
    proc = _cli("validate", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (
        "`datasets[0].type: stepwise_supervised` is a preference format (read with "
        "`process_reward_model: true`)" in proc.stderr
    )
    other = tmp_path / "other"
    other.mkdir()
    cfg = make_config(other, model_dir, ROWS, entry={"type": "alpaca"})
    proc = _cli("validate", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (
        "`datasets[0].type: alpaca` is an SFT format, not a format of "
        "`process_reward_model: true`; its formats are stepwise_supervised" in proc.stderr
    )


def test_bad_rows_and_inference_are_clear_errors(tmp_path, model_dir):
    bad = [*ROWS, {"prompt": "Say yes.", "completions": ["Yes.", "No."], "labels": [True]}]
    cfg = make_config(tmp_path, model_dir, bad)
    proc = _cli("preprocess", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (
        "datasets[0]" in proc.stderr
        and "row 4: 2 step(s) in `completions` and 1 label(s)" in proc.stderr
    )
    proc = _cli("inference", str(cfg), "--prompt", "Name a color.")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "(`process_reward_model: true`), which labels each reasoning step" in proc.stderr


def test_a_missing_type_names_stepwise_supervised(tmp_path, model_dir):
    cfg = make_config(tmp_path, model_dir, ROWS, entry={"type": None, "step_separator": None})
    proc = _cli("preprocess", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "`datasets[0].type` is missing for" in proc.stderr
    assert "(e.g. `type: stepwise_supervised` for prompt/completions/labels columns)" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_excess_length_drop_keeps_only_whole_rows(tmp_path, model_dir):
    """`excess_length_strategy: drop` drops rows over sequence_len instead of cutting them."""
    from transformers import AutoTokenizer

    cfg = make_config(tmp_path, model_dir, ROWS, sequence_len=16, excess_length_strategy="drop")
    proc = _cli("preprocess", str(cfg))
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(model_dir)
    whole = [oracle(tok, r, "\n", None, False, 10_000) for r in ROWS]
    want = sorted(row for row in whole if len(row[0]) <= 16)
    assert 0 < len(want) < len(ROWS)
    got = sorted((r["input_ids"], r["labels"]) for r in _prepared(tmp_path, "train"))
    assert got == want
    (folder,) = [p for p in (tmp_path / "prepared").iterdir() if (p / "stats.json").is_file()]
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["dropped_too_long"] == len(ROWS) - len(want)


def test_sft_only_keys_are_refused(tmp_path, model_dir):
    """EAFT and generation evals weigh or generate next tokens: a token classifier has none."""
    cfg = make_config(
        tmp_path, model_dir, ROWS, use_eaft=True, do_causal_lm_eval=True, val_set_size=1
    )
    proc = _cli("validate", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "the config trains with `process_reward_model: true`, which has its own loss" in (
        proc.stderr
    )
    assert "`do_causal_lm_eval` applies to supervised fine-tuning" in proc.stderr
