"""Axolotl plugin, kernel, tracker and parallelism keys (issue 16, part 2): each reaches the
object it configures (loss, parameters, LoraConfig, TrainingArguments, ParallelismConfig,
tokenizer call), or is refused by name with the reason."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from test_cli import cli as launch
from test_trust_config import cli, error_line
from transformers import LlamaConfig, LlamaForCausalLM

from newtune.config.load import load_config
from newtune.config.machine import check_machine, machine_problems
from newtune.config.resolve import resolve
from newtune.errors import ConfigError, ModelError
from newtune.models.adapters import lora_config
from newtune.models.load import ModelOptions
from newtune.train.args import build_training_args
from newtune.train.compat2 import (
    apply_cut_cross_entropy,
    apply_model_keys,
    freeze_except,
    parallelism_config,
)
from newtune.train.report import tracker_env

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
CCE = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"


def write(tmp_path: Path, **keys) -> str:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({**BASE, **keys}, sort_keys=False))
    return str(path)


def loaded(tmp_path: Path, **keys):
    return load_config(write(tmp_path, **keys))


def error_of(tmp_path: Path, **keys) -> str:
    with pytest.raises(ConfigError) as info:
        loaded(tmp_path, **keys)
    return str(info.value)


def args_of(cfg):
    return build_training_args(cfg, resolve(cfg, env={}), True, steps_per_epoch=10)


def runnable(tmp_path: Path, **keys) -> str:
    """A config file whose dataset exists (for `newtune train`)."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    keys = {
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "output_dir": str(tmp_path / "out"),
        "dataset_prepared_path": str(tmp_path / "prepared"),
        **keys,
    }
    return write(tmp_path, **keys)


# -- 1. plugins: Cut Cross Entropy ------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("cut_cross_entropy") is not None, reason="needs it absent"
)
def test_cce_plugin_validates_with_a_warning_and_train_refuses_with_pip_and_cuda(tmp_path):
    cfg = runnable(tmp_path, plugins=[CCE], bf16=True)
    proc = cli("validate", cfg)
    assert proc.returncode == 0, proc.stderr
    assert (
        "warning: Cut Cross Entropy (`cut_cross_entropy` / CutCrossEntropyPlugin) needs the "
        "cut-cross-entropy package, which is not installed here; the machine that trains needs "
        "it (`pip install cut-cross-entropy`)." in proc.stderr
    )
    assert "plugin CutCrossEntropyPlugin: newtune reads cut_cross_entropy" in proc.stderr
    err = error_line(cli("train", cfg))
    assert "needs the cut-cross-entropy package, which is not installed; run `pip install " in err
    assert (
        "Cut Cross Entropy (`cut_cross_entropy` / CutCrossEntropyPlugin) needs CUDA (its kernels "
        "are Triton GPU kernels), and this machine trains on cpu" in err
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "prepared").exists()


def test_cce_needs_half_precision_and_excludes_liger_losses(tmp_path):
    assert "needs half-precision training for its backward pass; set `bf16: true`" in error_of(
        tmp_path, plugins=[CCE]
    )
    assert "Cut Cross Entropy and `liger_cross_entropy` both replace the loss" in error_of(
        tmp_path, cut_cross_entropy=True, bf16=True, liger_cross_entropy=True
    )
    # the plugin listed with `cut_cross_entropy: false` is off: no rule, no package needed
    cfg = loaded(tmp_path, plugins=[CCE], cut_cross_entropy=False).config
    assert not any("cut-cross-entropy" in p for p in machine_problems(cfg, "cuda"))


def test_unknown_plugins_are_refused_by_name_and_known_ones_accepted(tmp_path):
    err = error_of(tmp_path, plugins=["axolotl.integrations.llm_compressor.LLMCompressorPlugin"])
    assert (
        "axolotl.integrations.llm_compressor.LLMCompressorPlugin are Axolotl plugins newtune "
        "does not run" in err
    )
    assert "newtune reads LigerPlugin, CutCrossEntropyPlugin, KernelsPlugin, SwanLabPlugin" in err
    result = loaded(
        tmp_path,
        plugins=[
            "axolotl.integrations.kernels.KernelsPlugin",
            "axolotl.integrations.liger.LigerPlugin",
        ],
    )
    assert [p.rsplit(".", 1)[-1] for p in result.config.plugins] == ["KernelsPlugin", "LigerPlugin"]


