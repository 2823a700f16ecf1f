"""Generation metrics during eval: a CLI run logs sacrebleu's scores of its answers and writes
the prompt / reference / prediction table; the answers are inference's answers."""

from __future__ import annotations

import json

import pytest
import sacrebleu
from conftest import write_jsonl
from test_cli import CHATS, cli, make_config

from newtune.config.load import load_config
from newtune.inference import GenerationOptions, build_generator
from newtune.train.generation_eval import Prediction, split_row, write_table

IGNORE = -100


def test_split_row_takes_the_prompt_and_the_first_trained_span():
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    labels = [IGNORE, IGNORE, IGNORE, 4, 5, IGNORE, 7, 8]  # a second turn after 6
    assert split_row(ids, labels) == ([1, 2, 3], [4, 5])
    assert split_row(ids, [IGNORE] * 8) is None  # nothing trained
    assert split_row(ids, ids) is None  # no prompt (completion rows)


def test_table_files_escape_markdown(tmp_path):
    rows = [Prediction("a|b\nc", "ref", "pred")]
    jsonl, md = write_table(tmp_path / "t", 7, rows)
    assert json.loads(jsonl.read_text()) == {
        "prompt": "a|b\nc",
        "reference": "ref",
        "prediction": "pred",
    }
    assert md.read_text().splitlines()[-1] == "| a\\|b<br>c | ref | pred |"
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["step-7.jsonl", "step-7.md"]


@pytest.mark.slow
def test_cli_run_logs_sacrebleu_metrics_and_writes_the_predictions_table(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        "chat_template",
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_linear=True,
        max_steps=2,
        learning_rate=0.05,
        val_set_size=0.25,
        eval_steps=1,
        do_causal_lm_eval=True,
        eval_causal_lm_metrics=["sacrebleu", "chrf", "ter", "perplexity"],
        eval_max_new_tokens=6,
        eval_table_size=10,
    )
    proc = cli("-m", "newtune.cli.main", "train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    history = json.loads((out / "log_history.json").read_text())
    logged = {h["step"]: h for h in history if "eval_sacrebleu" in h}
    assert sorted(logged) == [1, 2]  # every evaluation
    for step, entry in logged.items():
        rows = [json.loads(x) for x in (out / "eval_predictions" / f"step-{step}.jsonl").open()]
        assert len(rows) == 4  # every eval row (4 of 16), under eval_table_size
        preds = [r["prediction"] for r in rows]
        refs = [r["reference"] for r in rows]
        assert all(r.startswith("The answer is ") for r in refs)
        assert entry["eval_sacrebleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
        assert entry["eval_chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
        assert entry["eval_ter"] == pytest.approx(sacrebleu.corpus_ter(preds, [refs]).score)
        assert (out / "eval_predictions" / f"step-{step}.md").read_text().count(
            "\n| "
        ) == 1 + 4  # header + rows
    assert any("eval_perplexity" in h for h in history)  # perplexity: the eval loss's
    results = json.loads((out / "train_results.json").read_text())
    assert results["eval_sacrebleu"] == logged[2]["eval_sacrebleu"]  # the final eval's
    assert results["eval_chrf"] == logged[2]["eval_chrf"]

    # the answers at the last step (the final weights) are `newtune inference`'s answers
    loaded = load_config(str(cfg))
    gen = build_generator(loaded.config, GenerationOptions(max_new_tokens=6))
    questions = [c["messages"][0]["content"] for c in CHATS]
    rendered = {
        gen.tokenizer.decode(gen.prompt_ids(q), skip_special_tokens=False): q for q in questions
    }
    last = [json.loads(x) for x in (out / "eval_predictions" / "step-2.jsonl").open()]
    for row in last:
        question = rendered[row["prompt"]]  # the prompt inference renders for that question
        assert gen.answer(question) == row["prediction"]


def test_comet_without_its_package_is_refused_with_the_pip_command(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        "chat_template",
        val_set_size=0.25,
        do_causal_lm_eval=True,
        eval_causal_lm_metrics=["comet"],
    )
    proc = cli("-m", "newtune.cli.main", "train", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    flat = " ".join(proc.stderr.split())
    assert "`eval_causal_lm_metrics: [comet]` needs the comet package" in flat
    assert "pip install unbabel-comet" in flat
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            {"do_causal_lm_eval": True},
            "`do_causal_lm_eval` generates answers to the eval rows: set",
        ),
        (
            {"eval_causal_lm_metrics": ["chrf"], "val_set_size": 0.25},
            "`eval_causal_lm_metrics` without `do_causal_lm_eval: true`",
        ),
        (
            {"do_causal_lm_eval": True, "val_set_size": 0.25, "eval_causal_lm_metrics": ["bleu"]},
            "eval_causal_lm_metrics",
        ),
    ],
)
def test_generation_eval_misuse_is_refused(tmp_path, model_dir, keys, expected):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(tmp_path, model_dir, data, "chat_template", **keys)
    proc = cli("-m", "newtune.cli.main", "validate", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert expected in " ".join(proc.stderr.split())
