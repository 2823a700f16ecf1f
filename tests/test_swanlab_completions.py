"""SwanLab completion table (`swanlab_log_completions`): the rows trained on, logged every
`swanlab_completion_log_interval` steps from a buffer of `swanlab_completion_max_buffer` rows,
through `newtune train` on the tiny model; and the validate refusals.

swanlab itself is not a test dependency: a stand-in package on PYTHONPATH records what
transformers' SwanLabCallback and the completion callback hand to `swanlab.init` / `swanlab.log`
(tables as their headers and rows). When the real swanlab is installed, one run also goes
through it in offline mode and the table is read back from its run folder.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl
from transformers import AutoTokenizer

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
PAIR_HEADERS = [
    "step",
    "prompt",
    "chosen",
    "rejected",
    "reward_chosen",
    "reward_rejected",
    "reward_diff",
    "logps_chosen",
    "logps_rejected",
]
SWANLAB = {"use_swanlab": True, "swanlab_project": "p", "swanlab_mode": "offline"}

FAKE_SWANLAB = '''"""Stand-in for swanlab: records init and log calls as JSON lines in $FAKE_SWANLAB_LOG."""
import json
import os

_runs = []


def _record(entry):
    with open(os.environ["FAKE_SWANLAB_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")


class _Config(dict):
    pass


config = _Config()


def init(**kwargs):
    _runs.append(object())
    _record({"init": {k: v for k, v in kwargs.items() if isinstance(v, str)}})
    return _runs[-1]


def has_run():
    return bool(_runs)


def get_run():
    return _runs[-1] if _runs else None


def log(data, step=None):
    for key, value in data.items():
        if isinstance(value, echarts.Table):
            _record({"table": key, "step": step, "headers": value.headers, "rows": value.rows})
        else:
            _record({"metric": key, "step": step})


def finish():
    _runs.clear()


class echarts:
    class Table:
        def add(self, headers, rows):
            self.headers, self.rows = list(headers), [list(r) for r in rows]
            return self
'''


def fake_swanlab(tmp_path: Path) -> dict[str, str]:
    """The environment that puts the stand-in swanlab first on the path."""
    site = tmp_path / "fakesite" / "swanlab"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text(FAKE_SWANLAB)
    path = [str(site.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path), "FAKE_SWANLAB_LOG": str(tmp_path / "swan.jsonl")}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`newtune ...` in a subprocess, offline."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=300,
    )


def make_config(tmp_path: Path, model_dir: Path, rows: list[dict], kind: str, **extra) -> Path:
    """A LoRA config training `kind` rows on the tiny model for 3 steps of 2 rows."""
    data = write_jsonl(tmp_path / "data.jsonl", rows)
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
        "seed": 7,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        **extra,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))
    return path


def records(tmp_path: Path) -> list[dict]:
    """What the stand-in swanlab was given."""
    log = tmp_path / "swan.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def history(out: Path) -> dict[int, dict]:
    """Training log entries (those with a loss) by step."""
    entries = json.loads((out / "log_history.json").read_text())
    return {h["step"]: h for h in entries if "loss" in h}


def rendered(model_dir: Path, rows: list[dict], *keys: str) -> dict[tuple[str, ...], dict]:
    """The `preference` format's texts as the model saw them (BOS + prompt, completion + EOS;
    special tokens kept), mapped to their dataset row."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for row in rows:
        texts = (tok.bos_token + row["prompt"], *(row[k] + tok.eos_token for k in keys))
        out[texts] = row
    return out


def test_dpo_run_logs_the_bounded_table_every_interval(tmp_path, model_dir):
    env = fake_swanlab(tmp_path)
    cfg = make_config(
        tmp_path,
        model_dir,
        PAIRS,
        "preference",
        rl="dpo",
        **SWANLAB,
        swanlab_log_completions=True,
        swanlab_completion_log_interval=2,
        swanlab_completion_max_buffer=3,
    )
    result = cli("train", str(cfg), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = records(tmp_path)
    assert logged[0]["init"]["project"] == "p"
    tables = [r for r in logged if "table" in r]
    # steps 1 and 2 trained 4 rows; the buffer kept the newest 3; step 3's 2 rows at the end
    assert [(t["table"], t["step"], len(t["rows"])) for t in tables] == [
        ("rlhf_completions", 2, 3),
        ("rlhf_completions", 3, 2),
    ]
    assert all(t["headers"] == PAIR_HEADERS for t in tables)
    rows = [dict(zip(PAIR_HEADERS, r, strict=True)) for t in tables for r in t["rows"]]
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 3]
    expected = rendered(model_dir, PAIRS, "chosen", "rejected")
    texts = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    assert set(texts) <= set(expected)  # each row's texts are one dataset row's, exactly
    assert len(set(texts)) == 5  # one epoch of 6 pairs, the first row of step 1 dropped
    for row in rows:
        assert row["reward_diff"] == pytest.approx(row["reward_chosen"] - row["reward_rejected"])
        assert all(math.isfinite(row[k]) for k in PAIR_HEADERS[4:])
    # per-row values are the loss's own: their means are the logged metrics of each step
    logs = history(tmp_path / "out")
    for step in (2, 3):
        at = [r for r in rows if r["step"] == step]
        for name, metric in (
            ("reward_chosen", "rewards/chosen"),
            ("reward_rejected", "rewards/rejected"),
            ("reward_diff", "rewards/margins"),
            ("logps_chosen", "logps/chosen"),
            ("logps_rejected", "logps/rejected"),
        ):
            mean = sum(r[name] for r in at) / len(at)
            assert mean == pytest.approx(logs[step][metric], rel=1e-4, abs=1e-6), (step, name)
    assert "Traceback" not in result.stderr


