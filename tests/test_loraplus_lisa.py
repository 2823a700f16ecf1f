"""LoRA+ parameter groups (peft's create_loraplus_optimizer) and LISA's layer sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import write_jsonl
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_cli import CHATS, cli, make_config
from test_training_options import PEAK, config
from transformers import LlamaForCausalLM, TrainerControl, TrainerState

from newtune.config.resolve import resolve
from newtune.train.args import build_training_args
from newtune.train.lisa import LISACallback, draw_layers
from newtune.train.seed_features import attach
from newtune.train.trainer import NewtuneTrainer


def trainer_with(tmp_path, model, **keys):
    cfg = config(tmp_path, learning_rate=PEAK, **keys)
    args = build_training_args(cfg, resolve(cfg, env={}), False, steps_per_epoch=10)
    return attach(NewtuneTrainer(model=model, args=args), cfg, None)


# -- LoRA+ ------------------------------------------------------------------------------------


def test_loraplus_param_groups_carry_the_ratio_and_the_embedding_lr(tmp_path, model_dir):
    base = LlamaForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    model = get_peft_model(base, lora)
    trainer = trainer_with(
        tmp_path,
        model,
        adapter="lora",
        loraplus_lr_ratio=16,
        loraplus_lr_embedding=3e-5,
        weight_decay=0.1,
        adam_beta2=0.95,
    )
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr: dict[float, set[str]] = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(names[id(p)] for p in group["params"])
        assert group["betas"] == (0.9, 0.95)  # the configured optimizer's own arguments
        if group["params"]:
            assert group["weight_decay"] == 0.1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*by_lr.values()) == trainable  # every trainable parameter, once
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    assert by_lr[PEAK * 16] == {n for n in trainable if "lora_B" in n and "embed" not in n}
    assert by_lr[PEAK] == {n for n in trainable if "lora_A" in n and "embed" not in n}
    assert by_lr[3e-5] == {n for n in trainable if "embed_tokens" in n}  # lora_embedding_A/B
    assert len(by_lr[3e-5]) == 2


def test_loraplus_embedding_lr_defaults_to_peft_default(tmp_path, model_dir):
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules=["q_proj"])
    )
    trainer = trainer_with(tmp_path, model, adapter="lora", loraplus_lr_ratio=4)
    lrs = sorted({g["lr"] for g in trainer.create_optimizer().param_groups if g["params"]})
    assert lrs == [PEAK, PEAK * 4]
    assert trainer.loraplus.embedding_lr == 1e-6


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"loraplus_lr_ratio": 16}, "`loraplus_lr_ratio` needs `adapter: lora` or `qlora`"),
        (
            {"adapter": "lora", "loraplus_lr_embedding": 1e-6},
            "`loraplus_lr_embedding` without `loraplus_lr_ratio`",
        ),
        ({"lisa_n_layers": 1}, "`lisa_n_layers` alone: LISA needs both"),
        (
            {"adapter": "lora", "lisa_n_layers": 1, "lisa_step_interval": 2},
            "LISA (`lisa_n_layers`) with `adapter: lora`",
        ),
    ],
)
def test_misuse_is_refused_by_name(tmp_path, model_dir, keys, expected):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(tmp_path, model_dir, data, "chat_template", **keys)
    proc = cli("-m", "newtune.cli.main", "validate", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert expected in " ".join(proc.stderr.split())


# -- LISA -------------------------------------------------------------------------------------


def test_lisa_requires_grad_pattern_follows_the_seeded_draws(tmp_path, model_dir):
    model = LlamaForCausalLM.from_pretrained(model_dir)
    trainer = trainer_with(tmp_path, model, lisa_n_layers=1, lisa_step_interval=2, seed=7)
    optimizer = trainer.create_optimizer()  # before the first draw: every parameter trains
    covered = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert covered == {id(p) for p in model.parameters()}
    lisa = next(c for c in trainer.callback_handler.callbacks if isinstance(c, LISACallback))
    state, control = TrainerState(), TrainerControl()
    layers = model.model.layers
    seen = []
    for step in range(6):
        state.global_step = step
        lisa.on_step_begin(trainer.args, state, control)
        active = [
            i for i, layer in enumerate(layers) if all(p.requires_grad for p in layer.parameters())
        ]
        frozen = [
            i
            for i, layer in enumerate(layers)
            if not any(p.requires_grad for p in layer.parameters())
        ]
        assert len(active) == 1 and sorted(active + frozen) == [0, 1]
        assert active == draw_layers(1, 2, 7, step - step % 2)  # redrawn at steps 0, 2, 4
        seen.append(active[0])
    assert seen[0] == seen[1] and seen[2] == seen[3] and seen[4] == seen[5]
    assert model.model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    draws = {tuple(draw_layers(2, 8, 7, s)) for s in range(0, 40, 2)}
    assert len(draws) > 5  # different steps draw different layers
    assert draw_layers(2, 8, 7, 4) == draw_layers(2, 8, 7, 4)  # reproducible from the seed


def test_lisa_layers_attribute_must_name_the_layer_list(tmp_path, model_dir):
    from newtune.errors import ConfigError

    model = LlamaForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ConfigError, match="`lisa_layers_attribute: model.blocks`"):
        trainer_with(
            tmp_path,
            model,
            lisa_n_layers=1,
            lisa_step_interval=2,
            lisa_layers_attribute="model.blocks",
        )
    with pytest.raises(ConfigError, match="`lisa_n_layers: 3` is more than the 2 layers"):
        trainer_with(tmp_path, model, lisa_n_layers=3, lisa_step_interval=2)


@pytest.mark.slow
def test_cli_lisa_run_trains_only_the_drawn_layer(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        "chat_template",
        max_steps=2,
        lisa_n_layers=1,
        lisa_step_interval=2,  # one draw, at step 0
        seed=11,
    )
    proc = cli("-m", "newtune.cli.main", "train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (drawn,) = draw_layers(1, 2, 11, 0)
    assert f"LISA: step 0 trains layers [{drawn}]" in proc.stderr
    base = load_file(str(model_dir / "model.safetensors"))
    tuned = load_file(str(tmp_path / "out" / "model.safetensors"))
    for layer in (0, 1):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        changed = not torch.equal(base[name], tuned[name])
        assert changed == (layer == drawn), layer
    assert not torch.equal(base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])


@pytest.mark.slow
def test_cli_loraplus_run_trains(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        "chat_template",
        adapter="lora",
        lora_target_linear=True,
        max_steps=1,
        loraplus_lr_ratio=16,
    )
    proc = cli("-m", "newtune.cli.main", "train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA+: lora_B at lr 0.01 x 16, LoRA embeddings at lr 1e-06" in proc.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