def _stub_cce(calls: list) -> types.ModuleType:
    """A cut_cross_entropy stand-in: its linear_cross_entropy is the plain math (logits = e @ c.T,
    shift, ignore -100), and it records what newtune hands it."""
    module = types.ModuleType("cut_cross_entropy")
    module.__spec__ = importlib.machinery.ModuleSpec("cut_cross_entropy", None)

    def linear_cross_entropy(
        e, c, targets, ignore_index=-100, softcap=None, reduction="mean", shift=False, impl="cce"
    ):
        calls.append({"c": c, "shift": shift, "reduction": reduction, "impl": impl, "e": e.shape})
        logits = (e @ c.T).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if shift:
            logits, targets = logits[:, :-1], targets[:, 1:]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=ignore_index,
            reduction=reduction,
        )

    module.linear_cross_entropy = linear_cross_entropy
    return module


def test_cce_loss_goes_through_the_package_on_hidden_states_and_head_weight(model_dir, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", _stub_cce(calls))
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    model.train()
    plain = model(input_ids=ids, labels=labels).loss
    plain_sum = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(5)).loss
    apply_cut_cross_entropy(model)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None  # the logits are never built
    torch.testing.assert_close(out.loss, plain)
    torch.testing.assert_close(
        model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(5)).loss, plain_sum
    )
    assert calls[0]["c"] is model.lm_head.weight and calls[0]["shift"] is True
    assert [c["reduction"] for c in calls] == ["mean", "sum"]
    assert calls[0]["e"] == (2, 9, model.config.hidden_size)  # the decoder's hidden states
    model.eval()  # eval: the model's own forward, with logits
    assert model(input_ids=ids, labels=labels).logits.shape == (2, 9, model.config.vocab_size)
    assert len(calls) == 2


def test_cce_loss_backpropagates_like_the_plain_loss_under_lora(model_dir, monkeypatch, tmp_path):
    from peft import get_peft_model

    monkeypatch.setitem(sys.modules, "cut_cross_entropy", _stub_cce([]))
    cfg = loaded(
        tmp_path, adapter="lora", lora_target_modules=["q_proj"], cut_cross_entropy=True, bf16=True
    ).config
    grads = []
    for cce in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir), lora_config(cfg))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)
        if cce:
            apply_cut_cross_entropy(model)
        model.train()
        ids = torch.arange(8).view(1, 8) + 3
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for n, p in model.named_parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("cls", "extra"),
    [
        ("GraniteForCausalLM", {"logits_scaling": 4.0}),
        ("CohereForCausalLM", {"logit_scale": 0.25}),
        ("Gemma2ForCausalLM", {"final_logit_softcapping": 0.5, "head_dim": 8}),
    ],
)
def test_cce_keeps_the_models_logit_scaling(monkeypatch, cls, extra):
    import transformers

    calls: list = []
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", _stub_cce(calls))
    model_cls = getattr(transformers, cls)
    config = model_cls.config_class(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = model_cls(config).train()
    ids = torch.randint(0, 50, (2, 7))
    plain = model(input_ids=ids, labels=ids).loss
    apply_cut_cross_entropy(model)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, plain)
    assert len(calls) == 1


def test_cce_refuses_what_its_loss_would_drop(model_dir, monkeypatch):
    from transformers import LlamaForSequenceClassification, Qwen3MoeConfig, Qwen3MoeForCausalLM

    monkeypatch.setitem(sys.modules, "cut_cross_entropy", _stub_cce([]))
    moe = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
            num_experts_per_tok=2, output_router_logits=True,
        )
    )  # fmt: skip
    with pytest.raises(ModelError, match=r"auxiliary loss \(`output_router_logits: true`\)"):
        apply_cut_cross_entropy(moe)
    scorer = LlamaForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    with pytest.raises(ModelError, match="LlamaForSequenceClassification is not one"):
        apply_cut_cross_entropy(scorer)


