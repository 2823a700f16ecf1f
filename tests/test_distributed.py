"""DDP, DeepSpeed ZeRO and FSDP: config mapping, launchers, and 2-rank CPU runs (gloo)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import textwrap
from pathlib import Path

import fire
import pytest
import torch
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file
from test_cli import cli, make_config
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.integrations.deepspeed import (
    HfTrainerDeepSpeedConfig,
    unset_hf_deepspeed_config,
)

from newtune.cli import train as train_cli
from newtune.config.load import load_config
from newtune.config.resolve import resolve
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError
from newtune.train.args import build_training_args
from newtune.train.distributed import (
    complete_deepspeed_config,
    distributed_kwargs,
    find_deepspeed_file,
    fsdp_settings,
    load_deepspeed_config,
    shipped_deepspeed_configs,
)

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED,
    reason="deepspeed is not installed (pip install 'newtune[deepspeed]'; on a CPU machine "
    "`DS_BUILD_OPS=0 pip install deepspeed`)",
)
SHIPPED = [
    "zero1.json",
    "zero2.json",
    "zero3.json",
    "zero3_bf16.json",
    "zero3_bf16_cpuoffload_params.json",
    "zero3_bf16_cpuoffload_all.json",
]
ROWS = [  # 12 distinct rows: which rank saw which row is visible in the tokens
    {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}."}
    for a in range(3)
    for b in range(4)
]


def config(**keys) -> NewtuneConfig:
    return NewtuneConfig(base_model="m", datasets=[{"path": "d.jsonl", "type": "alpaca"}], **keys)


def cpu_plan(cfg: NewtuneConfig, world_size: int = 1):
    return resolve(cfg, env={"WORLD_SIZE": str(world_size)}, probe=lambda: ("cpu", False))


def cuda_plan(cfg: NewtuneConfig):
    return resolve(cfg, env={}, probe=lambda: ("cuda", True))


def autos(tree, path: str = "") -> list[str]:
    """Every key path whose value is still "auto"."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in autos(v, f"{path}.{k}".lstrip("."))]
    return [path] if tree == "auto" else []


# --- DeepSpeed config files -------------------------------------------------------------------


def test_the_six_configs_ship_inside_the_package_and_at_the_repo_root():
    assert shipped_deepspeed_configs() == sorted(SHIPPED)
    root = Path(__file__).parents[1] / "deepspeed_configs"
    for name in SHIPPED:
        packaged = find_deepspeed_file(f"deepspeed_configs/{name}")
        assert json.loads(packaged.read_text()) == json.loads((root / name).read_text())
        assert find_deepspeed_file(name.removesuffix(".json")) == packaged
    stages = {n: load_deepspeed_config(n)["zero_optimization"]["stage"] for n in SHIPPED}
    assert stages == {n: int(n[4]) for n in SHIPPED}
    offload = load_deepspeed_config("zero3_bf16_cpuoffload_all")["zero_optimization"]
    assert offload["offload_param"]["device"] == offload["offload_optimizer"]["device"] == "cpu"


