"""The model loader, tokenizer options and adapter options reach the objects they configure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file
from test_cli import make_config

from newtune.config.load import load_config
from newtune.config.resolve import resolve
from newtune.errors import ConfigError
from newtune.models.load import ModelOptions, build_model, load_model
from newtune.models.tokenizer import load_tokenizer

CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"Say {w}."},
            {"role": "assistant", "content": f"{w} <|new_a|>"},
        ]
    }
    for w in ("blue", "red", "green", "fox", "dog", "Paris")
]


def from_dict(tmp_path: Path, cfg: dict):
    """The validated config of a mapping, written as YAML."""
    path = tmp_path / "plain.yml"
    cfg = {**cfg, "datasets": cfg["datasets"] or [{"path": "rows.jsonl", "type": "alpaca"}]}
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path).config


def config_of(tmp_path: Path, model_dir: Path, **extra):
    """(path, validated config) of a chat_template run on the tiny model (2 steps)."""
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    path = make_config(tmp_path, model_dir, data, "chat_template", **{"max_steps": 2, **extra})
    return path, load_config(path).config


def built(tmp_path: Path, model_dir: Path, **extra):
    _, config = config_of(tmp_path, model_dir, **extra)
    tok, new_ids = load_tokenizer(config)
    return config, tok, build_model(config, resolve(config), tok, new_ids)


def test_tokenizer_options_reach_the_tokenizer(tmp_path, model_dir, caplog):
    _, config = config_of(
        tmp_path,
        model_dir,
        special_tokens={"pad_token": "<|pad|>", "eos_token": "<|im_end|>"},
        tokens=["<|new_a|>", "<|new_b|>"],
    )
    tok, new_ids = load_tokenizer(config)
    plain = from_dict(tmp_path, {"base_model": str(model_dir), "datasets": []})
    base = len(load_tokenizer(plain).tokenizer)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == base
    assert tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids(["<|new_a|>", "<|new_b|>"]) == [base + 1, base + 2]
    assert new_ids == [base, base + 1, base + 2]
    assert not hasattr(tok, "newtune_new_ids")  # returned, not hidden on the tokenizer
    assert load_tokenizer(plain).new_ids == []
    # an added token is one id, not split into bytes
    assert tok("x <|new_a|>", add_special_tokens=False)["input_ids"][-1] == base + 1


def test_tokenizer_type_picks_the_class(tmp_path, model_dir):
    _, config = config_of(tmp_path, model_dir, tokenizer_type="GPT2Tokenizer")
    assert type(load_tokenizer(config).tokenizer) is transformers.GPT2Tokenizer


def test_unknown_special_token_key_and_tokenizer_class_are_config_errors(tmp_path, model_dir):
    _, config = config_of(tmp_path, model_dir, special_tokens={"padding_token": "<pad>"})
    with pytest.raises(ConfigError, match=r"`special_tokens` has unknown key\(s\) padding_token"):
        load_tokenizer(config)
    _, config = config_of(tmp_path, model_dir, tokenizer_type="NoSuchTokenizer")
    with pytest.raises(
        ConfigError, match="`tokenizer_type: NoSuchTokenizer` is not a transformers"
    ):
        load_tokenizer(config)


def test_missing_pad_token_falls_back_to_eos_with_a_warning(tmp_path, model_dir, caplog):
    folder = tmp_path / "nopad"
    tok, _ = load_tokenizer(from_dict(tmp_path, {"base_model": str(model_dir), "datasets": []}))
    tok.pad_token = None
    tok.save_pretrained(folder)
    (folder / "config.json").write_text((model_dir / "config.json").read_text())
    _, config = config_of(tmp_path, model_dir, tokenizer_config=str(folder))
    with caplog.at_level("WARNING"):
        tok, _ = load_tokenizer(config)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert "never by token id, so EOS is still learned" in caplog.text


@pytest.mark.parametrize(("to_32x", "rows"), [(False, 512), (True, 480)])
def test_added_tokens_resize_embeddings_and_train_in_full_with_lora(
    tmp_path, model_dir, to_32x, rows
):
    config, tok, model = built(
        tmp_path,
        model_dir,
        tokens=[f"<|t{i}|>" for i in range(30)],  # 420 + 30 = 450 tokens
        resize_token_embeddings_to_32x=to_32x,
        adapter="lora",
        lora_target_modules=["q_proj", "v_proj"],
    )
    emb = model.get_input_embeddings()
    assert len(tok) == 450 and emb.weight.shape[0] == rows
    lora = model.peft_config["default"]
    assert set(lora.modules_to_save) == {"embed_tokens", "lm_head"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)


def test_added_tokens_are_learned_and_saved_through_the_cli(tmp_path, model_dir):
    from newtune.cli.inference import inference_command
    from newtune.cli.train import train_command

    path, config = config_of(
        tmp_path,
        model_dir,
        tokens=["<|new_a|>"],
        adapter="lora",
        lora_target_modules=["q_proj", "v_proj"],
        max_steps=3,
    )
    train_command(str(path))
    out = Path(config.output_dir)
    saved = load_file(out / "adapter_model.safetensors")
    new_id = load_tokenizer(config, str(out)).tokenizer.convert_tokens_to_ids("<|new_a|>")
    base = load_file(model_dir / "model.safetensors")["model.embed_tokens.weight"]
    emb_key = next(k for k in saved if "embed_tokens" in k)
    head_key = next(k for k in saved if "lm_head" in k)
    assert saved[emb_key].shape[0] == 448 and saved[head_key].shape[0] == 448
    assert new_id == base.shape[0]  # the first new row
    # the new token's row moved away from its initial value (the mean embedding) while training
    assert not torch.allclose(saved[emb_key][new_id], base.mean(0), atol=1e-4)
    # the old rows are copied into the trained module too (full-module training)
    assert saved[emb_key].shape[1] == base.shape[1]
    inference_command(str(path), prompt="Say blue.", max_new_tokens=3)


def test_model_keys_reach_the_model(tmp_path, model_dir):
    other = tmp_path / "other_config"
    other.mkdir()
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (other / "config.json").write_text(json.dumps(cfg))
    _, config = config_of(
        tmp_path,
        model_dir,
        model_type="LlamaForCausalLM",
        base_model_config=str(other),
        overrides_of_model_config={
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "rope_theta": 5000.0,
            "max_position_embeddings": 128,
        },
        attn_implementation="eager",
        device_map="cpu",
    )
    options = ModelOptions.from_config(config)
    assert options.device_map == "cpu"
    model = load_model(config.base_model, options=options)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.rms_norm_eps == 1e-3  # from base_model_config
    assert model.config.max_position_embeddings == 128
    assert model.config.rope_parameters == {
        "rope_theta": 5000.0,
        "rope_type": "linear",
        "factor": 2.0,
    }
    assert model.config._attn_implementation == "eager"
    _, config = config_of(tmp_path, model_dir, model_type="NotAModel")
    with pytest.raises(ConfigError, match="`model_type: NotAModel` is not a transformers model"):
        load_model(config.base_model, options=ModelOptions.from_config(config))


def test_gpu_memory_limit_becomes_max_memory_per_gpu(tmp_path, model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _, config = config_of(tmp_path, model_dir, gpu_memory_limit=20, device_map="auto")
    options = ModelOptions.from_config(config)
    assert options.max_memory == {0: "20GiB", 1: "20GiB"} and options.device_map == "auto"


@pytest.mark.parametrize("mode", [True, "offload"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, model_dir, mode):
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])

    def grads(**extra):
        _, _, model = built(tmp_path, model_dir, adapter="lora", lora_target_linear=True, **extra)
        torch.manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return model, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model, checkpointed = grads(gradient_checkpointing=mode)
    assert model.base_model.model.is_gradient_checkpointing
    _, plain = grads()
    assert checkpointed.keys() == plain.keys() and len(plain) == 2 * 7 * 2
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)


def test_adapter_options_reach_peft(tmp_path, model_dir):
    config, _, model = built(
        tmp_path,
        model_dir,
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        lora_modules_to_save=["lm_head"],
        peft_layers_to_transform=[1],
        peft_use_rslora=True,
        peft_use_dora=True,
    )
    lora_layers = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert lora_layers == {
        "base_model.model.model.layers.1.self_attn.q_proj",
        "base_model.model.model.layers.1.self_attn.v_proj",
    }
    q = model.base_model.model.model.layers[1].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    assert "default" in q.lora_magnitude_vector  # DoRA
    assert any(
        "lm_head.modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad
    )


def test_peft_mapping_loftq_and_typos(tmp_path, model_dir):
    from newtune.models.adapters import lora_config

    _, config = config_of(
        tmp_path,
        model_dir,
        adapter="lora",
        lora_target_modules=["q_proj"],
        peft={"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}, "exclude_modules": ["x"]},
    )
    lora = lora_config(config)
    assert lora.init_lora_weights == "loftq" and lora.loftq_config["loftq_bits"] == 4
    assert lora.loftq_config["loftq_iter"] == 1 and lora.exclude_modules == {"x"}
    if not torch.cuda.is_available():  # peft computes LoftQ on cuda only
        with pytest.raises(ConfigError, match="`peft.loftq_config` needs a CUDA GPU"):
            build_model(config, resolve(config), load_tokenizer(config).tokenizer)
    with pytest.raises(
        ConfigError,
        match=r"`peft.loftq_confg` is not a peft LoraConfig option. Did you mean `loftq_config`\?",
    ):
        built(
            tmp_path, model_dir, adapter="lora", lora_target_linear=True, peft={"loftq_confg": {}}
        )


def test_fan_in_fan_out_reaches_conv1d_lora(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from newtune.models.adapters import attach_lora

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    config = from_dict(
        tmp_path,
        {
            "base_model": "gpt2",
            "datasets": [],
            "adapter": "lora",
            "lora_target_modules": ["c_attn"],
            "lora_fan_in_fan_out": True,
        },
    )
    peft_model = attach_lora(model, config)
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out is True


def test_default_system_message_goes_first_in_training_and_inference(tmp_path, model_dir):
    from newtune.data.prepare import engine_for
    from newtune.data.strategies import get_strategy

    _, config = config_of(tmp_path, model_dir, default_system_message="Be brief.")
    tok, _ = load_tokenizer(config)
    strategy = get_strategy(config.datasets[0], 0, False)
    engine = engine_for(config.datasets[0], config, tok, tok.chat_template, strategy)
    row = engine.tokenize(strategy.sample(CHATS[0]))[0]
    text = tok.decode(row.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay blue.")
    system_len = len(
        tok("<|im_start|>system\nBe brief.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    )
    assert all(label == -100 for label in row.labels[: system_len + 1])
    prompt = engine.prompt_ids(strategy.prompt("Say blue."))
    assert prompt == row.input_ids[: len(prompt)]


def test_quantization_rules(tmp_path, model_dir):
    with pytest.raises(ConfigError, match=r"`load_in_8bit: true` without `adapter`: quantized"):
        config_of(tmp_path, model_dir, load_in_8bit=True)
    with pytest.raises(ConfigError, match=r"`load_in_4bit: true` with a .gguf `base_model`"):
        from_dict(
            tmp_path,
            {"base_model": "m.gguf", "datasets": [], "adapter": "qlora", "load_in_4bit": True},
        )


@pytest.mark.parametrize(
    ("extra", "layer"),
    [
        ({"adapter": "qlora", "load_in_4bit": True}, "Linear4bit"),
        ({"adapter": "lora", "load_in_8bit": True}, "Linear8bitLt"),
    ],
)
def test_quantized_base_loads_and_trains_on_cpu(tmp_path, model_dir, extra, layer):
    pytest.importorskip("bitsandbytes")
    from newtune.cli.train import train_command

    path, config = config_of(
        tmp_path,
        model_dir,
        lora_target_linear=True,
        bnb_config_kwargs={"bnb_4bit_use_double_quant": False} if "load_in_4bit" in extra else {},
        logging_steps=1,
        **extra,
    )
    tok, new_ids = load_tokenizer(config)
    model = build_model(config, resolve(config), tok, new_ids)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q.base_layer).__name__ == layer
    if layer == "Linear4bit":
        assert q.base_layer.weight.quant_state.nested is False  # bnb_config_kwargs applied
    train_command(str(path))
    out = Path(config.output_dir)
    history = json.loads((out / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (out / "adapter_model.safetensors").is_file()
    # the adapter trained on the quantized base merges into the full-precision base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from newtune.cli.merge_lora import merge_lora_command

    merge_lora_command(str(path))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = PeftModel.from_pretrained(full, out).merge_and_unload().state_dict()
    got = merged.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=0)
    trained = load_file(out / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
