"""Preference and reward data: prepared ids equal TRL 1.16's own tokenization, Axolotl's exact
strings per type, length handling counted in stats.json, and user errors through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

from newtune.config.schema import DatasetEntry, NewtuneConfig
from newtune.config.schema.preference import DPO_LOSS_TYPES, training_method
from newtune.data.prepare import prepare
from newtune.data.strategies import get_strategy
from newtune.data.strategies.base import Preference, Unpaired

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAIRS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Brintmoor."},
    {"prompt": "Name a color.", "chosen": " Blue", "rejected": " red, green.</s>"},
    # tokens merge across the boundary: "Par" + "is." -> the prompt's "r" moves into rejected
    {"prompt": "The capital of France is Par", "chosen": "is.", "rejected": " Brintmoor."},
    {"prompt": "What is the answer?", "chosen": " 0123456789<|im_end|>", "rejected": " I am fine."},
]
IMPLICIT = [
    {"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in PAIRS
]
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
CONVERSATIONS = [
    {
        "prompt": [SYSTEM, {"role": "user", "content": "Name a color."}],
        "chosen": [{"role": "assistant", "content": "Blue"}],
        "rejected": [{"role": "assistant", "content": "red, green."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Hello there!"},
            {"role": "assistant", "content": "How are you?"},
            {"role": "user", "content": "What is the answer?"},
        ],
        "chosen": [{"role": "assistant", "content": "0123456789"}],
        "rejected": [{"role": "assistant", "content": "I am fine, thank you."}],
    },
]
CONV_IMPLICIT = [
    {"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]}
    for c in CONVERSATIONS
]
UNPAIRED = [
    {"prompt": "The capital of France is", "completion": " Paris.", "label": True},
    {"prompt": "Name a color.", "completion": " the quick brown fox", "label": False},
    {"prompt": "Hello there!", "completion": " How are you?</s>", "label": True},
]
CONV_UNPAIRED = [
    {"prompt": c["prompt"], "completion": c["chosen"], "label": i == 0}
    for i, c in enumerate(CONVERSATIONS)
]


def _args(cls, tmp_path, **kw):
    return cls(
        output_dir=str(tmp_path),
        report_to=[],
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        max_length=None,
        **kw,
    )


def _model(model_dir, reward: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    kw = {"num_labels": 1} if reward else {}
    return cls.from_pretrained(model_dir, dtype=torch.float32, **kw)


def trl_rows(kind: str, rows: list[dict], tokenizer, model_dir, tmp_path) -> list[dict]:
    """The train dataset of TRL's DPOTrainer / KTOTrainer / RewardTrainer built on `rows`."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = datasets.Dataset.from_list(rows)
        if kind == "dpo":
            args = _args(DPOConfig, tmp_path)
            trainer = DPOTrainer(
                model=_model(model_dir),
                ref_model=_model(model_dir),
                args=args,
                train_dataset=data,
                processing_class=tokenizer,
            )
        elif kind == "kto":
            args = _args(KTOConfig, tmp_path, per_device_train_batch_size=2)
            trainer = KTOTrainer(
                model=_model(model_dir),
                ref_model=_model(model_dir),
                args=args,
                train_dataset=data,
                processing_class=tokenizer,
            )
        else:
            trainer = RewardTrainer(
                model=_model(model_dir, reward=True),
                args=_args(RewardConfig, tmp_path),
                train_dataset=data,
                processing_class=tokenizer,
            )
    return trainer.train_dataset.to_list()


def ours(tmp_path, tokenizer, rows, fmt="preference", **extra) -> list[dict]:
    data = write_jsonl(tmp_path / "pref.jsonl", rows)
    cfg = NewtuneConfig(
        base_model="unused",
        datasets=[{"path": str(data), "type": fmt}],
        dataset_prepared_path=str(tmp_path / "prepared"),
        **extra,
    )
    prepared = prepare(cfg, tokenizer, tokenizer.chat_template, force=True)
    return prepared.data["train"].to_list()


COLUMNS = {
    "dpo": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "kto": ("prompt_ids", "completion_ids", "label"),
    "reward": ("chosen_ids", "rejected_ids"),
}


def _project(rows: list[dict], method: str) -> list[dict]:
    return [{k: r[k] for k in COLUMNS[method]} for r in rows]


# ---------------------------------------------------------------- parity with TRL 1.16


