"""The Python API: load_config/preprocess/train on any config form, and the StepTrainer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl

import newtune
from newtune.config.load import LoadedConfig
from newtune.errors import ConfigError

TEXT = "The capital of France is Paris."
TEXTS = [
    TEXT,
    "Hello there! How are you?",
    "the quick brown fox jumps over the lazy dog.",
    "Blue, red, green.",
]


def base(tmp_path: Path, model_dir: Path, **extra) -> dict:
    """A StepTrainer config: full fine-tune of the tiny Llama, no data is read."""
    return {
        "base_model": str(model_dir),
        "datasets": [{"path": str(tmp_path / "unused.jsonl"), "type": "completion"}],
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 32,
        "micro_batch_size": 2,
        "learning_rate": 0.01,
        "lr_scheduler": "constant",
        **extra,
    }


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# -- load_config / preprocess / train ------------------------------------------------------


def test_import_and_load_config_do_not_import_torch(tmp_path):
    code = (
        "import sys, newtune\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "cfg = newtune.load_config({'base_model': './m', 'datasets': [{'path': 'd.jsonl', "
        "'type': 'alpaca'}]}, micro_batch_size=3)\n"
        "heavy += [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print(cfg.config.micro_batch_size, heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3 []"


def test_dict_typo_gives_the_yaml_error(tmp_path):
    data = {
        "base_model": "./m",
        "datasets": [{"path": "d.jsonl", "type": "alpaca", "feild": "x"}],
        "learning_rat": 0.1,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as from_yaml:
        newtune.load_config(path)
    with pytest.raises(ConfigError) as from_dict:
        newtune.load_config(data)
    assert f"({path}, line 5)" in str(from_yaml.value)  # a dict has no lines to name
    yaml_text = re.sub(rf"{re.escape(str(path))}(, line \d+)?", "config dict", str(from_yaml.value))
    assert str(from_dict.value) == yaml_text
    assert str(from_dict.value) == (
        "config dict has 2 unknown key(s): unknown key `learning_rat` (config dict) (did you "
        "mean `learning_rate`?); unknown key `datasets[0].feild` (config dict) (did you mean "
        "`field`?). Fix or remove these keys (docs/config.md lists every key newtune knows)."
    )


def test_dict_values_are_validated_like_yaml(tmp_path):
    data = {"base_model": "./m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
    with pytest.raises(ConfigError, match=r"`micro_batch_size` \(config dict\): .*got 'x'"):
        newtune.load_config({**data, "micro_batch_size": "x"})
    with pytest.raises(ConfigError, match="`warmup_steps` and `warmup_ratio` are both set"):
        newtune.load_config(data, warmup_steps=3, warmup_ratio=0.1)
    with pytest.raises(ConfigError, match="`datasets` is required but missing"):
        newtune.load_config({"base_model": "./m"})
    with pytest.raises(ConfigError, match=r"`output_dir` has type object"):
        newtune.load_config({**data, "output_dir": object()})
    with pytest.raises(ConfigError, match="got int"):
        newtune.load_config(3)


def test_every_config_form_gives_the_same_config(tmp_path):
    data = {
        "base_model": "./m",
        "datasets": [{"path": Path("d.jsonl"), "type": "alpaca"}],  # a Path becomes text
        "sdp_attention": True,  # legacy spelling, mapped as in YAML
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({**data, "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}))
    forms = [str(path), path, data]
    loaded = [
        newtune.load_config(f, learning_rate=0.5, **{"datasets.0.type": "completion"})
        for f in forms
    ]
    loaded.append(newtune.load_config(loaded[0]))  # a LoadedConfig is returned as it is
    loaded.append(newtune.load_config(loaded[0].config))  # a NewtuneConfig is re-checked
    dumps = {json.dumps(item.config.model_dump(mode="json"), sort_keys=True) for item in loaded}
    assert len(dumps) == 1
    config = loaded[2].config
    assert isinstance(loaded[2], LoadedConfig) and loaded[2].source == "config dict"
    assert (config.learning_rate, config.datasets[0].type) == (0.5, "completion")
    assert config.attn_implementation == "sdpa"
    assert loaded[3] is loaded[0]
    again = newtune.load_config(loaded[0], micro_batch_size=5)  # overrides re-validate
    assert (again.config.micro_batch_size, again.config.learning_rate) == (5, 0.5)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        newtune.load_config(loaded[0], micro_batch_size=0)


def test_preprocess_and_train_from_a_dict(tmp_path, model_dir, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    cfg = {
        **base(tmp_path, model_dir, max_steps=2),
        "datasets": [{"path": str(data), "type": "completion"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
    }
    prepared = newtune.preprocess(cfg)
    train = prepared.data["train"]
    assert len(train) == len(TEXTS) and prepared.path.parent == tmp_path / "prepared"
    bos, eos = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = sorted(train["input_ids"])
    expected = sorted(
        [bos, *tokenizer(t, add_special_tokens=False)["input_ids"], eos] for t in TEXTS
    )
    assert rows == expected
    out = newtune.train(cfg, output_dir=str(tmp_path / "trained"))
    assert out == tmp_path / "trained"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "train_results.json").read_text())["train_loss"] > 0


# -- StepTrainer ---------------------------------------------------------------------------


@pytest.fixture
def stepper(tmp_path, model_dir):
    return newtune.StepTrainer(base(tmp_path, model_dir))


def test_step_on_texts_lowers_the_loss_and_changes_weights(stepper, chat_tokenizer):
    before = params(stepper.model)
    stats = [stepper.step(texts=[TEXT, TEXT]) for _ in range(6)]
    ids = chat_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert [s["step"] for s in stats] == [1, 2, 3, 4, 5, 6]
    assert {s["trained_tokens"] for s in stats} == {2 * (len(ids) + 1)}  # BOS+ids+EOS, shifted
    assert {s["learning_rate"] for s in stats} == {0.01}
    assert stats[-1]["loss"] < stats[0]["loss"] - 0.5
    assert all(s["grad_norm"] > 0 for s in stats)
    after = params(stepper.model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert stepper.global_step == 6


def test_step_on_tensors_respects_padding_and_trains(stepper, chat_tokenizer):
    pad = chat_tokenizer.pad_token_id
    rows = [chat_tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left padding
    mask = (torch.arange(width)[None, :] >= torch.tensor([[width - len(r)] for r in rows])).long()
    first = stepper.step(input_ids=ids, attention_mask=mask)
    assert first["trained_tokens"] == sum(len(r) - 1 for r in rows)
    ragged = [torch.tensor(r) for r in rows]  # a list of 1-D rows: no padding at all
    losses = [stepper.step(input_ids=ragged)["loss"] for _ in range(4)]
    assert losses[-1] < first["loss"] and stepper.global_step == 5


def test_passed_labels_are_respected(tmp_path, model_dir):
    lr = 0.5
    cfg = base(tmp_path, model_dir, optimizer="sgd", learning_rate=lr, max_grad_norm=0.0)
    stepper = newtune.StepTrainer(cfg)
    assert isinstance(stepper.optimizer.optimizer, torch.optim.SGD)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    labels = torch.full_like(ids, -100)
    labels[0, 4] = 43  # one trained token: predicted from position 3
    before = params(stepper.model)
    stats = stepper.step(input_ids=ids, labels=labels)
    after = params(stepper.model)

    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    logits = reference(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[0, 3:4], ids[0, 4:5])
    loss.backward()
    assert stats["trained_tokens"] == 1 and stats["loss"] == pytest.approx(loss.item(), abs=1e-6)
    for name, p in reference.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close((before[name] - after[name]) / lr, grad, atol=1e-6, rtol=1e-5)


def test_truncation_keeps_exact_ids(tmp_path, model_dir, chat_tokenizer):
    text = " ".join(TEXTS)
    ids = [
        chat_tokenizer.bos_token_id,
        *chat_tokenizer(text, add_special_tokens=False)["input_ids"],
    ]
    ids.append(chat_tokenizer.eos_token_id)
    assert len(ids) > 32
    keep_end = newtune.StepTrainer(base(tmp_path, model_dir))  # the default, as in TRL
    keep_start = newtune.StepTrainer(base(tmp_path, model_dir), truncation_mode="keep_start")
    assert keep_end.tokenize([text])[0]["input_ids"] == ids[-32:]
    assert keep_start.tokenize([text])[0]["input_ids"] == ids[:32]
    assert keep_start.tokenize([text])[0]["labels"] == ids[:32]
    # tensors are truncated the same way, their labels with them
    rows = keep_end._tensor_rows(torch.tensor([ids]), None, torch.tensor([ids[::-1]]))
    assert rows[0]["input_ids"] == ids[-32:] and rows[0]["labels"] == ids[::-1][-32:]
    with pytest.raises(ConfigError, match="truncation_mode `middle` is not one of"):
        newtune.StepTrainer(base(tmp_path, model_dir), truncation_mode="middle")


def test_micro_batches_sum_to_the_same_step(tmp_path, model_dir):
    weights, losses = [], []
    for size in (1, 4):
        stepper = newtune.StepTrainer(
            base(tmp_path, model_dir, optimizer="sgd", learning_rate=0.5, micro_batch_size=size)
        )
        losses.append([stepper.step(texts=TEXTS)["loss"] for _ in range(2)])
        weights.append(params(stepper.model))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], atol=1e-6, rtol=0)


def test_schedule_follows_the_config(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="`lr_scheduler: cosine` needs the number of optimizer"):
        newtune.StepTrainer(base(tmp_path, model_dir, lr_scheduler="cosine"))
    stepper = newtune.StepTrainer(
        base(tmp_path, model_dir, lr_scheduler="linear", warmup_steps=1, max_steps=3)
    )
    assert [stepper.step(texts=[TEXT])["learning_rate"] for _ in range(3)] == pytest.approx(
        [0.0, 0.01, 0.005]
    )
    with pytest.raises(ConfigError, match="`max_steps: 3` steps are done"):
        stepper.step(texts=[TEXT])


BAD_STEPS = {
    "both": ({"texts": [TEXT], "input_ids": [[1, 2]]}, "pass either `texts` or `input_ids`"),
    "none": ({}, r"pass `texts=\[\.\.\.\]` or `input_ids=\.\.\.`"),
    "labels only": ({"labels": [[1, 2]]}, "`labels` alone is not a batch"),
    "empty texts": ({"texts": []}, "the batch is empty"),
    "empty ids": ({"input_ids": torch.zeros(0, 3, dtype=torch.long)}, "the batch is empty"),
    "one string": ({"texts": TEXT}, "`texts` must be a list of strings"),
    "1-d tensor": ({"input_ids": torch.tensor([1, 2, 3])}, "has 1 dimension"),
    "mask shape": (
        {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)},
        r"`attention_mask` must have the shape of `input_ids`: row lengths \[3, 3\] vs \[4, 4\]",
    ),
    "label rows": (
        {"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3], [1, 2, 3]]},
        "`labels` must have the shape of `input_ids`",
    ),
    "holes": (
        {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 0, 1]]},
        "zeros between its ones",
    ),
    "vocab": ({"input_ids": [[1, 99999]]}, "token id 99999, outside"),
    "all masked": (
        {"input_ids": [[1, 2, 3]], "labels": [[1, -100, -100]]},
        "no token of the batch is trained",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_bad_step_input_is_a_config_error(stepper, case):
    kwargs, message = BAD_STEPS[case]
    with pytest.raises(ConfigError, match=message) as info:
        stepper.step(**kwargs)
    assert "\n" not in str(info.value) and str(info.value).startswith("StepTrainer.step: ")
    assert stepper.global_step == 0


def test_save_writes_a_loadable_model(stepper, tmp_path):
    from transformers import AutoModelForCausalLM

    stepper.step(texts=[TEXT])
    out = stepper.save(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, stepper.model.state_dict()[name]), name
    assert yaml.safe_load((out / "newtune_config.yml").read_text())["sequence_len"] == 32
    stepper.step(texts=[TEXT])
    stepper.save(out)  # a previous save is replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not a saved model"):
        stepper.save(other)
    assert (other / "todo.txt").read_text() == "keep me"


def test_lora_step_trains_only_the_adapter_and_saves_it(tmp_path, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    stepper = newtune.StepTrainer(
        base(tmp_path, model_dir, adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True)
    )
    before = params(stepper.model)
    for _ in range(2):
        stepper.step(texts=TEXTS[:2])
    after = params(stepper.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    out = stepper.save(tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    ids = torch.tensor([[1, 40, 41, 42]])
    stepper.model.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, stepper.model(input_ids=ids).logits)
    completions = stepper.generate([TEXT[:10], "Hello"], max_new_tokens=3)
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)
