"""Axolotl keys of issue 16, part 3: reasoning traces, data order, kernels, quantization."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import write_jsonl
from test_trust_config import cli, error_line

from newtune.config.load import load_config
from newtune.config.resolve import resolve
from newtune.config.schema import DatasetEntry
from newtune.data.packing import MultipackBatchSampler, pack_next_fit, packing_plan
from newtune.data.strategies import get_strategy
from newtune.data.tokenize import IGNORE_INDEX, Engine
from newtune.errors import ConfigError, ModelError
from newtune.models.load import ModelOptions, load_model
from newtune.train.args import build_training_args
from newtune.train.kernels import apply_liger

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}


def write(tmp_path: Path, **keys: Any) -> str:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({**BASE, **keys}, sort_keys=False))
    return str(path)


def config_of(tmp_path: Path, **keys: Any) -> Any:
    return load_config(write(tmp_path, **keys)).config


def error_of(tmp_path: Path, **keys: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, **keys))
    return str(info.value)


THINK = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get(KEY) %}<think>{{ m[KEY] }}</think>{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def _engine(tok: Any, template: str) -> Engine:
    return Engine(tok, chat_template=template, roles_to_train=("assistant",))


def _trained(ids: list[int], labels: list[int], tok: Any) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


ROW = {
    "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "thinking": "greet back"},
    ]
}


def test_field_thinking_reaches_the_template_under_template_thinking_key(chat_tokenizer) -> None:
    """gpt-oss's layout: the row's `thinking` is rendered by a template reading `thinking`;
    the trace's tokens are in input_ids and trained with the assistant's content."""
    tok = chat_tokenizer
    entry = DatasetEntry(
        path="x", type="chat_template", field_thinking="thinking", template_thinking_key="thinking"
    )
    conv = get_strategy(entry, 0, False).sample(ROW)
    assert conv.messages[1] == {"role": "assistant", "content": "hello", "thinking": "greet back"}
    assert conv.thinking_key == "thinking"
    template = THINK.replace("KEY", "'thinking'")
    row = _engine(tok, template).tokenize(conv)[0]
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>greet back</think>hello<|im_end|>\n"
    assert row.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert _trained(row.input_ids, row.labels, tok) == "greet back</think>hello<|im_end|>"


def test_thinking_defaults_to_reasoning_content(chat_tokenizer) -> None:
    """Axolotl's defaults: reasoning_content in the data, reasoning_content in the template."""
    tok = chat_tokenizer
    row = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "reasoning_content": "why"},
        ]
    }
    conv = get_strategy(DatasetEntry(path="x", type="chat_template"), 0, False).sample(row)
    assert conv.messages[1]["reasoning_content"] == "why"
    out = _engine(tok, THINK.replace("KEY", "'reasoning_content'")).tokenize(conv)[0]
    assert "<think>why</think>hello" in tok.decode(out.input_ids)
    # a data key under another name, with the template's key named: mapped across
    entry = DatasetEntry(path="x", type="chat_template", field_thinking="thinking")
    conv = get_strategy(entry, 0, False).sample(ROW)
    assert conv.messages[1]["reasoning_content"] == "greet back"
    assert "thinking" not in conv.messages[1]


def test_without_thinking_keys_a_mapped_dataset_keeps_role_and_content_only() -> None:
    """Axolotl adds the thinking mapping only when message_property_mappings is not given."""
    entry = DatasetEntry(
        path="x",
        type="chat_template",
        message_property_mappings={"role": "role", "content": "content"},
    )
    row = {"messages": [{"role": "user", "content": "a", "reasoning_content": "r"}]}
    conv = get_strategy(entry, 0, False).sample(row)
    assert conv.messages == ({"role": "user", "content": "a"},)
    assert conv.thinking_key is None


# -- 2. data order, deduplication, re-initialised weights ------------------------------------


