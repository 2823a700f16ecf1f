"""`expert_parallel_size` / Axolotl's ExpertParallelPlugin on transformers' expert parallelism
(train.expert_parallel): the DistributedConfig each launch gets, what validate refuses, and
two-rank CPU (gloo) runs that split a tiny Qwen3-MoE's experts and train as one process does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file
from test_cli import cli as launch
from test_trust_config import cli, error_line
from transformers import AutoTokenizer, LlamaConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

from newtune.config.load import load_config
from newtune.config.resolve import resolve
from newtune.errors import ModelError
from newtune.models.load import ModelOptions
from newtune.train.args import build_training_args
from newtune.train.expert_parallel import (
    check_model,
    distributed_config,
    launch_problem,
    with_expert_parallel,
)

EP_PLUGIN = "axolotl.integrations.expert_parallel.ExpertParallelPlugin"
BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
FSDP2 = {  # Axolotl's examples/expert_parallel/qwen3_30ba3b_ep_fsdp_fft_4gpu.yaml
    "fsdp_version": 2,
    "offload_params": False,
    "cpu_ram_efficient_loading": False,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "transformer_layer_cls_to_wrap": "Qwen3MoeDecoderLayer",
    "state_dict_type": "FULL_STATE_DICT",
    "sharding_strategy": "FULL_SHARD",
    "reshard_after_forward": True,
}


def config_of(tmp_path: Path, **keys):
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({**BASE, **keys}, sort_keys=False))
    return load_config(str(path)).config


def sizes(dist) -> tuple[int, int, int, int]:
    return dist.ep_size, dist.fsdp_size, dist.efsdp_size, dist.dp_replicate_size


# -- the mapping -----------------------------------------------------------------------------


def test_launch_maps_to_a_distributed_config(tmp_path):
    pure = config_of(tmp_path, expert_parallel_size=4, plugins=[EP_PLUGIN])
    # pure EP: every rank holds a quarter of the experts and a quarter of the dense weights
    assert sizes(distributed_config(pure, 4)) == (4, 4, 1, 1)
    # more ranks than experts groups: the extra ranks FSDP-shard copies of the experts
    assert sizes(distributed_config(pure, 8)) == (4, 8, 2, 1)
    both = config_of(tmp_path, expert_parallel_size=2, dp_shard_size=2, fsdp_config=FSDP2)
    assert sizes(distributed_config(both, 4)) == (2, 4, 2, 1)
    replicated = config_of(tmp_path, expert_parallel_size=2, dp_replicate_size=2)
    assert sizes(distributed_config(replicated, 8)) == (2, 4, 2, 2)
    offload = config_of(
        tmp_path, expert_parallel_size=2, fsdp_config={**FSDP2, "offload_params": True}
    )
    assert distributed_config(offload, 2).fsdp_cpu_offload is True
    assert distributed_config(both, 4).fsdp_cpu_offload is False


def test_launches_that_do_not_fit_are_named(tmp_path):
    both = config_of(tmp_path, expert_parallel_size=2, dp_shard_size=2, fsdp_config=FSDP2)
    assert launch_problem(both, 4) is None
    assert launch_problem(both, 2) == (
        "expert parallelism does not fit this launch of 2 processes: `expert_parallel_size: 2` "
        "x `dp_shard_size: 2` = 4 processes per replica, but the launch has 2; launch a fitting "
        "number (`accelerate launch --num_processes N`) or change the sizes"
    )
    pure = config_of(tmp_path, expert_parallel_size=4)
    assert "`expert_parallel_size: 4` does not divide the 6 data-parallel" in launch_problem(
        pure, 6
    )
    assert launch_problem(pure, 1).startswith(
        "`expert_parallel_size: 4` splits the experts over 4 processes, and this run is a single "
        "process; launch it with `accelerate launch --num_processes 4"
    )
    assert launch_problem(config_of(tmp_path, expert_parallel_size=1), 1) is None


def test_training_arguments_leave_sharding_to_transformers(tmp_path):
    cfg = config_of(
        tmp_path,
        expert_parallel_size=2,
        dp_shard_size=2,
        fsdp_config=FSDP2,
        output_dir=str(tmp_path / "out"),
        saves_per_epoch=1,
    )
    plan = resolve(cfg, env={"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"})
    args = build_training_args(cfg, plan, False, steps_per_epoch=10)
    # no accelerate FSDP (it would need CUDA and shard again) and no ParallelismConfig
    assert not args.fsdp and args.parallelism_config is None
    # transformers checkpoints no optimizer state for a model sharded at load time
    assert args.save_only_model is True
    plain = config_of(tmp_path, output_dir=str(tmp_path / "out"), saves_per_epoch=1)
    assert build_training_args(plain, resolve(plain, env={}), False).save_only_model is False


def test_model_options_carry_the_distributed_config(tmp_path, moe_dir):
    cfg = config_of(tmp_path, base_model=str(moe_dir), expert_parallel_size=2)
    plan = resolve(cfg, env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    options = with_expert_parallel(ModelOptions.from_config(cfg, plan), cfg, plan)
    assert list(options.tensor_parallel) == ["distributed_config"]
    assert sizes(options.tensor_parallel["distributed_config"]) == (2, 2, 1, 1)
    assert options.device_map is None  # transformers places the shards
    off = config_of(tmp_path, base_model=str(moe_dir))
    assert (
        with_expert_parallel(ModelOptions.from_config(off, plan), off, plan).tensor_parallel == {}
    )


def test_models_transformers_cannot_split_are_refused(tmp_path):
    cfg = config_of(tmp_path, expert_parallel_size=2)
    with pytest.raises(ModelError, match=r"\(LlamaConfig\) has no expert-parallel plan"):
        check_model(LlamaConfig(), cfg)
    with pytest.raises(ModelError, match="has 3 experts per layer, which do not split evenly"):
        check_model(Qwen3MoeConfig(num_experts=3), cfg)
    check_model(Qwen3MoeConfig(num_experts=4), cfg)


# -- validate (CLI) --------------------------------------------------------------------------


def test_validate_accepts_axolotls_expert_parallel_examples(tmp_path):
    common = {
        "base_model": "Qwen/Qwen3-30B-A3B-Instruct-2507",
        "plugins": [EP_PLUGIN],
        "experts_implementation": "grouped_mm",
        "datasets": [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}],
        "bf16": True,
    }
    for name, keys in {
        "fft": {"expert_parallel_size": 4},
        "fsdp": {"expert_parallel_size": 2, "dp_shard_size": 2, "fsdp_config": FSDP2},
        "lora": {"expert_parallel_size": 4, "adapter": "lora", "lora_target_modules": ["q_proj"]},
    }.items():
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump({**common, **keys}))
        proc = cli("validate", str(path))
        assert proc.returncode == 0, proc.stderr
        assert "plugin ExpertParallelPlugin: newtune reads expert_parallel_size" in proc.stderr
        assert "the experts are split over" in proc.stderr


def test_validate_refuses_what_expert_parallelism_cannot_combine_with(tmp_path):
    path = tmp_path / "cfg.yml"
    path.write_text(
        yaml.safe_dump(
            {
                **BASE,
                "expert_parallel_size": 2,
                "tensor_parallel_size": 2,
                "context_parallel_size": 2,
                "fsdp_config": {"fsdp_version": 1},
                "experts_implementation": "eager",
                "load_in_8bit": True,
                "adapter": "lora",
                "lora_target_parameters": ["mlp.experts.gate_up_proj"],
                "resume_from_checkpoint": "ckpt",
            }
        )
    )
    err = error_line(cli("validate", str(path)))
    key = "`expert_parallel_size: 2`"
    for part in (
        f"{key} with `tensor_parallel_size`: EP x TP is not supported",
        f"{key} with `context_parallel_size`: context parallelism is accelerate's",
        f"{key} shards the dense weights with FSDP2; `fsdp_version: 1` is FSDP1",
        f"{key} with `load_in_8bit`: bitsandbytes-quantized weights cannot be sharded",
        f"{key} with `lora_target_parameters`: PEFT's LoRA on parameters",
        f"{key} with `resume_from_checkpoint`: transformers keeps no optimizer state",
    ):
        assert part in err
    assert "experts_implementation: eager" not in err  # eager runs under the dispatch
    path.write_text(yaml.safe_dump({**BASE, "expert_parallel_size": 2, "deepspeed": "zero2"}))
    assert "runs on transformers' DistributedConfig" in error_line(cli("validate", str(path)))
    path.write_text(yaml.safe_dump({**BASE, "expert_parallel_token_capacity": 1024}))
    assert "Axolotl's own DeepEP dispatch (token dropping)" in error_line(
        cli("validate", str(path))
    )


def test_train_refuses_a_single_process_before_any_work(tmp_path, moe_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    out = tmp_path / "out"
    path = tmp_path / "cfg.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(moe_dir),
                "datasets": [{"path": str(data), "type": "alpaca"}],
                "output_dir": str(out),
                "dataset_prepared_path": str(tmp_path / "prepared"),
                "expert_parallel_size": 2,
            }
        )
    )
    err = error_line(cli("train", str(path)))
    assert "splits the experts over 2 processes, and this run is a single process" in err
    assert not (tmp_path / "prepared").exists() and not (out / "model.safetensors").exists()


# -- two CPU ranks (gloo) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory, chat_tok_dir: Path) -> Path:
    """A 2-layer Qwen3-MoE with 4 experts (top-2) and the ChatML tokenizer."""
    tok = AutoTokenizer.from_pretrained(chat_tok_dir)
    folder = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    Qwen3MoeForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


SHARD_SPY = """
import json, os, sys
import newtune.train.run as run
from newtune.cli.train import main
from transformers import AutoModelForCausalLM