@pytest.mark.parametrize(
    ("rows", "chat"),
    [(PAIRS, False), (IMPLICIT, False), (PAIRS, True), (IMPLICIT, True),
     (CONVERSATIONS, True), (CONV_IMPLICIT, True)],
    ids=["text-llama", "text-implicit-llama", "text-chatml", "text-implicit-chatml",
         "conversation", "conversation-implicit"],
)  # fmt: skip
@pytest.mark.parametrize("rl", ["dpo", "orpo"])
def test_dpo_and_orpo_ids_equal_trls_dpo_trainer(
    rl, rows, chat, tmp_path, tokenizer, chat_tokenizer, model_dir
):
    tok = chat_tokenizer if chat else tokenizer
    mine = ours(tmp_path, tok, rows, rl=rl)
    assert list(mine[0]) == ["prompt_ids", "chosen_ids", "rejected_ids"]  # nothing else saved
    assert mine == _project(trl_rows("dpo", rows, tok, model_dir, tmp_path), "dpo")


def test_known_layouts(tmp_path, tokenizer, chat_tokenizer):
    """Golden ids (trl_layouts.md): EOS appended as text, boundary merges, template newline."""
    text = ours(tmp_path, tokenizer, PAIRS[1:3], rl="dpo")
    assert text[0] == {
        "prompt_ids": [1, 337, 367, 261, 316, 295, 86, 18],
        "chosen_ids": [307, 363, 73, 2],
        "rejected_ids": [285, 72, 16, 407, 354, 18, 2],  # ends with </s>: nothing appended
    }
    assert tokenizer.decode(text[1]["chosen_ids"]) == "ris.</s>"
    assert tokenizer.decode(text[1]["rejected_ids"]) == "r Brintmoor.</s>"
    conv = ours(tmp_path, chat_tokenizer, CONVERSATIONS[:1], rl="dpo")
    assert conv[0]["chosen_ids"] == [38, 363, 73, 4, 203]  # "Blue<|im_end|>\n"
    assert chat_tokenizer.decode(conv[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("rows", "chat", "fmt"),
    [(UNPAIRED, False, "unpaired_preference"), (CONV_UNPAIRED, True, "unpaired_preference"),
     (PAIRS, True, "preference"), (CONVERSATIONS, True, "preference")],
    ids=["text", "conversation", "paired-text", "paired-conversation"],
)  # fmt: skip
def test_kto_ids_equal_trls_kto_trainer(
    rows, chat, fmt, tmp_path, tokenizer, chat_tokenizer, model_dir
):
    tok = chat_tokenizer if chat else tokenizer
    mine = ours(tmp_path, tok, rows, fmt, rl="kto")
    assert list(mine[0]) == ["prompt_ids", "completion_ids", "label"]
    theirs = _project(trl_rows("kto", rows, tok, model_dir, tmp_path), "kto")
    if fmt == "preference":
        # TRL unpairs a batch as [all chosen..., all rejected...]; newtune keeps each pair's
        # chosen and rejected rows together (same rows, another order)
        assert [r["label"] for r in mine] == [True, False] * len(rows)
        mine = mine[0::2] + mine[1::2]
    assert mine == theirs


@pytest.mark.parametrize(
    ("rows", "chat"),
    [([{**p, "margin": m} for p, m in zip(PAIRS, (0.5, 0.0, 1.0, -0.25), strict=True)], False),
     (IMPLICIT, False), (CONVERSATIONS, True), (CONV_IMPLICIT, True)],
    ids=["text-margin", "text-implicit", "conversation", "conversation-implicit"],
)  # fmt: skip
def test_reward_ids_equal_trls_reward_trainer(
    rows, chat, tmp_path, tokenizer, chat_tokenizer, model_dir
):
    tok = chat_tokenizer if chat else tokenizer
    mine = ours(tmp_path, tok, rows, reward_model=True)
    theirs = trl_rows("reward", rows, tok, model_dir, tmp_path)
    assert _project(mine, "reward") == _project(theirs, "reward")
    if "margin" in rows[0]:
        assert [r["margin"] for r in mine] == [0.5, 0.0, 1.0, -0.25]
    else:
        assert "margin" not in mine[0]


# ---------------------------------------------------------------- Axolotl's strings


def _sample(kind, method: str, row: dict, **entry) -> Preference | Unpaired:
    e = DatasetEntry(path="unused", type=kind, **entry)
    return get_strategy(e, 0, False, method=method).sample(row)


CHATML_USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
LLAMA3_USER = (
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_axolotl_chatml_and_llama3_dpo_strings():
    row = {"system": "Be brief.", "question": "Q?", "chosen": "A.", "rejected": "B."}
    assert _sample("chatml.intel", "dpo", row) == Preference(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
        "<|im_start|>assistant\n",
        "A.<|im_end|>",
        "B.<|im_end|>",
    )
    ultra = {
        "system": "",
        "prompt": "Hi {x}",
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No"}],
    }
    assert _sample("llama3.ultra", "dpo", ultra) == Preference(
        LLAMA3_USER.format("Hi {x}"), "Yo<|eot_id|>", "No<|eot_id|>"
    )
    argilla = {k: ultra[k] for k in ("chosen", "rejected")}
    assert _sample("chatml.argilla_chat", "dpo", argilla) == Preference(
        CHATML_USER.format("Hi"), "Yo<|im_end|>", "No<|im_end|>"
    )
    # `chatml` alone is chatml.default: prompt/input/question/instruction, *_response fallbacks
    default = {"instruction": "Do it.", "chosen_response": "ok", "rejected_response": "no"}
    assert _sample("chatml", "dpo", default) == Preference(
        CHATML_USER.format("Do it."), "ok<|im_end|>", "no<|im_end|>"
    )
    icr = {"input": "In", "chosen": "c", "rejected": "r"}
    assert _sample("llama3.icr", "dpo", icr).prompt == LLAMA3_USER.format("In")


def test_axolotl_nectar_user_defined_and_kto_strings():
    nectar = {
        "prompt": "P",
        "answers": [
            {"answer": "best", "rank": 1},
            {"answer": "worst", "rank": 3},
            {"answer": "middle", "rank": 2},
        ],
    }
    # Axolotl takes the highest rank number as chosen (answers[-1] after an ascending sort)
    assert _sample("zephyr.nectar", "dpo", nectar) == Preference(
        "<|system|>\n</s>\n<|user|>\n" + "P</s>\n<|assistant|>\n", "worst", "middle"
    )
    spec = {
        "field_prompt": "q",
        "field_chosen": "good",
        "prompt_format": "[{system}] {prompt}:",
        "chosen_format": "<{chosen}>",
    }
    row = {"q": "Why", "good": "yes", "rejected": "no"}
    assert _sample(spec, "dpo", row) == Preference("[] Why:", "<yes>", "no")
    kto_row = {"instruction": "I", "completion": "C", "label": False, "system": "S"}
    assert _sample("chatml.argilla", "kto", kto_row) == Unpaired(
        "<|im_start|>system\nS<|im_end|>\n" + CHATML_USER.format("I"), "C<|im_end|>", False
    )
    kto_chat = {
        "completion": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}],
        "label": True,
    }
    assert _sample("llama3.argilla_chat", "kto", kto_chat) == Unpaired(
        LLAMA3_USER.format("U"), "A<|eot_id|>", True
    )
    kto_spec = {"field_completion": "out", "completion_format": "{completion}!"}
    assert _sample(kto_spec, "kto", {"prompt": "p", "out": "o", "label": 1}) == Unpaired(
        "p", "o!", True
    )