def test_dataset_exact_deduplication_drops_repeated_rows_and_counts_them(tmp_path, model_dir):
    rows = [{"instruction": "Name a color.", "input": "", "output": c} for c in "ABC"] * 4
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = write(
        tmp_path,
        base_model=str(model_dir),
        datasets=[{"path": str(data), "type": "alpaca"}],
        dataset_prepared_path=str(tmp_path / "prepared"),
        sequence_len=64,
        dataset_exact_deduplication=True,
    )
    proc = cli("preprocess", cfg)
    assert proc.returncode == 0, proc.stderr
    folder = next(p for p in (tmp_path / "prepared").iterdir() if not p.name.startswith("."))
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["dropped_duplicates"] == 9 and stats["rows"] == {"train": 3}
    import datasets

    train = datasets.load_from_disk(str(folder))["train"]
    assert len({tuple(ids) for ids in train["input_ids"]}) == 3
    # streamed data is never held whole: refused as Axolotl does
    assert "streamed data" in error_of(
        tmp_path, dataset_exact_deduplication=True, streaming=True, max_steps=2
    )


def test_reinit_weights_builds_the_model_with_fresh_weights(tmp_path, model_dir):
    cfg = config_of(tmp_path, base_model=str(model_dir), reinit_weights=True)
    options = ModelOptions.from_config(cfg)
    assert options.reinit is True
    pretrained = load_model(str(model_dir))
    torch.manual_seed(1)
    fresh = load_model(str(model_dir), options=options)
    assert type(fresh) is type(pretrained)
    for (name, a), b in zip(
        fresh.state_dict().items(), pretrained.state_dict().values(), strict=True
    ):
        if "norm" not in name:  # norms initialise to ones either way
            assert not torch.equal(a, b), name
    torch.manual_seed(1)
    again = load_model(str(model_dir), options=options)
    assert torch.equal(again.lm_head.weight, fresh.lm_head.weight)  # the model's _init_weights
    assert "could never be loaded onto its base again" in error_of(
        tmp_path, reinit_weights=True, adapter="lora"
    )


def test_curriculum_sampling_trains_in_dataset_order(tmp_path):
    cfg = config_of(tmp_path, curriculum_sampling=True, output_dir="out")
    args = build_training_args(cfg, resolve(cfg, env={}), False, steps_per_epoch=10)
    assert args.train_sampling_strategy == "sequential"
    assert "keep one" in error_of(tmp_path, curriculum_sampling=True, group_by_length=True)
    packed = config_of(tmp_path, curriculum_sampling=True, sample_packing=True, sequence_len=8)
    train, _ = packing_plan(packed)
    assert train is not None and train.in_order and not train.next_fit
    lengths = np.array([3, 6, 2, 5, 1, 4, 2, 7])
    sampler = MultipackBatchSampler(lengths, 8, 1, in_order=True)
    bins = [b[0] for b in sampler]
    # best-fit bins, in the order they were opened, over the rows in dataset order
    assert sorted(i for b in bins for i in b) == list(range(8))
    shuffled = MultipackBatchSampler(lengths, 8, 1, seed=3)
    assert [b[0] for b in shuffled] != bins


def test_sample_packing_sequentially_packs_next_fit_in_order(tmp_path):
    lengths = np.array([3, 6, 2, 5, 1, 4, 2, 7])
    assert pack_next_fit(lengths, 8).as_lists() == [[0], [1, 2], [3, 4], [5, 6], [7]]
    cfg = config_of(
        tmp_path,
        sample_packing=True,
        sample_packing_sequentially=True,
        curriculum_sampling=True,
        sequence_len=8,
    )
    train, _ = packing_plan(cfg)
    assert train is not None and train.next_fit and train.in_order
    sampler = MultipackBatchSampler(lengths, 8, 1, in_order=True, next_fit=True)
    assert [b[0] for b in sampler] == [[0], [1, 2], [3, 4], [5, 6], [7]]
    assert "`sample_packing` is off" in error_of(tmp_path, sample_packing_sequentially=True)


def test_pretrain_multipack_attn_true_is_accepted_false_is_refused(tmp_path):
    assert config_of(tmp_path, pretrain_multipack_attn=True).pretrain_multipack_attn is True
    assert "newtune always isolates packed samples" in error_of(
        tmp_path, pretrain_multipack_attn=False
    )


# -- 3. kernels, attention patches, quantization configs -------------------------------------


def _fake_liger(monkeypatch: pytest.MonkeyPatch, seen: dict) -> None:
    def apply_qwen3_next(rms_norm: bool = False, rms_norm_gated: bool = False) -> None:
        """A liger function with the gated switch."""

    def apply_llama(rms_norm: bool = False) -> None:
        """A liger function without it."""

    module = types.ModuleType("liger_kernel.transformers")
    module.MODEL_TYPE_TO_APPLY_LIGER_FN = {"qwen3_next": apply_qwen3_next, "llama": apply_llama}
    module._apply_liger_kernel_to_instance = lambda model, **kw: seen.update(kw)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)