spy, checkpoint = sys.argv.pop(1), sys.argv.pop(1)
train = run.NewtuneTrainer.train

def spied_train(self, *args, **kwargs):
    rank = int(os.environ["RANK"])
    start = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()  # not sharded
    model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
    layers = []
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        local = experts.gate_up_proj.to_local()
        mine = start[f"model.layers.{i}.mlp.experts.gate_up_proj"][2 * rank : 2 * rank + 2]
        layers.append({
            "global": list(experts.gate_up_proj.shape),
            "local": list(local.shape),
            "local_down": list(experts.down_proj.to_local().shape),
            "num_experts": experts.num_experts,
            "owns_its_half": bool((local == mine).all()),
            "q_proj_local": list(layer.self_attn.q_proj.weight.to_local().shape),
        })
    result = train(self, *args, **kwargs)
    with open(os.path.join(spy, f"rank-{rank}.json"), "w") as f:
        json.dump({
            "layers": layers,
            "parallelism_config": repr(self.args.parallelism_config),
            "accelerate_fsdp": self.is_fsdp_enabled,
            "save_only_model": self.args.save_only_model,
            "steps": self.state.global_step,
        }, f)
    return result

run.NewtuneTrainer.train = spied_train
main()
"""


def run_pair(
    tmp_path: Path, moe_dir: Path, ep_keys: dict | None = None, **keys
) -> tuple[Path, Path, Path]:
    """Train 2 steps with expert_parallel_size 2 on two CPU ranks (micro_batch_size 1 each)
    and on one process (micro_batch_size 2): the same 2 rows per step. Returns both output
    folders and the spy folder. `ep_keys` go to the expert-parallel run only."""
    rows = [
        {"instruction": f"Add {a} and {b}.", "output": f"{a + b}."}
        for a in range(2)
        for b in range(4)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)  # every row has the same number of tokens
    base = {
        "base_model": str(moe_dir),
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "max_steps": 2,
        "learning_rate": 0.01,
        "seed": 7,
        "sequence_len": 64,
        **keys,
    }
    ep, one = tmp_path / "ep", tmp_path / "one"
    for folder, extra in (
        (
            ep,
            {
                "micro_batch_size": 1,
                "expert_parallel_size": 2,
                "plugins": [EP_PLUGIN],
                **(ep_keys or {}),
            },
        ),
        (one, {"micro_batch_size": 2}),
    ):
        folder.mkdir()
        cfg = {**base, **extra, "output_dir": str(folder / "out")}
        cfg["dataset_prepared_path"] = str(folder / "prepared")
        (folder / "cfg.yml").write_text(yaml.safe_dump(cfg))
    spy = tmp_path / "spy"
    spy.mkdir()
    script = tmp_path / "spy.py"
    script.write_text(SHARD_SPY)
    proc = launch(
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(script), str(spy), str(moe_dir),
        str(ep / "cfg.yml"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli("train", str(one / "cfg.yml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ep / "out", one / "out", spy


def losses(out: Path) -> list[float]:
    return [e["loss"] for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]


def check_shards(spy: Path, q_rows: int) -> None:
    """Each rank holds 2 of the 4 experts, its own half, and half of the dense weights."""
    for rank in (0, 1):
        seen = json.loads((spy / f"rank-{rank}.json").read_text())
        assert (
            seen["layers"]
            == [
                {
                    "global": [4, 32, 32],
                    "local": [2, 32, 32],
                    "local_down": [2, 32, 16],
                    "num_experts": 2,
                    "owns_its_half": True,
                    "q_proj_local": [q_rows // 2, 32],
                }
            ]
            * 2
        )
        assert seen["parallelism_config"] == "None" and seen["accelerate_fsdp"] is False
        assert seen["save_only_model"] is True and seen["steps"] == 2


@pytest.mark.slow
def test_full_fine_tune_splits_the_experts_and_trains_as_one_process(tmp_path, moe_dir):
    ep, one, spy = run_pair(
        tmp_path,
        moe_dir,
        ep_keys={"fsdp_config": FSDP2, "saves_per_epoch": 2},  # 4 steps an epoch
        gradient_checkpointing=True,
    )
    check_shards(spy, q_rows=32)
    assert losses(ep) == pytest.approx(losses(one), rel=1e-5) and len(losses(ep)) == 2
    # rank 0 saved the whole model, gathered from the expert and FSDP shards
    files = [load_file(p / "model.safetensors") for p in (ep, one, moe_dir)]
    assert sorted(files[0]) == sorted(files[1]) == sorted(files[2])  # the checkpoint's layout
    trained, alone, start = (
        Qwen3MoeForCausalLM.from_pretrained(p).state_dict() for p in (ep, one, moe_dir)
    )
    for name, tensor in trained.items():
        assert tensor.shape == start[name].shape
        torch.testing.assert_close(tensor, alone[name], atol=1e-4, rtol=1e-4)
    expert = "model.layers.0.mlp.experts.gate_up_proj"
    assert (trained[expert] - start[expert]).abs().max() > 1e-3  # both ranks' experts trained
    saved = json.loads((ep / "config.json").read_text())
    assert saved == json.loads((one / "config.json").read_text())  # a plain model's config
    assert "distributed_config" not in saved and saved["num_local_experts"] == 4
    # the step-2 checkpoint: the whole model, no optimizer state (transformers keeps none)
    checkpoint = ep / "checkpoint-2"
    assert sorted(load_file(checkpoint / "model.safetensors")) == sorted(files[2])
    assert (
        not list(checkpoint.glob("optimizer*"))
        and "distributed" not in (checkpoint / "config.json").read_text()
    )


@pytest.mark.slow
def test_lora_on_the_attention_of_an_expert_parallel_model(tmp_path, moe_dir):
    lora = {
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
    }
    ep, one, spy = run_pair(tmp_path, moe_dir, **lora)
    check_shards(spy, q_rows=32)
    assert losses(ep) == pytest.approx(losses(one), rel=1e-5)
    trained, alone = (load_file(p / "adapter_model.safetensors") for p in (ep, one))
    assert sorted(trained) == sorted(alone) and len(trained) == 8
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, alone[name], atol=1e-5, rtol=1e-4)
    assert not (ep / "model.safetensors").exists()


@pytest.mark.slow
def test_a_model_without_experts_is_refused_on_the_ranks(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}] * 4)
    path = tmp_path / "cfg.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(model_dir),  # a dense Llama
                "datasets": [{"path": str(data), "type": "alpaca"}],
                "output_dir": str(tmp_path / "out"),
                "dataset_prepared_path": str(tmp_path / "prepared"),
                "expert_parallel_size": 2,
                "max_steps": 1,
            }
        )
    )
    proc = launch(
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "newtune.cli.train", str(path),
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("newtune: error: ")]
    assert len(errors) == 2, proc.stderr[-3000:]  # one per rank, each one line
    assert all(
        "`expert_parallel_size: 2`: " in e and "(LlamaConfig) has no expert-parallel plan" in e
        for e in errors
    )
    assert "newtune/" not in proc.stderr  # no traceback through newtune's code
    assert not (tmp_path / "out" / "model.safetensors").exists()