@pytest.mark.skipif(
    importlib.util.find_spec("cut_cross_entropy") is None, reason="needs cut-cross-entropy"
)
def test_cce_torch_compile_impl_equals_plain_cross_entropy(model_dir):
    model = LlamaForCausalLM.from_pretrained(model_dir)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model.train()
    plain = model(input_ids=ids, labels=ids).loss
    apply_cut_cross_entropy(model, impl="torch_compile")
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, plain, rtol=1e-4, atol=1e-4)


# -- kernels ----------------------------------------------------------------------------------


def test_experts_implementation_reaches_the_moe_model(tmp_path):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            moe_intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_experts=4,
            num_experts_per_tok=2,
        )
    )
    cfg = loaded(tmp_path, experts_implementation="batched_mm").config
    apply_model_keys(model, cfg)
    assert model.config._experts_implementation == "batched_mm"
    err = error_of(tmp_path, experts_implementation="scatter")
    assert "`scatter` is not one of eager, batched_mm, grouped_mm, deepgemm, sonicmoe, " in err


@pytest.mark.skipif(importlib.util.find_spec("kernels") is not None, reason="needs it absent")
def test_use_kernels_warns_here_and_fails_clearly_without_the_package(tmp_path, model_dir):
    result = loaded(tmp_path, use_kernels=True)
    problems = machine_problems(result.config, "cuda")
    assert problems == [
        "`use_kernels: true` needs the kernels package (transformers' hub-kernels integration), "
        "which is not installed; run `pip install kernels`, or remove it (the model's own "
        "PyTorch layers)"
    ]
    with pytest.raises(ModelError, match=r"`use_kernels: true`: transformers could not kernelize"):
        apply_model_keys(LlamaForCausalLM.from_pretrained(model_dir), result.config)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("fp8", True, "`fp8` needs fp8 matmuls"),
        ("expert_parallel_token_capacity", 1024, "Axolotl's own DeepEP dispatch"),
        ("nvfp4_merge_aware", True, "`nvfp4_merge_aware` is Axolotl's own code"),
    ],
)
def test_keys_without_a_library_are_refused_by_name(tmp_path, key, value, expected):
    err = error_of(tmp_path, **{key: value})
    assert f"`{key}: " in err and expected in err
    assert loaded(tmp_path, **{key: None if value is not True else False}).config is not None


# -- training keys ----------------------------------------------------------------------------


def test_unfrozen_parameters_train_only_the_matching_parameters(tmp_path, model_dir):
    model = LlamaForCausalLM.from_pretrained(model_dir)
    cfg = loaded(tmp_path, unfrozen_parameters=["model.layers.1.mlp.*", "lm_head"]).config
    apply_model_keys(model, cfg)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    }
    # `.` is a literal dot: `model.layers.1` does not match model.layers.10/1x names by accident
    assert not any(n.startswith("model.layers.0") for n in trained)


