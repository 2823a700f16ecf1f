"""Axolotl-style configs train 2 steps end to end on tiny local models of three families.

Each config is written the way Axolotl's examples are (hub dataset ids, empty wandb keys,
`bf16: auto`, packing, chat templates; LoRA, QLoRA and a full fine-tune); the run happens in a
temp working directory where `<org>/<dataset>/train.jsonl` exists, so the dataset id resolves to
that local folder before the hub (offline). The tiny models and synthetic rows come from
benchmarks/axolotl_examples_run.py, which runs Axolotl's own examples the same way.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "axolotl_examples_run", ROOT / "benchmarks" / "axolotl_examples_run.py"
)
assert _spec and _spec.loader
bench = importlib.util.module_from_spec(_spec)
sys.modules["axolotl_examples_run"] = bench  # dataclasses look their module up by name
_spec.loader.exec_module(bench)

COMMON: dict[str, Any] = {  # keys every Axolotl example carries, as they carry them
    "dataset_prepared_path": "last_run_prepared",
    "output_dir": "./outputs/out",
    "wandb_project": None,
    "wandb_entity": None,
    "wandb_watch": None,
    "wandb_name": None,
    "wandb_log_model": None,
    "num_epochs": 1,
    "lr_scheduler": "cosine",
    "learning_rate": 0.0002,
    "bf16": "auto",
    "tf32": False,
    "gradient_checkpointing": True,
    "resume_from_checkpoint": None,
    "logging_steps": 1,
    "warmup_ratio": 0.1,
    "saves_per_epoch": 1,
    "weight_decay": 0.0,
}

LLAMA_LORA = {  # llama-3/lora-1b.yml's shape: alpaca, packing, LoRA on a module list
    "base_model": "NousResearch/Llama-3.2-1B",
    "datasets": [{"path": "teknium/GPT4-LLM-Cleaned", "type": "alpaca"}],
    "val_set_size": 0.1,
    "adapter": "lora",
    "lora_model_dir": None,
    "sequence_len": 256,
    "sample_packing": True,
    "eval_sample_packing": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_target_modules": ["gate_proj", "down_proj", "up_proj", "q_proj", "v_proj", "k_proj"],
    "gradient_accumulation_steps": 2,
    "micro_batch_size": 2,
    "optimizer": "adamw_torch",
    "attn_implementation": "sdpa",
    "evals_per_epoch": 4,
    "special_tokens": {"pad_token": "<|end_of_text|>"},
}

GEMMA2_QLORA = {  # gemma2/qlora.yml's shape: gemma template, eot_tokens, QLoRA, ShareGPT rows
    "base_model": "google/gemma-2-2b",
    "model_type": "AutoModelForCausalLM",
    "tokenizer_type": "AutoTokenizer",
    "chat_template": "gemma",
    "eot_tokens": ["<end_of_turn>"],
    "datasets": [
        {
            "path": "cgato/SlimOrcaDedupCleaned",
            "type": "chat_template",
            "split": "train[:75%]",  # a `datasets` slice, as qwen3/32b-qlora.yaml's train[:20%]
            "drop_system_message": True,
            "field_messages": "conversations",
            "message_property_mappings": {"role": "from", "content": "value"},
        }
    ],
    "val_set_size": 0.0,
    "load_in_8bit": False,
    "load_in_4bit": True,
    "adapter": "qlora",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_linear": True,
    "sequence_len": 256,
    "sample_packing": True,
    "gradient_accumulation_steps": 2,
    "micro_batch_size": 1,
    "optimizer": "adamw_torch",
    "attn_implementation": "eager",
    "evals_per_epoch": None,
    "special_tokens": None,
}

PHI3_FULL = {  # phi/phi3-ft.yml's shape without packing: a full fine-tune on messages rows
    "base_model": "microsoft/Phi-3-mini-4k-instruct",
    "model_type": "AutoModelForCausalLM",
    "tokenizer_type": "AutoTokenizer",
    "chat_template": "phi_3",
    "datasets": [{"path": "fozziethebeat/alpaca_messages_2k_test", "type": "chat_template"}],
    "val_set_size": 0.05,
    "sequence_len": 128,
    "sample_packing": False,
    "gradient_accumulation_steps": 1,
    "micro_batch_size": 2,
    "optimizer": "adamw_torch",
    "adam_beta2": 0.95,
    "max_grad_norm": 1.0,
    "evals_per_epoch": 1,
}

CASES = [
    ("llama", LLAMA_LORA, bench.alpaca_rows, "adapter_model.safetensors"),
    ("gemma2", GEMMA2_QLORA, bench.sharegpt_rows, "adapter_model.safetensors"),
    ("phi3", PHI3_FULL, bench.messages_rows, "model.safetensors"),
]


def train_two_steps(workdir: Path, family: str, config: dict[str, Any], rows: Any) -> Any:
    """Build the tiny model and the datasets in `workdir`, run `newtune train` there."""
    model_dir = bench.build_model(workdir / f"tiny-{family}", bench.FAMILIES[family])
    cfg_path = workdir / "config.yml"
    cfg_path.write_text(yaml.safe_dump({**config, **COMMON}, sort_keys=False))
    for entry in config["datasets"]:
        folder = workdir / entry["path"]
        folder.mkdir(parents=True)
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(64)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "newtune.cli.main",
            "train",
            str(cfg_path),
            f"--base_model={model_dir}",
            "--max_steps=2",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(("family", "config", "rows", "weights"), CASES, ids=[c[0] for c in CASES])
def test_axolotl_style_config_trains_two_steps(tmp_path, family, config, rows, weights):
    proc = train_two_steps(tmp_path, family, config, rows)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = tmp_path / "outputs" / "out"
    history = json.loads((out / "log_history.json").read_text())
    losses = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert sorted(losses) == [1, 2]
    assert all(math.isfinite(x) and x > 0 for x in losses.values())
    assert (out / weights).is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "newtune_config.yml"):
        assert (out / name).is_file(), name
    saved = yaml.safe_load((out / "newtune_config.yml").read_text())
    assert saved["base_model"] == str(tmp_path / f"tiny-{family}")
    assert saved["max_steps"] == 2
    assert saved["datasets"][0]["path"] == config["datasets"][0]["path"]
    # the hub id was read from the local folder: the 64 rows written there (48 for
    # `train[:75%]`), each supervised
    stats = json.loads((out / "stats.json").read_text())
    rows_read = 48 if family == "gemma2" else 64
    assert [(d["path"], d["rows"]) for d in stats["datasets"]] == [
        (config["datasets"][0]["path"], rows_read)
    ]
    assert stats["dropped_no_supervision"] == 0 and stats["supervised_tokens"] > 64
    assert any(p.is_dir() for p in (tmp_path / "last_run_prepared").iterdir())
    model_type = json.loads((tmp_path / f"tiny-{family}" / "config.json").read_text())
    assert model_type["model_type"] == family


def test_benchmark_overrides_name_only_what_the_cpu_needs(tmp_path):
    cfg = {
        "attn_implementation": "flash_attention_2",
        "plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"],
        "lora_qkv_kernel": True,
        "lora_o_kernel": False,
        "sequence_len": 4096,
        "optimizer": "adamw_bnb_8bit",
        "load_in_8bit": True,
    }
    gemma = bench.cpu_overrides(cfg, bench.FAMILIES["gemma2"], tmp_path)
    assert [(k, v) for k, v, _ in gemma] == [
        ("output_dir", str(tmp_path)),
        ("attn_implementation", "eager"),  # transformers has no sdpa path for Gemma 2
        ("cut_cross_entropy", False),
        ("lora_qkv_kernel", False),
        ("sequence_len", bench.SEQUENCE_LEN),
    ]
    llama = bench.cpu_overrides({"flash_attention": True}, bench.FAMILIES["llama"], tmp_path)
    assert [(k, v) for k, v, _ in llama] == [
        ("output_dir", str(tmp_path)),
        ("flash_attention", False),
    ]


@pytest.mark.parametrize(
    ("split", "expected"),
    [("train", 10), ("train[:50%]", 5), ("train[2:4]", 2), ("test[:1]", 1), ("test", 3)],
)
def test_split_slice_of_a_local_folder_is_read_as_datasets_reads_it(
    tmp_path, monkeypatch, split, expected
):
    """Regression: `split: train[:20%]` on a local folder was an error (no file of split
    `train[:20%]`), and on a file or a folder without split names the slice was ignored."""
    from newtune.config.schema import DatasetEntry
    from newtune.data.sources import load_rows

    monkeypatch.chdir(tmp_path)
    rows = bench.alpaca_rows(10)
    folder = tmp_path / "org" / "ds"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[7:]))
    got = load_rows(DatasetEntry(path="org/ds", type="alpaca", split=split), 0)
    first = {"train": 0, "train[:50%]": 0, "train[2:4]": 2, "test[:1]": 7, "test": 7}[split]
    assert got["instruction"] == [r["instruction"] for r in rows[first : first + expected]]
    single = load_rows(DatasetEntry(path="org/ds/train.jsonl", type="alpaca", split=split), 0)
    if split.startswith("train"):  # a single file is the train split, sliced
        assert single["output"] == [r["output"] for r in rows[first : first + expected]]