def test_axolotl_chat_template_types_render_as_axolotl(tmp_path, chat_tokenizer, model_dir):
    """DPO chat_template.default, ORPO chat_template.argilla and bradley_terry.chat_template:
    the texts Axolotl hands TRL, written out, give the same ids as TRL's text path."""
    user = {"role": "user", "content": "Name a color."}
    dpo_rows = [
        {"messages": [user], "chosen": "Blue", "rejected": {"role": "assistant", "content": "red"}}
    ]
    mine = ours(tmp_path, chat_tokenizer, dpo_rows, "chat_template.default", rl="dpo")
    # Axolotl: prompt rendered with the generation prompt; a completion is the render of
    # [dummy user, answer] from the answer on, right-stripped (so no template newline)
    axolotl_text = [
        {"prompt": CHATML_USER.format("Name a color."), "chosen": "Blue<|im_end|>",
         "rejected": "red<|im_end|>"}
    ]  # fmt: skip
    assert mine == _project(
        trl_rows("dpo", axolotl_text, chat_tokenizer, model_dir, tmp_path), "dpo"
    )

    orpo_rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "Blue"}],
            "rejected": [user, {"role": "assistant", "content": "red"}],
        }
    ]
    mine = ours(tmp_path, chat_tokenizer, orpo_rows, "chat_template.argilla", rl="orpo")
    # ORPO: the full render after the prompt's characters (the template newline stays)
    orpo_text = [
        {"prompt": CHATML_USER.format("Name a color."), "chosen": "Blue<|im_end|>\n",
         "rejected": "red<|im_end|>\n"}
    ]  # fmt: skip
    assert mine == _project(trl_rows("dpo", orpo_text, chat_tokenizer, model_dir, tmp_path), "dpo")

    bt_rows = [{"system": "S", "input": "Name a color.", "chosen": "Blue", "rejected": "red"}]
    mine = ours(tmp_path, chat_tokenizer, bt_rows, "bradley_terry.chat_template", reward_model=True)
    conv = [
        {
            "prompt": [{"role": "system", "content": "S"}, user],
            "chosen": [{"role": "assistant", "content": "Blue"}],
            "rejected": [{"role": "assistant", "content": "red"}],
        }
    ]
    assert mine == _project(trl_rows("reward", conv, chat_tokenizer, model_dir, tmp_path), "reward")
    assert chat_tokenizer.decode(mine[0]["chosen_ids"]) == (
        "<|im_start|>system\nS<|im_end|>\n" + CHATML_USER.format("Name a color.")
        + "Blue<|im_end|>\n"
    )  # fmt: skip