def test_unfrozen_parameters_row_range_zeroes_the_other_rows_gradient(model_dir):
    model = LlamaForCausalLM.from_pretrained(model_dir)
    freeze_except(model, ["model.embed_tokens.weight$[:5]"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "model.embed_tokens.weight"
    ]
    ids = torch.arange(12).view(1, 12)
    model(input_ids=ids, labels=ids).loss.backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad[:5].abs().sum() > 0 and grad[5:].abs().sum() == 0


def test_unfrozen_parameters_refusals(tmp_path, model_dir):
    err = error_of(tmp_path, unfrozen_parameters=["^model.*"], adapter="lora")
    assert "the names of peft's wrapped model, which all start with `base_model.model.`" in err
    with pytest.raises(ConfigError, match=r"matches none of the model's parameters"):
        freeze_except(LlamaForCausalLM.from_pretrained(model_dir), ["^nothing"])


def test_lora_target_parameters_reach_the_lora_config(tmp_path):
    cfg = loaded(
        tmp_path,
        adapter="lora",
        lora_target_modules=["q_proj"],
        lora_target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    ).config
    assert lora_config(cfg).target_parameters == [
        "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj",
    ]
    err = error_of(tmp_path, adapter="lora", lora_target_parameters=["x"], lora_dropout=0.05)
    assert "`lora_target_parameters` needs `lora_dropout: 0`" in err


def test_activation_offloading_keeps_saved_tensors_on_the_cpu(tmp_path, model_dir, monkeypatch):
    entered = []
    real = torch.autograd.graph.save_on_cpu

    def spy(*args, **kwargs):
        entered.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", spy)
    cfg = loaded(tmp_path, activation_offloading=True, gradient_checkpointing=True).config
    model = LlamaForCausalLM.from_pretrained(model_dir)
    apply_model_keys(model, cfg)
    ids = torch.arange(6).view(1, 6)
    model(input_ids=ids, labels=ids).loss.backward()
    assert entered == [{"pin_memory": torch.cuda.is_available()}]
    assert "requires `gradient_checkpointing: true`" in error_of(
        tmp_path, activation_offloading=True
    )
    err = error_of(tmp_path, activation_offloading="disk", gradient_checkpointing=True)
    assert "`activation_offloading: disk` uses TRL's offloader" in err


# -- tokenizer --------------------------------------------------------------------------------


def test_mistral_common_reaches_the_tokenizer_call(tmp_path, model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from newtune.models.tokenizer import load_tokenizer

    seen = {}
    real = AutoTokenizer.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        kwargs.pop("mistral_format")
        return real(path, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    cfg = loaded(tmp_path, tokenizer_use_mistral_common=True).config.model_copy(
        update={"base_model": str(model_dir)}
    )
    load_tokenizer(cfg)
    assert seen["mistral_format"] is True
    if importlib.util.find_spec("mistral_common") is None:
        assert machine_problems(cfg, "cpu") == [
            "`tokenizer_use_mistral_common: true` needs the mistral-common package, which is not "
            "installed; run `pip install mistral-common`, or remove it (the model's Hugging Face "
            "tokenizer)"
        ]


# -- trackers ---------------------------------------------------------------------------------


def test_trackio_reaches_training_arguments(tmp_path):
    cfg = loaded(
        tmp_path, trackio_project_name="proj", trackio_run_name="run1", trackio_space_id="me/space"
    ).config
    args = args_of(cfg)
    assert args.report_to == ["trackio"]
    assert (args.project, args.run_name, args.trackio_space_id) == ("proj", "run1", "me/space")
    assert "`trackio_run_name` without `trackio_project_name`" in error_of(
        tmp_path, trackio_run_name="r"
    )


def test_swanlab_reaches_report_to_and_its_environment(tmp_path):
    cfg = loaded(
        tmp_path,
        plugins=["axolotl.integrations.swanlab.SwanLabPlugin"],
        use_swanlab=True,
        swanlab_project="p",
        swanlab_experiment_name="e",
        swanlab_mode="offline",
        swanlab_log_model=False,
    ).config
    args = args_of(cfg)
    assert args.report_to == [] and args.run_name == "e"  # NewtuneSwanLabCallback reports
    env = tracker_env(cfg)
    assert {k: v for k, v in env.items() if k.startswith("SWANLAB_")} == {
        "SWANLAB_MODE": "offline",  # the project goes to swanlab.init (NewtuneSwanLabCallback)
        "SWANLAB_LOG_MODEL": "false",
    }
    if importlib.util.find_spec("swanlab") is None:
        assert (
            "reporting to swanlab needs swanlab, which is not installed; run `pip install swanlab`"
            in machine_problems(cfg, "cpu")[0]
        )
    assert "`use_swanlab: true` needs `swanlab_project`" in error_of(tmp_path, use_swanlab=True)
    assert "set without `use_swanlab: true`" in error_of(tmp_path, swanlab_project="p")
    assert "`swanlab_lark_secret` is read by Axolotl's own SwanLab plugin" in error_of(
        tmp_path, use_swanlab=True, swanlab_project="p", swanlab_lark_secret="s"
    )


def test_swanlab_description_and_workspace_reach_swanlab_init(tmp_path, monkeypatch):
    from newtune.train.callbacks import build_callbacks

    inits = []
    fake = types.ModuleType("swanlab")
    fake.__spec__ = importlib.machinery.ModuleSpec("swanlab", None)
    fake.config = {}  # swanlab.config: the callback updates it like a dict
    runs = []
    fake.get_run = lambda: runs[0] if runs else None
    fake.init = lambda **kwargs: inits.append(kwargs) or runs.append(object())
    monkeypatch.setitem(sys.modules, "swanlab", fake)
    cfg = loaded(
        tmp_path, use_swanlab=True, swanlab_project="p", swanlab_experiment_name="e",
        swanlab_description="what this run tries", swanlab_workspace="team",
    ).config  # fmt: skip
    args = args_of(cfg)
    assert args.report_to == []  # the callback below reports instead of report_to's
    (callback,) = [c for c in build_callbacks(cfg) if "SwanLab" in type(c).__name__]
    monkeypatch.setenv("SWANLAB_PROJECT", "p")
    state = types.SimpleNamespace(is_world_process_zero=True, trial_name=None)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
        )
    )
    callback.setup(args, state, model)
    assert inits == [
        {
            "description": "what this run tries",
            "workspace": "team",
            "experiment_name": "e",
            "project": "p",
        }
    ]
    assert callback._swanlab is fake  # the module itself is left unchanged


# -- parallelism ------------------------------------------------------------------------------


def test_parallelism_sizes_map_onto_accelerates_parallelism_config(tmp_path):
    cfg = loaded(
        tmp_path, dp_shard_size=2, dp_replicate_size=2, tensor_parallel_size=2,
        context_parallel_size=1, fsdp_version=2, fsdp_config={"fsdp_offload_params": False},
    ).config  # fmt: skip
    parallel = parallelism_config(cfg, world_size=8)
    assert (parallel.dp_replicate_size, parallel.dp_shard_size, parallel.tp_size) == (2, 2, 2)
    assert parallel.cp_size == 1 and parallel.total_size == 8
    plan = resolve(cfg, env={"WORLD_SIZE": "8"}, probe=lambda: ("cuda", True))
    args = build_training_args(cfg, plan, True, 10)
    assert args.parallelism_config.tp_size == 2
    assert ModelOptions.from_config(cfg).tensor_parallel == {"tp_plan": "auto", "tp_size": 2}
    # sizes of 1 are off: no ParallelismConfig, no TP loading
    off = loaded(tmp_path, dp_shard_size=1, tensor_parallel_size=1).config
    assert parallelism_config(off, world_size=1) is None
    assert ModelOptions.from_config(off).tensor_parallel == {}
    assert machine_problems(cfg, "cpu", world_size=8) == [
        "`dp_shard_size`, `tensor_parallel_size` need CUDA (accelerate builds FSDP2 / tensor / "
        "context parallelism on a CUDA device mesh), and this machine trains on cpu; train on a "
        "CUDA GPU, or use `dp_replicate_size` (DDP) alone"
    ]
    assert machine_problems(cfg, "cuda", world_size=4) == [
        "the parallelism sizes (`dp_replicate_size: 2`, `dp_shard_size: 2`, "
        "`tensor_parallel_size: 2`, `context_parallel_size: 1`) do not fit this launch of 4 "
        "process(es): they need a multiple of 8 processes; launch a fitting number (`accelerate "
        "launch --num_processes N`), or change the sizes (with TP/CP the other processes must "
        "shard: add `fsdp_config` with `fsdp_version: 2`)"
    ]


def test_parallelism_fills_the_rest_of_the_launch_as_axolotl_does(tmp_path):
    fsdp = {"fsdp_version": 2, "fsdp_config": {"fsdp_offload_params": False}}
    tp_fsdp = loaded(tmp_path, tensor_parallel_size=2, **fsdp).config
    parallel = parallelism_config(tp_fsdp, world_size=8)  # FSDP: the rest shard
    assert (parallel.tp_size, parallel.dp_shard_size, parallel.dp_replicate_size) == (2, 4, 1)
    hsdp_tp = loaded(tmp_path, tensor_parallel_size=2, dp_shard_size=2, **fsdp).config
    parallel = parallelism_config(hsdp_tp, world_size=8)  # shard given: the rest replicate
    assert (parallel.tp_size, parallel.dp_shard_size, parallel.dp_replicate_size) == (2, 2, 2)
    # without FSDP the rest are DDP replicas, which accelerate does not compose with TP
    tp = loaded(tmp_path, tensor_parallel_size=2).config
    problem = machine_problems(tp, "cuda", world_size=8)[-1]
    assert "do not fit this launch of 8 process(es): Tensor/Context parallelism" in problem
    assert "add `fsdp_config` with `fsdp_version: 2`" in problem
    assert "`dp_shard_size` shards with FSDP2, which is not configured" in error_of(
        tmp_path, dp_shard_size=2
    )


def test_dp_replicate_alone_is_ddp_and_must_match_the_launch(tmp_path):
    cfg = loaded(tmp_path, dp_replicate_size=2).config
    assert machine_problems(cfg, "cpu", world_size=2) == []
    assert parallelism_config(cfg, world_size=2) is None  # plain DDP: no device mesh
    hsdp = parallelism_config(
        loaded(
            tmp_path, dp_replicate_size=2, dp_shard_size=2, fsdp_version=2,
            fsdp_config={"fsdp_offload_params": False},
        ).config,
        4,
    )  # fmt: skip
    assert (hsdp.dp_replicate_size, hsdp.dp_shard_size, hsdp.total_size) == (2, 2, 4)
    with pytest.raises(ConfigError, match="do not fit this launch of 1 process"):
        check_machine(cfg, "cpu")
    assert "`dp_shard_size` shards with FSDP2; `fsdp_version: 1`" in error_of(
        tmp_path, dp_shard_size=2, fsdp_version=1, fsdp_config={"fsdp_offload_params": False}
    )


PARALLEL_SPY = """
import json, os, sys
import newtune.train.run as run
from newtune.cli.train import main

spy = sys.argv.pop(1)
train = run.NewtuneTrainer.train

def spied_train(self, *args, **kwargs):
    result = train(self, *args, **kwargs)
    with open(os.path.join(spy, f"rank-{os.environ['RANK']}.json"), "w") as f:
        json.dump({
            "parallelism_config": repr(self.args.parallelism_config),
            "distributed": str(self.accelerator.distributed_type),
            "processes": self.accelerator.num_processes,
            "wrapped": type(self.model_wrapped).__name__,
            "steps": self.state.global_step,
        }, f)
    return result

run.NewtuneTrainer.train = spied_train
main()
"""


@pytest.mark.slow
def test_dp_replicate_size_trains_on_two_cpu_ranks_with_ddp(tmp_path, model_dir):
    rows = [
        {"instruction": f"Add {a} and {b}.", "output": f"{a + b}."}
        for a in range(2)
        for b in range(4)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = write(
        tmp_path,
        base_model=str(model_dir),
        datasets=[{"path": str(data), "type": "alpaca"}],
        output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"),
        adapter="lora",
        lora_r=2,
        lora_target_modules=["q_proj"],
        micro_batch_size=2,
        max_steps=2,
        learning_rate=0.001,
        dp_replicate_size=2,
    )
    spy = tmp_path / "spy"
    spy.mkdir()
    script = tmp_path / "spy.py"
    script.write_text(PARALLEL_SPY)
    proc = launch(
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(script), str(spy), cfg,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((spy / f"rank-{rank}.json").read_text())
        assert seen == {
            "parallelism_config": "None",
            "distributed": "DistributedType.MULTI_CPU",
            "processes": 2,
            "wrapped": "DistributedDataParallel",
            "steps": 2,
        }
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


# -- quantization-aware training (torchao) ----------------------------------------------------

QAT = {"activation_dtype": "int8", "weight_dtype": "int4", "group_size": 16}


def test_qat_layouts_torchao_cannot_train_are_refused(tmp_path):
    assert "int8 weight-only is not a layout torchao's QAT supports" in error_of(
        tmp_path, qat={"weight_dtype": "int8"}
    )
    assert "int4 activations with int4 weights" in error_of(
        tmp_path, qat={"activation_dtype": "int4", "weight_dtype": "int4"}
    )
    assert "nvfp4 uses a group_size of 16, not 32" in error_of(
        tmp_path, qat={"activation_dtype": "nvfp4", "weight_dtype": "nvfp4", "group_size": 32}
    )
    assert "fake-quantizes the model's own linear layers in a full fine-tune" in error_of(
        tmp_path, qat=QAT, adapter="lora"
    )
    assert "Extra inputs are not permitted" in error_of(tmp_path, qat={**QAT, "bits": 4})


def test_qat_needs_torchao_and_cuda_for_the_fp4_layouts(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "torchao" else real(n, *a)
    )
    fp4 = {"activation_dtype": "nvfp4", "weight_dtype": "nvfp4", "group_size": 16}
    cfg = loaded(tmp_path, qat=fp4).config
    assert machine_problems(cfg, "cpu") == [
        "`qat` (nvfp4 weights) needs CUDA (torchao's nvfp4 fake quantization targets CUDA GPUs), "
        "and this machine trains on cpu; train on a CUDA GPU, or use `weight_dtype: int4` / "
        "`activation_dtype: int8`, or remove `qat`"
    ]
    assert machine_problems(loaded(tmp_path, qat=QAT).config, "cpu") == []
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if importlib.util.find_spec("torchao") is None:
        assert machine_problems(loaded(tmp_path, qat=QAT).config, "cpu") == [
            "`qat` (int4 weights) needs the torchao package, which is not installed; run "
            "`pip install torchao`, or remove `qat`"
        ]


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
def test_qat_fake_quantizes_the_linear_layers_and_converts_them_back(tmp_path, model_dir):
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    from newtune.train.compat2 import QATCallback, callbacks2, set_fake_quant

    cfg = loaded(
        tmp_path, qat={**QAT, "quantize_embedding": True, "fake_quant_after_n_steps": 3}
    ).config
    model = LlamaForCausalLM.from_pretrained(model_dir)
    ids = torch.arange(10).view(1, 10) + 3
    plain = model(input_ids=ids, labels=ids).loss
    apply_model_keys(model, cfg)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, FakeQuantizedLinear) and isinstance(
        model.lm_head, FakeQuantizedLinear
    )
    assert isinstance(model.model.embed_tokens, FakeQuantizedEmbedding)
    assert q_proj.weight_fake_quantizer.config.group_size == 16
    assert q_proj.activation_fake_quantizer.config.dtype == torch.int8
    faked = model(input_ids=ids, labels=ids).loss
    assert not torch.equal(faked, plain)  # the forward sees quantized weights
    # fake_quant_after_n_steps: off at step 0, on from step 3
    (callback,) = callbacks2(cfg)
    state = types.SimpleNamespace(global_step=0)
    callback.on_step_begin(None, state, None, model=model)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, plain)
    state.global_step = 3
    callback.on_step_begin(None, state, None, model=model)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, faked)
    assert set_fake_quant(model, True) == 16  # 2 layers x 7 linear, lm_head, embeddings
    callback.on_train_end(None, state, None, model=model)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    assert isinstance(callback, QATCallback)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
def test_qat_trains_two_steps_and_saves_a_plain_model(tmp_path, model_dir):
    from safetensors.torch import load_file

    cfg = runnable(
        tmp_path, base_model=str(model_dir), qat=QAT, max_steps=2, micro_batch_size=1,
        learning_rate=0.01, save_steps=1,
    )  # fmt: skip
    proc = cli("train", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(model_dir / "model.safetensors")
    assert saved.keys() == base.keys()  # plain layers: no fake-quantizer state
    assert not torch.equal(
        saved["model.layers.0.self_attn.q_proj.weight"],
        base["model.layers.0.self_attn.q_proj.weight"],
    )


def test_sequence_parallel_degree_is_the_legacy_context_parallel_size(tmp_path):
    result = loaded(
        tmp_path,
        sequence_parallel_degree=2,
        fsdp_version=2,
        fsdp_config={"fsdp_offload_params": False},
    )
    assert result.config.context_parallel_size == 2
    assert parallelism_config(result.config, world_size=4).cp_size == 2