def test_a_path_resolves_from_the_working_dir_then_the_config_dir(tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    mine = tmp_path / "cfgs" / "ds.json"
    mine.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    monkeypatch.chdir(tmp_path)
    assert find_deepspeed_file("cfgs/ds.json") == mine
    assert find_deepspeed_file("ds.json", config_dir=tmp_path / "cfgs") == mine
    assert find_deepspeed_file(str(mine)) == mine
    with pytest.raises(ConfigError, match=r"`deepspeed: nope.json` names no file \(tried "):
        find_deepspeed_file("nope.json", config_dir=tmp_path / "cfgs")
    (tmp_path / "bad.json").write_text("{'stage': 2}")
    with pytest.raises(ConfigError, match=r"bad.json is not valid JSON \(line 1"):
        load_deepspeed_config("bad.json")


@needs_deepspeed
@pytest.mark.parametrize("name", [n for n in SHIPPED if "bf16" not in n])
def test_every_auto_value_is_filled(tmp_path, model_dir, name):
    """newtune + transformers' HfTrainerDeepSpeedConfig leave no "auto" in a shipped config."""
    cfg = config(
        output_dir=str(tmp_path),
        micro_batch_size=3,
        gradient_accumulation_steps=5,
        max_grad_norm=0.7,
        learning_rate=3e-4,
        deepspeed=f"deepspeed_configs/{name}",
    )
    plan = cpu_plan(cfg, world_size=2)
    ds = distributed_kwargs(cfg, plan)["deepspeed"]
    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    for key, value in build_training_args(cfg, cpu_plan(cfg), False).to_dict().items():
        if key in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm"):
            setattr(plain, key, value)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    hf = HfTrainerDeepSpeedConfig(ds)  # registers itself globally (zero.Init in from_pretrained)
    try:
        hf.trainer_config_process(plain)
        hf.trainer_config_finalize(plain, model, 100)
    finally:
        unset_hf_deepspeed_config()
    filled = hf.config
    assert autos(filled) == []
    assert filled["train_micro_batch_size_per_gpu"] == 3
    assert filled["gradient_accumulation_steps"] == 5
    assert filled["gradient_clipping"] == 0.7
    assert filled["bf16"]["enabled"] is False and filled["fp16"]["enabled"] is False
    if filled["zero_optimization"]["stage"] == 3:
        assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert filled["zero_optimization"]["stage3_param_persistence_threshold"] == 320


@needs_deepspeed
def test_an_inline_config_without_batch_sizes_gets_them_from_the_config(tmp_path, model_dir):
    """Regression: `deepspeed: {zero_optimization: ...}` without the batch keys reached
    DeepSpeed's assertion ("train_batch_size or train_micro_batch_size_per_gpu") at train."""
    cfg = config(
        output_dir=str(tmp_path),
        micro_batch_size=3,
        gradient_accumulation_steps=5,
        deepspeed={"zero_optimization": {"stage": 2}},
    )
    ds = distributed_kwargs(cfg, cpu_plan(cfg, world_size=2))["deepspeed"]
    assert {k: ds[k] for k in ("train_micro_batch_size_per_gpu", "train_batch_size")} == {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
    }
    plain = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=5,
    )
    hf = HfTrainerDeepSpeedConfig(ds)
    try:
        hf.trainer_config_process(plain)
    finally:
        unset_hf_deepspeed_config()
    assert hf.config["train_micro_batch_size_per_gpu"] == 3
    assert hf.config["gradient_accumulation_steps"] == 5
    assert hf.config["train_batch_size"] == 3 * 5 * plain.world_size