def test_one_name_two_methods():
    """`chatml.intel` is DPO's with rl: dpo and KTO's with rl: kto (Axolotl's namespaces)."""
    row = {"question": "Q", "chosen": "a", "rejected": "b", "completion": "c", "label": True}
    assert isinstance(_sample("chatml.intel", "dpo", row), Preference)
    assert _sample("chatml.intel", "kto", row) == Unpaired(
        CHATML_USER.format("Q"), "c<|im_end|>", True
    )


# ---------------------------------------------------------------- lengths and stats


def test_truncation_and_drops_are_counted(tmp_path, tokenizer):
    rows = [
        {"prompt": "Name a color.", "chosen": " Blue", "rejected": " red"},  # 8 + 4
        {"prompt": "Name a color.", "chosen": " the quick brown fox jumps", "rejected": " red"},
        {
            "prompt": "The capital of France is Paris. Hello there!",
            "chosen": " a",
            "rejected": " b",
        },
    ]
    plens = [len(tokenizer(r["prompt"])["input_ids"]) for r in rows]
    assert plens[0] == 8 and plens[2] > 10
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    dropped = ours(tmp_path / "a", tokenizer, rows, rl="dpo", sequence_len=12)
    stats = json.loads(next((tmp_path / "a/prepared").glob("*/stats.json")).read_text())
    assert len(dropped) == stats["rows"]["train"] == 1
    assert stats["dropped_too_long"] == 2 and stats["truncated"] == 0
    assert stats["training_method"] == "dpo"

    cut = ours(
        tmp_path / "b", tokenizer, rows, rl="dpo", sequence_len=12, max_prompt_len=10,
        excess_length_strategy="truncate",
    )  # fmt: skip
    stats = json.loads(next((tmp_path / "b/prepared").glob("*/stats.json")).read_text())
    assert stats["prompt_truncated"] == 1 and stats["truncated"] == 2
    assert [len(r["prompt_ids"]) for r in cut] == [8, 8, 10]
    assert all(len(r["prompt_ids"]) + len(r["chosen_ids"]) <= 12 for r in cut)
    full = tokenizer(rows[2]["prompt"])["input_ids"]
    assert cut[2]["prompt_ids"] == full[-10:]  # a long prompt keeps its end
    assert (
        cut[1]["chosen_ids"]
        == tokenizer(rows[1]["prompt"] + rows[1]["chosen"] + "</s>")["input_ids"][8:12]
    )  # the completion keeps its start


# ---------------------------------------------------------------- keys and methods


def test_training_method_and_loss_types_match_the_train_side():
    from newtune.train.methods.preference import DPO_LOSS_TYPES as TRAIN_TYPES

    assert TRAIN_TYPES is DPO_LOSS_TYPES  # one list: the train side imports the schema's
    base = {"base_model": "x", "datasets": [{"path": "d", "type": "preference"}]}
    methods = {
        None: "sft", "dpo": "dpo", "ipo": "dpo", "simpo": "dpo", "orpo": "orpo", "kto": "kto"
    }  # fmt: skip
    for rl, method in methods.items():
        assert training_method(NewtuneConfig(**base, rl=rl)) == method
    assert training_method(NewtuneConfig(**base, reward_model=True)) == "reward"


# ---------------------------------------------------------------- user errors through the CLI


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", *args],
        capture_output=True, text=True, env=env, timeout=300, cwd=cwd,
    )  # fmt: skip


def _config(tmp_path: Path, model_dir, rows, kind, **extra) -> Path:
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": kind}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        **extra,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _refused(proc: subprocess.CompletedProcess, *parts: str) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "Traceback" not in text, text
    for part in parts:
        assert part in text, text