def test_liger_rms_norm_gated_reaches_liger(tmp_path, monkeypatch):
    cfg = config_of(tmp_path, liger_rms_norm_gated=True, output_dir="out")
    seen: dict = {}
    _fake_liger(monkeypatch, seen)
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="qwen3_next"))
    apply_liger(model, cfg)
    assert seen["rms_norm_gated"] is True and seen["rms_norm"] is False
    model.config.model_type = "llama"
    with pytest.raises(ModelError, match="has no gated RMSNorm"):
        apply_liger(model, cfg)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("liger_kernel") is not None,
    reason="liger-kernel installed here",
)
def test_liger_rms_norm_gated_validates_with_a_warning_without_liger(tmp_path):
    proc = cli("validate", write(tmp_path, liger_rms_norm_gated=True, output_dir="out"))
    assert proc.returncode == 0, proc.stderr
    assert "`liger_rms_norm_gated`" in proc.stdout + proc.stderr
    assert "liger-kernel" in proc.stdout + proc.stderr


def test_model_quantization_config_reaches_from_pretrained(tmp_path, model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    cfg = config_of(
        tmp_path,
        base_model=str(model_dir),
        model_quantization_config="Mxfp4Config",
        model_quantization_config_kwargs={"dequantize": True},
    )
    seen: dict = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        kwargs.pop("quantization_config")  # the tiny Llama has no MXFP4 weights to read
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(model_dir), options=ModelOptions.from_config(cfg))
    quant = seen["quantization_config"]
    assert isinstance(quant, Mxfp4Config) and quant.dequantize is True
    assert "keep one" in error_of(
        tmp_path, model_quantization_config="FineGrainedFP8Config", load_in_4bit=True
    )
    assert "name the class" in error_of(tmp_path, model_quantization_config_kwargs={"a": 1})
    err = error_of(
        tmp_path,
        model_quantization_config="Mxfp4Config",
        model_quantization_config_kwargs={"no_such": 1},
    )
    assert "`no_such` is not a setting of transformers' Mxfp4Config (it takes " in err
    assert "dequantize" in err
    fp8 = config_of(
        tmp_path,
        model_quantization_config="FineGrainedFP8Config",
        model_quantization_config_kwargs={"weight_block_size": [64, 64]},
    )
    built = ModelOptions.from_config(fp8).quantization
    assert type(built).__name__ == "FineGrainedFP8Config"
    assert tuple(built.weight_block_size) == (64, 64)


# -- 4. the remaining Axolotl keys: cls_model_config, and refusals by name ---------------------


def test_cls_model_config_reads_the_config_with_that_class(tmp_path, model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = config_of(tmp_path, base_model=str(model_dir), cls_model_config="LlamaConfig")
    seen: dict = {}
    real = LlamaConfig.from_pretrained.__func__

    def spy(cls: type, *args: Any, **kwargs: Any) -> Any:
        seen["class"] = cls
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(LlamaConfig, "from_pretrained", classmethod(spy))
    loaded_kwargs: dict = {}
    real_model = AutoModelForCausalLM.from_pretrained

    def model_spy(*args: Any, **kwargs: Any) -> Any:
        loaded_kwargs.update(kwargs)
        return real_model(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_spy)
    model = load_model(str(model_dir), options=ModelOptions.from_config(cfg))
    assert seen["class"] is LlamaConfig and type(loaded_kwargs["config"]) is LlamaConfig
    assert type(model).__name__ == "LlamaForCausalLM"
    err = error_of(tmp_path, cls_model_config="NoSuchConfig")
    assert "`cls_model_config: NoSuchConfig` is not a transformers config class" in err


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("llmcompressor", {"recipe": {}}, "Axolotl's LLMCompressorPlugin"),
        ("context_parapllel_size", 2, "`context_parallel_size` if context parallelism"),
    ],
)
def test_remaining_axolotl_keys_are_refused_by_name(tmp_path, key, value, words):
    assert getattr(config_of(tmp_path, **{key: None}), key) is None
    err = error_line(cli("validate", write(tmp_path, **{key: value})))
    assert "asks for what newtune cannot do: `" + key in err and words in err