def test_fixed_values_that_contradict_the_config_are_config_errors():
    cfg = config(deepspeed="deepspeed_configs/zero3_bf16.json")
    with pytest.raises(ConfigError, match=r"sets `bf16.enabled: true` but the config's `bf16`"):
        distributed_kwargs(cfg, cpu_plan(cfg))
    ds = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}
    cfg = config(deepspeed=ds, micro_batch_size=2)
    with pytest.raises(ConfigError, match=r"or set `micro_batch_size: 4`"):
        distributed_kwargs(cfg, cpu_plan(cfg))
    cfg = config(deepspeed={"zero_optimization": {"stage": 3}}, bf16=True)
    bf16 = distributed_kwargs(cfg, cuda_plan(cfg))["deepspeed"]
    assert bf16["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    ds = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}
    with pytest.raises(ConfigError, match=r"ZeRO-3 must gather them: set it to true"):
        distributed_kwargs(config(deepspeed=ds), cpu_plan(config()))


def test_an_offloaded_optimizer_gets_one_deepspeed_can_step_on_the_cpu():
    ds = load_deepspeed_config("zero3_bf16_cpuoffload_all")
    cfg = config(bf16=True)
    adamw = complete_deepspeed_config(ds, cfg, cuda_plan(cfg), "x")
    assert adamw["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    }
    cfg = config(bf16=True, optimizer="sgd")
    sgd = complete_deepspeed_config(ds, cfg, cuda_plan(cfg), "x")
    assert "optimizer" not in sgd and sgd["zero_force_ds_cpu_optimizer"] is False
    params_only = load_deepspeed_config("zero3_bf16_cpuoffload_params")
    untouched = complete_deepspeed_config(params_only, cfg, cuda_plan(cfg), "x")
    assert "optimizer" not in untouched and "zero_force_ds_cpu_optimizer" not in untouched


def test_deepspeed_and_fsdp_together_is_an_error_naming_both(tmp_path):
    path = tmp_path / "c.yml"
    base = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
    path.write_text(yaml.safe_dump({**base, "deepspeed": "zero2", "fsdp": ["full_shard"]}))
    with pytest.raises(ConfigError, match=r"`deepspeed` and `fsdp` are both set; choose"):
        load_config(str(path))
    path.write_text(yaml.safe_dump({**base, "fsdp_version": 2}))
    with pytest.raises(ConfigError, match=r"`fsdp_version` is set but FSDP is off"):
        load_config(str(path))


# --- FSDP ---------------------------------------------------------------------------------


def test_axolotl_fsdp1_spelling_maps_onto_transformers():
    cfg = config(
        fsdp=["full_shard", "auto_wrap", "offload"],
        fsdp_config={
            "fsdp_version": 1,
            "fsdp_offload_params": True,
            "fsdp_state_dict_type": "sharded_state_dict",
            "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "fsdp_backward_prefetch": "backward_pre",
            "fsdp_use_orig_params": False,
        },
    )
    settings = fsdp_settings(cfg)
    assert settings == {
        "version": 1,
        "cpu_offload": True,
        "state_dict_type": "SHARDED_STATE_DICT",
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "backward_prefetch": "BACKWARD_PRE",
        "use_orig_params": False,
        "reshard_after_forward": "full_shard",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    }
    kwargs = distributed_kwargs(cfg, cuda_plan(cfg))
    args = TrainingArguments(output_dir="unused", fsdp=kwargs["fsdp"], fsdp_config=settings)
    assert args.fsdp_plugin_args == {
        "fsdp_version": 1,
        "cpu_offload": True,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_cls_names_to_wrap": "LlamaDecoderLayer",
        "cpu_ram_efficient_loading": False,
        "state_dict_type": "SHARDED_STATE_DICT",
        "reshard_after_forward": "full_shard",
        "forward_prefetch": False,
        "backward_prefetch": "BACKWARD_PRE",
        "use_orig_params": False,
        "sync_module_states": True,
    }


def test_fsdp2_unprefixed_keys_map_onto_the_fsdp_plugin_arguments():
    cfg = config(
        fsdp_version=2,
        fsdp_config={
            "offload_params": False,
            "state_dict_type": "FULL_STATE_DICT",
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": "Qwen3DecoderLayer",
            "reshard_after_forward": True,
            "activation_checkpointing": True,
            "cpu_ram_efficient_loading": True,
        },
    )
    args = TrainingArguments(output_dir="unused", **distributed_kwargs(cfg, cuda_plan(cfg)))
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_cls_names_to_wrap": "Qwen3DecoderLayer",
        "cpu_ram_efficient_loading": True,
        "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": True,
        "reshard_after_forward": True,
    }
    shard_grad_op = fsdp_settings(config(fsdp="shard_grad_op auto_wrap"))
    assert shard_grad_op == {
        "version": 2,
        "reshard_after_forward": False,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT",
    }
    with pytest.raises(ConfigError, match=r"`hybrid_shard` exists only in FSDP1"):
        fsdp_settings(config(fsdp=["hybrid_shard"]))


def test_fsdp_on_a_cpu_is_an_error_not_a_silent_ddp_run():
    """accelerate runs CPU processes as MULTI_CPU (DDP) whatever the FSDP settings say."""
    cfg = config(fsdp=["full_shard"])
    with pytest.raises(ConfigError, match=r"need CUDA GPUs; this run's device is cpu"):
        distributed_kwargs(cfg, cpu_plan(cfg))


def test_train_refuses_bad_distributed_settings_before_preparing_data(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "a.jsonl", ROWS)
    cfg = make_config(tmp_path, model_dir, data, "alpaca", fsdp=["full_shard"])
    proc = cli("-m", "newtune.cli.train", str(cfg))
    assert proc.returncode == 2 and "need CUDA GPUs; this run's device is cpu" in proc.stderr
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"fsdp": ["full_shard", "autowrap"]}, r"unknown FSDP option `autowrap` \(did you mean"),
        ({"fsdp_config": {"fsdp_ofload_params": True}}, r"did you mean `offload_params`"),
        ({"fsdp_config": {"state_dict_type": "FULL"}}, r"is not one of FULL_STATE_DICT"),
        ({"fsdp_config": {"offload_params": 1, "cpu_offload": 1}}, r"set the same FSDP option"),
    ],
)
def test_bad_fsdp_values_are_config_errors(tmp_path, keys, message):
    path = tmp_path / "c.yml"
    base = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
    path.write_text(yaml.safe_dump({**base, **keys}))
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_ddp_keys_reach_training_arguments(tmp_path):
    cfg = config(
        output_dir=str(tmp_path),
        ddp_timeout=7200,
        ddp_bucket_cap_mb=50,
        ddp_broadcast_buffers=False,
        ddp_find_unused_parameters=True,
    )
    args = build_training_args(cfg, cpu_plan(cfg), False)
    assert (args.ddp_timeout, args.ddp_bucket_cap_mb) == (7200, 50)
    assert (args.ddp_broadcast_buffers, args.ddp_find_unused_parameters) == (False, True)
    default = build_training_args(config(output_dir=str(tmp_path)), cpu_plan(cfg), False)
    assert default.ddp_timeout == 1800 and default.ddp_find_unused_parameters is None