@pytest.mark.parametrize(
    ("kind", "extra", "parts"),
    [
        ("alpaca", {"rl": "dpo"}, ["`datasets[0].type: alpaca` is an SFT format",
                                   "not a format of `rl: dpo`", "chatml.intel"]),
        ("chatml.intel", {}, ["`datasets[0].type: chatml.intel` is a preference format",
                              "set `rl:`"]),
        ("unpaired_preference", {"rl": "dpo"}, ["is read with `rl: kto`"]),
        ("preference", {"rl": "kto_pair"}, ["`rl: kto_pair` is refused", "`rl: kto`"]),
        ("preference", {"rl": "grpo"}, ["`rl: grpo` rewards completions with `trl.reward_funcs`",
                                        "`datasets[0].type: preference`: online RL"]),
        ("preference", {"rl": "dpo", "reward_model": True}, ["are both set"]),
        ("preference", {"rl": "dpo", "dpo_loss_type": ["sigmoid", "ipo"],
                        "dpo_loss_weights": [1.0]}, ["has 1 weight(s) for 2 loss type(s)"]),
        ("preference", {"rl": "dpo", "simpo_gamma": 0.5}, ["`simpo_gamma: 0.5` is read only "
                                                           "with `rl: simpo`"]),
        ("preference", {"rl": "dpo", "kto_desirable_weight": 2.0}, ["read only with `rl: kto`"]),
        ("preference", {"rl": "ipo", "dpo_loss_type": ["hinge"]}, ["`rl: ipo` is DPO with"]),
        ("alpaca", {"num_labels": 1}, ["`num_labels: 1` is read only with `reward_model: true` "
                                       "or `process_reward_model: true`, and this config trains "
                                       "with SFT"]),
        ({"field_chosen": "c", "field_completion": "x"}, {"rl": "dpo"},
         ["unknown key(s) `field_completion`"]),
        ("preference", {"rl": "dpo", "dpo_use_liger_kernel": True},
         ["`dpo_use_liger_kernel: True`", "plain torch", "remove it or set it to null"]),
    ],
    ids=["sft-type-with-rl", "preference-type-without-rl", "unpaired-with-dpo", "kto_pair",
         "grpo", "rl-and-reward", "weights-length", "simpo-gamma", "kto-weight",
         "ipo-loss", "num-labels", "user-defined-key", "liger-dpo"],
)  # fmt: skip
def test_validate_refuses(tmp_path, model_dir, kind, extra, parts):
    cfg = _config(tmp_path, model_dir, PAIRS, kind, **extra)
    _refused(cli("validate", str(cfg), cwd=tmp_path), *parts)


def test_validate_accepts_preference_configs(tmp_path, model_dir):
    cfg = _config(
        tmp_path, model_dir, PAIRS, "preference", rl="ipo", rl_beta=0.2,
        dpo_loss_weights=[1.0], remove_unused_columns=False, max_prompt_len=32,
    )  # fmt: skip
    proc = cli("validate", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rl: ipo" in proc.stdout


def test_preprocess_names_the_row_missing_its_rejected_side(tmp_path, model_dir):
    rows = [PAIRS[0], {"prompt": "Name a color.", "chosen": " Blue", "rejected": None}]
    cfg = _config(tmp_path, model_dir, rows, "preference", rl="dpo")
    _refused(
        cli("preprocess", str(cfg), cwd=tmp_path),
        "datasets[0]", "row 1", "`rejected` is empty (null)",
    )  # fmt: skip
    assert not list((tmp_path / "prepared").glob("*/stats.json"))  # nothing half written


def test_preprocess_names_a_missing_rejected_column(tmp_path, model_dir):
    rows = [{"question": "Q", "chosen": "a"}]
    cfg = _config(tmp_path, model_dir, rows, "chatml.intel", rl="dpo")
    _refused(
        cli("preprocess", str(cfg), cwd=tmp_path),
        "needs column(s) rejected (the rejected side of each pair)", "question, chosen",
    )  # fmt: skip


def test_preprocess_writes_trl_columns(tmp_path, model_dir):
    cfg = _config(tmp_path, model_dir, UNPAIRED, "unpaired_preference", rl="kto")
    proc = cli("preprocess", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (folder,) = (tmp_path / "prepared").glob("*/stats.json")
    data = datasets.load_from_disk(str(folder.parent))
    assert data["train"].column_names == ["prompt_ids", "completion_ids", "label"]
    assert data["train"]["label"] == [True, False, True]
    inputs = json.loads((folder.parent / "fingerprint.json").read_text())
    assert inputs["training_method"] == "kto"