def base_logp(model_dir: Path, prompt: str, completion: str) -> float:
    """Summed log-prob of `completion` after `prompt` under the untrained tiny model (the texts
    as the table shows them, special tokens included, tokenized back)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    tail = tok(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(picked[len(head) - 1 :].sum())


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_each_rows_values_are_that_rows_own(tmp_path, model_dir, packed):
    """Step 1: the LoRA policy is the base model, so each row's log-probs are the base model's
    log-probs of that row's texts and its rewards are 0, padded or packed (shared prompts)."""
    env = fake_swanlab(tmp_path)
    cfg = make_config(
        tmp_path, model_dir, PAIRS, "preference", rl="dpo", max_steps=1, **SWANLAB,
        sample_packing=packed or None, swanlab_completion_log_interval=1,
    )  # fmt: skip
    result = cli("train", str(cfg), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (table,) = [r for r in records(tmp_path) if "table" in r]
    rows = [dict(zip(PAIR_HEADERS, r, strict=True)) for r in table["rows"]]
    assert len(rows) == 2 and rows[0]["prompt"] != rows[1]["prompt"]
    for row in rows:
        for side in ("chosen", "rejected"):
            expected = base_logp(model_dir, row["prompt"], row[side])
            assert row[f"logps_{side}"] == pytest.approx(expected, abs=1e-4), (row, side)
            assert row[f"reward_{side}"] == pytest.approx(0.0, abs=1e-6)


def test_orpo_and_kto_tables_and_the_default_interval(tmp_path, model_dir):
    env = fake_swanlab(tmp_path / "orpo")
    cfg = make_config(tmp_path / "orpo", model_dir, PAIRS, "preference", rl="orpo", **SWANLAB)
    result = cli("train", str(cfg), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (table,) = [r for r in records(tmp_path / "orpo") if "table" in r]
    # unset keys: Axolotl's defaults (on, every 100 steps, 128 rows): all 6 rows at the end
    assert table["step"] == 3 and len(table["rows"]) == 6
    assert table["headers"] == [*PAIR_HEADERS, "log_odds_ratio", "log_odds_chosen"]
    assert {tuple(r[1:4]) for r in table["rows"]} == set(
        rendered(model_dir, PAIRS, "chosen", "rejected")
    )

    env = fake_swanlab(tmp_path / "kto")
    cfg = make_config(
        tmp_path / "kto",
        model_dir,
        UNPAIRED,
        "unpaired_preference",
        rl="kto",
        max_steps=2,
        gradient_accumulation_steps=2,
        **SWANLAB,
        swanlab_completion_log_interval=1,
        swanlab_completion_max_buffer=3,
    )
    result = cli("train", str(cfg), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    tables = [r for r in records(tmp_path / "kto") if "table" in r]
    headers = ["step", "prompt", "completion", "label", "reward", "logps"]
    # each step trains 2 micro-batches of 2 rows: the newest 3 of its 4, all of that step
    assert [(t["step"], t["headers"], len(t["rows"])) for t in tables] == [
        (1, headers, 3),
        (2, headers, 3),
    ]
    expected = rendered(model_dir, UNPAIRED, "completion")
    seen = []
    for table in tables:
        for step, prompt, completion, label, reward, logps in table["rows"]:
            assert step == table["step"]
            source = expected[(prompt, completion)]
            assert label == ("desirable" if source["label"] else "undesirable")
            assert math.isfinite(reward) and logps < 0
            seen.append((prompt, completion))
    assert len(set(seen)) == 6  # 8 rows of one epoch trained, 6 logged, none twice


def test_log_completions_false_logs_no_table(tmp_path, model_dir):
    env = fake_swanlab(tmp_path)
    cfg = make_config(
        tmp_path, model_dir, PAIRS, "preference", rl="dpo", max_steps=1, **SWANLAB,
        swanlab_log_completions=False,
    )  # fmt: skip
    result = cli("train", str(cfg), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = records(tmp_path)
    assert any("metric" in r for r in logged)  # the metrics still reach swanlab
    assert not [r for r in logged if "table" in r]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {**SWANLAB, "swanlab_log_completions": True},
            "`swanlab_log_completions: true` logs the prompt, chosen/rejected (or KTO's "
            "completion) and per-row rewards of preference training (`rl: dpo`, ipo, simpo, "
            "orpo or kto), but this config trains SFT, which has no such rows; remove the key "
            "or set it false",
        ),
        (
            {**SWANLAB, "reward_model": True, "swanlab_log_completions": True},
            "but this config trains a reward model, which has no such rows",
        ),
        (
            {**SWANLAB, "rl": "dpo", "swanlab_log_completions": False,
             "swanlab_completion_log_interval": 10},
            "`swanlab_completion_log_interval` shapes the SwanLab completion table, which this "
            "run does not log (`swanlab_log_completions` is false); remove it",
        ),
        (
            {**SWANLAB, "swanlab_completion_log_interval": 10,
             "swanlab_completion_max_buffer": 5},
            "`swanlab_completion_log_interval` and `swanlab_completion_max_buffer` shape the "
            "SwanLab completion table, which this run does not log (only preference training "
            "(`rl: dpo`, ipo, simpo, orpo or kto) logs one); remove them",
        ),
        (
            {"rl": "dpo", "swanlab_log_completions": True},
            "`swanlab_log_completions` set without `use_swanlab: true`",
        ),
        (
            {**SWANLAB, "rl": "dpo", "swanlab_completion_max_buffer": 0},
            "swanlab_completion_max_buffer",
        ),
    ],
)  # fmt: skip
def test_validate_refuses_completion_keys_that_would_do_nothing(tmp_path, keys, message):
    kind = "preference" if keys.get("rl") or keys.get("reward_model") else "alpaca"
    rows = PAIRS if kind == "preference" else [{"instruction": "a", "output": "b"}]
    cfg = make_config(tmp_path, tmp_path / "no-model", rows, kind, **keys)
    result = cli("validate", str(cfg))
    assert result.returncode != 0
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_validate_accepts_axolotls_completion_example_keys(tmp_path):
    keys = {
        **SWANLAB,
        "plugins": ["axolotl.integrations.swanlab.SwanLabPlugin"],
        "rl": "dpo",
        "swanlab_experiment_name": "e",
        "swanlab_description": "DPO training with completion table logging",
        "swanlab_workspace": "team",
        "swanlab_log_model": False,
        "swanlab_log_completions": True,
        "swanlab_completion_log_interval": 100,
        "swanlab_completion_max_buffer": 256,
    }
    cfg = make_config(tmp_path, tmp_path / "no-model", PAIRS, "preference", **keys)
    result = cli("validate", str(cfg))
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(importlib.util.find_spec("swanlab") is None, reason="swanlab not installed")
def test_real_swanlab_offline_run_records_the_table(tmp_path, model_dir):
    env = {"SWANLAB_LOG_DIR": str(tmp_path / "swanlog"), "SWANLAB_ROOT": str(tmp_path / "root")}
    cfg = make_config(
        tmp_path, model_dir, PAIRS, "preference", rl="dpo", max_steps=2, **SWANLAB,
        swanlab_completion_log_interval=1, swanlab_completion_max_buffer=2,
    )  # fmt: skip
    result = cli("train", str(cfg), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted((tmp_path / "swanlog").rglob("media/echarts/*.json"))
    tables = [json.loads(f.read_text()) for f in files]
    assert [len(t["rowData"]) for t in tables] == [2, 2]
    assert [c["field"] for c in tables[0]["colDefs"]] == PAIR_HEADERS
    assert [r["step"] for t in tables for r in t["rowData"]] == [1, 1, 2, 2]


def test_swanlab_setup_works_where_get_run_raises_without_a_run(tmp_path, monkeypatch):
    """swanlab >= 0.10: get_run() raises until init; transformers' setup tests it for None."""
    import importlib.machinery
    import types

    from transformers import LlamaConfig, LlamaForCausalLM

    from newtune.config.given import load_given
    from newtune.config.resolve import resolve
    from newtune.train.args import build_training_args
    from newtune.train.callbacks import build_callbacks
    from newtune.train.report import tracker_env

    runs: list[object] = []
    inits: list[dict] = []

    def get_run() -> object:
        if not runs:
            raise RuntimeError("No active Run. Call swanlab.init() first.")
        return runs[-1]

    fake = types.ModuleType("swanlab")
    fake.__spec__ = importlib.machinery.ModuleSpec("swanlab", None)
    fake.config = {}
    fake.get_run, fake.has_run = get_run, lambda: bool(runs)
    fake.init = lambda **kwargs: inits.append(kwargs) or runs.append(object())
    monkeypatch.setitem(sys.modules, "swanlab", fake)
    monkeypatch.delenv("SWANLAB_PROJECT", raising=False)  # swanlab 0.10 would misread it
    cfg = load_given(
        str(make_config(tmp_path, tmp_path / "m", PAIRS, "preference", rl="dpo", **SWANLAB))
    ).config
    args = build_training_args(cfg, resolve(cfg, env={}), False, steps_per_epoch=3)
    assert args.report_to == []  # one SwanLab callback, newtune's
    (callback,) = [c for c in build_callbacks(cfg) if "SwanLab" in type(c).__name__]
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=1)
    )  # fmt: skip
    state = types.SimpleNamespace(is_world_process_zero=True, trial_name=None)
    callback.setup(args, state, model)
    callback.setup(args, state, model)  # a second setup finds the run: no second init
    assert inits == [{"project": "p"}]  # from swanlab_project, not the environment
    assert "SWANLAB_PROJECT" not in tracker_env(cfg)