# --- launchers ----------------------------------------------------------------------------


def test_launch_commands_run_this_module_under_each_launcher():
    args = ["cfg.yml", "--learning_rate=0.001"]
    py = sys.executable
    assert train_cli.launch_command("accelerate", ["--num_processes", "2"], args) == [
        py, "-m", "accelerate.commands.launch", "--num_processes", "2",
        "-m", "newtune.cli.train", "cfg.yml", "--learning_rate=0.001",
    ]  # fmt: skip
    assert train_cli.launch_command("torchrun", ["--nproc_per_node", "8"], args) == [
        py, "-m", "torch.distributed.run", "--nproc_per_node", "8",
        "-m", "newtune.cli.train", "cfg.yml", "--learning_rate=0.001",
    ]  # fmt: skip
    assert train_cli.launch_command("python", [], args) == [
        py, "-m", "newtune.cli.train", "cfg.yml", "--learning_rate=0.001"
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"`--launcher srun` is not a launcher newtune knows"):
        train_cli.launch_command("srun", [], args)


def test_child_arguments_parse_back_to_the_same_overrides():
    overrides = {
        "learning_rate": 0.001,
        "output_dir": "out dir/with 'quotes'",
        "lora_target_modules": ["q_proj", "v_proj"],
        "bf16": "auto",
        "val_set_size": 0,
        "sample_packing": True,
        "datasets": [{"path": "a.jsonl", "type": "alpaca"}],
    }
    argv = train_cli.child_args("cfg.yml", overrides, debug=True)
    seen = {}

    def capture(config, debug=False, **kw):
        seen.update(config=config, debug=debug, **kw)

    fire.Fire(capture, command=argv)
    assert seen == {"config": "cfg.yml", "debug": True, **overrides}


def test_launcher_words_without_a_launcher_are_an_error(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "a.jsonl", ROWS)
    cfg = make_config(tmp_path, model_dir, data, "alpaca")
    proc = cli("-m", "newtune.cli.train", str(cfg), "--", "--num_processes", "2")
    assert proc.returncode == 2, proc.stderr
    assert "newtune: error: `-- --num_processes 2` passes arguments to a launcher; add" in (
        proc.stderr
    )
    proc = cli("-m", "newtune.cli.train", str(cfg), "--launcher", "mpirun")
    assert "`--launcher mpirun` is not a launcher newtune knows" in proc.stderr


