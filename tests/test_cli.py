"""The CLI end to end on a tiny model: preprocess -> train -> merge-lora -> inference."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from conftest import write_jsonl

from newtune.cli.inference import inference_command
from newtune.cli.merge_lora import merge_lora_command
from newtune.cli.preprocess import preprocess_command
from newtune.cli.train import train_command

CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"The answer is {a + b}."},
        ]
    }
    for a in range(4)
    for b in range(4)
]
ALPACA = [
    {"instruction": "Name a color.", "input": "", "output": c} for c in ("Blue.", "Red.", "Green.")
] * 4


def make_config(tmp_path: Path, model_dir: Path, data: Path, kind: str, **extra) -> Path:
    cfg = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": kind}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 3,
        "learning_rate": 0.01,
        "logging_steps": 1,
        **extra,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=300
    )


def train_on_two_cpu_ranks(cfg: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` with two CPU processes (gloo DDP) running `newtune.cli.train`."""
    return cli(
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",  # a free port: launches may run side by side (pytest -n)
        "0",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "newtune.cli.train",
        str(cfg),
    )


def test_lora_preprocess_train_merge_inference(tmp_path, model_dir, capsys, monkeypatch):
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
        val_set_size=0.25,
    )
    # preprocess: the prepared-data contract
    preprocess_command(str(cfg))
    prepared = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert prepared.parent == tmp_path / "prepared" and len(prepared.name) == 16
    dd = datasets.load_from_disk(str(prepared))
    assert set(dd) == {"train", "test"} and (len(dd["train"]), len(dd["test"])) == (12, 4)
    assert set(dd["train"].column_names) == {"input_ids", "attention_mask", "labels"}
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["splits"]["train"]["rows"] == 12 and stats["fingerprint"] == prepared.name
    assert not [p for p in prepared.parent.iterdir() if p.name.startswith(".tmp")]

    # train reuses the prepared data and writes the adapter, tokenizer and config
    train_command(str(cfg))
    out = tmp_path / "out"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "newtune_config.yml",
        "stats.json",
    ):
        assert (out / name).is_file(), name
    assert [p.name for p in (tmp_path / "prepared").iterdir() if p.suffix != ".lock"] == [
        prepared.name
    ]
    saved = yaml.safe_load((out / "newtune_config.yml").read_text())
    assert saved["adapter"] == "lora" and saved["lora_r"] == 4
    results = json.loads((out / "train_results.json").read_text())
    assert "eval_loss" in results and results["epoch"] > 0

    # merge-lora: merged logits equal base + adapter
    merge_lora_command(str(cfg))
    merged = out / "merged"
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([dd["test"][0]["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        base_logits = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, out)(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=1e-5)

    # inference: --prompt, then piped stdin (one answer per line)
    capsys.readouterr()
    inference_command(str(cfg), prompt="What is 1 plus 2?", max_new_tokens=4)
    assert len(capsys.readouterr().out.strip("\n").splitlines()) == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 1 plus 2?\n\nWhat is 3 plus 3?\n"))
    inference_command(str(cfg), max_new_tokens=4)
    assert len(capsys.readouterr().out.rstrip("\n").split("\n")) == 2


def test_full_finetune_via_python_m(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    cfg = make_config(tmp_path, model_dir, data, "alpaca")
    proc = cli("-m", "newtune.cli.train", str(cfg), "--max_steps=2")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    history = json.loads((out / "log_history.json").read_text())
    assert history[-1]["step"] == 2
    proc = cli(
        "-m", "newtune.cli.inference", str(cfg), "--prompt", "Name a color.", "--max_new_tokens=3"
    )
    assert proc.returncode == 0, proc.stderr
    assert f"model: {out}" in proc.stderr  # the full fine-tune is what answered


BAD_CASES = {
    "missing base_model": (
        {"base_model": "./does/not/exist"},
        "preprocess",
        "`base_model: ./does/not/exist` does not exist",
    ),
    "missing data file": (
        {"datasets": [{"path": "./missing.jsonl", "type": "alpaca"}]},
        "preprocess",
        "datasets[0].path: ./missing.jsonl does not exist",
    ),
    "unknown key": ({"learning_rat": 0.1}, "validate", "unknown key `learning_rat`"),
    "unknown type": (
        {"datasets": [{"path": "DATA", "type": "alpacca"}]},
        "validate",
        "`datasets[0].type: alpacca` is not a dataset format newtune knows. Did you mean "
        "`alpaca`? Known formats: alpaca, alpaca_chat, alpaca_chat.load_camel_ai,",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_paragraph_without_traceback(tmp_path, model_dir, case):
    changes, command, expected = BAD_CASES[case]
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    cfg = yaml.safe_load(make_config(tmp_path, model_dir, data, "alpaca").read_text())
    cfg.update(yaml.safe_load(yaml.safe_dump(changes).replace("DATA", str(data))))
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    proc = cli("-m", "newtune.cli.main", command, str(tmp_path / "cfg.yml"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    err = proc.stderr[proc.stderr.index("newtune: error:") :]
    assert expected in " ".join(err.split())


def test_validate_prints_resolved_config_and_plan(tmp_path, model_dir, capsys):
    from newtune.cli.validate import validate_command

    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    cfg = make_config(tmp_path, model_dir, data, "alpaca", gradient_accumulation_steps=2)
    validate_command(str(cfg), micro_batch_size=3)
    out = capsys.readouterr().out
    assert out.startswith(f"# {cfg}: valid (keys left null are not shown)\n")
    assert "wandb_project" not in out and "attn_implementation: sdpa" in out
    assert "micro_batch_size: 3\n" in out and "effective_batch_size: 6\n" in out


def test_interactive_chat_keeps_history(tmp_path, model_dir):
    from newtune.config import load_config
    from newtune.inference import GenerationOptions, build_generator, interactive

    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = load_config(str(make_config(tmp_path, model_dir, data, "chat_template"))).config
    gen = build_generator(cfg, GenerationOptions(max_new_tokens=3))
    out = io.StringIO()
    interactive(gen, io.StringIO("Hello there!\n\nWhat is 1 plus 2?\nsecond line\n\n"), out)
    assert [m["role"] for m in gen.history] == ["user", "assistant", "user", "assistant"]
    assert gen.history[2]["content"] == "What is 1 plus 2?\nsecond line"
    rendered = gen.tokenizer.decode(gen.prompt_ids("Next?", gen.history))
    assert rendered.count("<|im_start|>user\n") == 3
    assert rendered.endswith("<|im_start|>user\nNext?<|im_end|>\n<|im_start|>assistant\n")


def test_accelerate_launch_two_cpu_ranks_share_the_data(tmp_path, model_dir):
    """Regression: without use_cpu, each CPU rank trained alone on all the data."""
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)  # 12 rows
    cfg = make_config(tmp_path, model_dir, data, "alpaca", adapter="lora", lora_r=2)
    proc = train_on_two_cpu_ranks(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    # 3 steps x 2 rows x 2 ranks = 12 rows = one epoch
    assert history[-1]["step"] == 3 and history[-1]["epoch"] == pytest.approx(1.0)


@pytest.mark.parametrize("packing", [False, True])
def test_evals_per_epoch_uses_the_real_steps_per_epoch(tmp_path, model_dir, packing):
    """Regression: steps per epoch was taken as 1, so evals_per_epoch evaluated every step."""
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 2)  # 24 rows, 4 held out
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        "alpaca",
        max_steps=None,
        num_epochs=1,
        val_set_size=4,
        evals_per_epoch=2,
        micro_batch_size=1 if packing else 2,
        sequence_len=128 if packing else 64,
        sample_packing=packing,
    )
    train_command(str(cfg))
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    steps = max(h["step"] for h in history)
    evals = [h["step"] for h in history if "eval_loss" in h]
    assert steps >= 4 and evals == [steps // 2, steps]  # the final eval is not run again
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert results["eval_loss"] == history[-2]["eval_loss"]


def test_group_by_length_trains_with_similar_lengths_together(tmp_path, model_dir):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from newtune.train import run

    seen = {}
    real = run.NewtuneTrainer._get_train_sampler

    def spy(self, *args, **kwargs):
        seen["sampler"] = real(self, *args, **kwargs)
        return seen["sampler"]

    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    cfg = make_config(tmp_path, model_dir, data, "alpaca", group_by_length=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run.NewtuneTrainer, "_get_train_sampler", spy)
        train_command(str(cfg))
    assert isinstance(seen["sampler"], LengthGroupedSampler)
    prepared = next(p for p in (tmp_path / "prepared").iterdir() if not p.name.startswith("."))
    train = datasets.load_from_disk(str(prepared))["train"]
    assert seen["sampler"].lengths == [len(ids) for ids in train["input_ids"]]