@pytest.mark.slow
def test_launcher_python_reexecutes_with_its_arguments(tmp_path, model_dir):
    """`newtune train cfg --launcher python -- -X importtime` replaces the process with
    `python -X importtime -m newtune.cli.train cfg` (overrides kept). The zero tests below
    cover `python -m newtune.cli.train --launcher accelerate -- ...`."""
    data = write_jsonl(tmp_path / "a.jsonl", ROWS)
    cfg = make_config(tmp_path, model_dir, data, "alpaca", max_steps=1)
    proc = cli(
        "-m", "newtune.cli.main", "train", str(cfg), "--launcher=python",
        "--learning_rate=0.002", "--", "-X", "importtime",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # only the re-executed interpreter got -X importtime (the parent never imports torch)
    assert re.search(r"^import time: .*\|\s+torch$", proc.stderr, re.MULTILINE)
    saved = yaml.safe_load((tmp_path / "out" / "newtune_config.yml").read_text())
    assert saved["learning_rate"] == 0.002


# --- 2-rank CPU runs (gloo) ---------------------------------------------------------------

SPY = textwrap.dedent(
    """
    # Runs newtune.cli.train with spies: which rows each rank trained on, how often the data
    # was prepared, and each rank's final weights.
    import json, os, sys
    import torch
    import newtune.data.prepare as prepare
    import newtune.train.run as run
    from newtune.cli.train import main

    rank, spy = os.environ["RANK"], sys.argv.pop(1)
    build = prepare._build

    def counted_build(*args, **kwargs):
        with open(os.path.join(spy, "builds"), "a") as f:
            f.write(rank + "\\n")
        return build(*args, **kwargs)

    prepare._build = counted_build
    step, train = run.NewtuneTrainer.training_step, run.NewtuneTrainer.train
    rows, steps = [], [0]

    def spied_step(self, model, inputs, *args, **kwargs):
        rows.extend(r[m.bool()].tolist() for r, m in zip(inputs["input_ids"], inputs["attention_mask"]))
        steps[0] += 1
        return step(self, model, inputs, *args, **kwargs)

    def spied_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        weights = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        torch.save(weights, os.path.join(spy, f"weights-{rank}.pt"))
        with open(os.path.join(spy, f"rows-{rank}.json"), "w") as f:
            json.dump({"rows": rows, "steps": steps[0]}, f)
        return result

    run.NewtuneTrainer.training_step, run.NewtuneTrainer.train = spied_step, spied_train
    main()
    """
)


@pytest.mark.slow
def test_ddp_two_ranks_share_the_data_and_end_with_identical_weights(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "a.jsonl", ROWS)  # 12 rows = 3 steps x 2 rows x 2 ranks
    cfg = make_config(tmp_path, model_dir, data, "alpaca", adapter="lora", lora_r=2)
    spy_dir = tmp_path / "spy"
    spy_dir.mkdir()
    script = tmp_path / "spy.py"
    script.write_text(SPY)
    proc = cli(
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(script), str(spy_dir), str(cfg),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # prepared once, by whichever rank took the cache lock first; the other reused it
    assert len((spy_dir / "builds").read_text().split()) == 1
    seen = [json.loads((spy_dir / f"rows-{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["steps"] == seen[1]["steps"] == 3
    rows0, rows1 = ({tuple(r) for r in s["rows"]} for s in seen)
    assert len(seen[0]["rows"]) == len(seen[1]["rows"]) == 6
    assert not rows0 & rows1 and len(rows0 | rows1) == 12  # each row once, on one rank
    w0, w1 = (torch.load(spy_dir / f"weights-{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys() and w0
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    out = tmp_path / "out"
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]  # one finished save
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == len(w0)
    for name, tensor in saved.items():
        live = name.replace(".weight", ".default.weight")
        assert torch.equal(tensor, w0[live]), name


def _lora_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return model.eval()(ids).logits


def _ds_run(tmp_path: Path, model_dir: Path, ds: str | dict, **keys) -> Path:
    data = write_jsonl(tmp_path / "a.jsonl", ROWS)
    cfg = make_config(tmp_path, model_dir, data, "alpaca", deepspeed=ds, **keys)
    proc = cli(
        "-m", "newtune.cli.train", str(cfg), "--launcher", "accelerate",
        "--", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", "0",
        "--mixed_precision", "no", "--dynamo_backend", "no",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert history[-1]["step"] == 3 and history[-1]["epoch"] == pytest.approx(1.0)
    return cfg


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_lora_on_two_cpu_ranks_saves_an_adapter_that_merges(tmp_path, model_dir, stage):
    ds: str | dict = f"deepspeed_configs/zero{stage}.json"
    if stage == 3:  # inline; partition even the tiny LoRA tensors (else each rank keeps them)
        ds = load_deepspeed_config("zero3")
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    cfg = _ds_run(tmp_path, model_dir, ds, adapter="lora")
    out = tmp_path / "out"
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # gathered, not shards
    assert any("lora_B" in n and t.abs().sum() > 0 for n, t in adapter.items())  # it trained
    proc = cli("-m", "newtune.cli.merge_lora", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
    torch.testing.assert_close(merged, _lora_logits(model_dir, out, ids), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@needs_deepspeed
def test_zero3_full_finetune_gathers_whole_weights_on_save(tmp_path, model_dir):
    _ds_run(tmp_path, model_dir, "zero3")
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert saved.keys() == base.keys()
    assert all(saved[k].shape == base[k].shape for k in base)  # whole tensors, not shards
    changed = [k for k in base if not torch.equal(saved[k], base[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "lm_head.weight" in changed
