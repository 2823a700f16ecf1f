"""Axolotl keys read as Axolotl reads them (issue 16): each reaches the object it configures, or
is refused by name with the reason; a config's validity does not depend on this machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl
from peft import get_peft_model
from test_trust_config import cli, error_line
from transformers import LlamaForCausalLM

from newtune.config.load import load_config
from newtune.config.machine import check_machine, machine_problems
from newtune.config.resolve import resolve
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError
from newtune.models.adapters import lora_config, lora_targets
from newtune.models.load import ModelOptions, load_model
from newtune.train.args import build_training_args, schedule_for

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


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


def args_of(cfg: NewtuneConfig, has_eval: bool = True):
    return build_training_args(cfg, resolve(cfg, env={}), has_eval, steps_per_epoch=10)


# -- 1. a config is valid independent of the machine that validates it ------------------------


MACHINE_KEYS = {
    "flash_attention": True,
    "liger_rms_norm": True,
    "optimizer": "adamw_torch_8bit",
    "output_dir": "out",
}


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) for m in ("flash_attn", "liger_kernel", "torchao")),
    reason="needs a machine without flash-attn, liger-kernel and torchao",
)
def test_validate_warns_and_train_refuses_at_start_with_the_pip_command(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    cfg = write(
        tmp_path,
        **{**MACHINE_KEYS, "output_dir": str(tmp_path / "out")},
        dataset_prepared_path=str(tmp_path / "prepared"),
    )
    text = Path(cfg).read_text().replace("d.jsonl", str(data))
    Path(cfg).write_text(text)
    proc = cli("validate", cfg)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for line in (
        "warning: `flash_attention: true` (`attn_implementation: flash_attention_2`) needs the "
        "flash-attn package, which is not installed here; the machine that trains needs it "
        "(`pip install 'newtune[flash-attn]'` or `pip install flash-attn --no-build-isolation`).",
        "warning: `liger_rms_norm` needs liger-kernel, which is not installed here; the machine "
        "that trains needs it (`pip install 'newtune[liger]'` or `pip install liger-kernel`).",
        "warning: `optimizer: adamw_torch_8bit` needs the torchao package, which is not "
        "installed here; the machine that trains needs it (`pip install torchao`).",
    ):
        assert line in proc.stderr
    err = error_line(cli("train", cfg))
    assert (
        "newtune cannot train this config here: `attn_implementation: flash_attention_2` needs "
        "the flash-attn package, which is not installed; run `pip install 'newtune[flash-attn]'`"
        " or `pip install flash-attn --no-build-isolation`, or use `attn_implementation: sdpa`"
    ) in err
    assert (
        "`optimizer: adamw_torch_8bit` needs the torchao package, which is not installed; run "
        "`pip install torchao`, or choose another optimizer (adamw_torch)"
    ) in err
    assert (
        "`liger_rms_norm` needs CUDA (liger-kernel's kernels are Triton GPU kernels), and this "
        "machine trains on cpu; train on a CUDA GPU, or remove the liger_* keys"
    ) in err
    assert "The config itself is valid (`newtune validate` accepts it)." in err
    # refused at start: no data prepared, no output folder
    assert not (tmp_path / "out").exists() and not (tmp_path / "prepared").exists()


def _installed_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    fake = {"flash_attn", "liger_kernel", "torchao", "deepspeed", "bitsandbytes"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n in fake else real(n, *a)
    )


def test_machine_problems_are_cuda_and_launch_checks_when_packages_exist(monkeypatch):
    _installed_everywhere(monkeypatch)
    keys = {**BASE, "attn_implementation": "flash_attention_2", "liger_rope": True}
    cfg = NewtuneConfig(**keys, optimizer="adamw_torch_4bit", deepspeed={"zero_optimization": {}})
    assert machine_problems(cfg, device="cuda", world_size=1) == []
    assert machine_problems(cfg, device="cpu", world_size=1) == [
        "`attn_implementation: flash_attention_2` needs CUDA (flash-attn's kernels are CUDA "
        "kernels), and this machine trains on cpu; train on a CUDA GPU, or use "
        "`attn_implementation: sdpa`",
        "`liger_rope` needs CUDA (liger-kernel's kernels are Triton GPU kernels), and this "
        "machine trains on cpu; train on a CUDA GPU, or remove the liger_* keys",
    ]
    one = NewtuneConfig(**BASE, ddp=True)
    assert machine_problems(one, device="cpu", world_size=1) == [
        "`ddp: true`, but this run is one process; launch it on several (`accelerate launch` "
        "or `torchrun --nproc_per_node N`), or remove `ddp`"
    ]
    assert machine_problems(one, device="cpu", world_size=2) == []
    off = NewtuneConfig(**BASE, ddp=False)
    assert machine_problems(off, device="cpu", world_size=1) == []
    assert (
        "`ddp: false`, but this run was launched on 2 processes"
        in machine_problems(off, device="cpu", world_size=2)[0]
    )
    with pytest.raises(ConfigError, match="^newtune cannot train this config here: `attn_"):
        check_machine(cfg, device="cpu")


def test_validate_warnings_name_deepspeed_and_bitsandbytes_when_missing(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    gone = {"deepspeed", "bitsandbytes"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n in gone else real(n, *a)
    )
    notes = loaded(
        tmp_path, deepspeed={"zero_optimization": {"stage": 2}}, optimizer="paged_adamw_8bit"
    ).notes
    assert notes == [
        "warning: `optimizer: paged_adamw_8bit` needs the bitsandbytes package, which is not "
        "installed here; the machine that trains needs it (`pip install bitsandbytes`).",
        "warning: `deepspeed` needs the deepspeed package, which is not installed here; the "
        "machine that trains needs it (`pip install 'newtune[deepspeed]'`).",
    ]


# -- 2. lora_target_modules: a regex string; a list joined with lora_target_linear -----------


def test_regex_target_reaches_peft_unchanged_and_selects_full_names(tmp_path, model_dir):
    regex = r"model.layers.[\d]+.self_attn.(q|v)_proj"
    cfg = loaded(tmp_path, adapter="lora", lora_target_modules=regex).config
    lora = lora_config(cfg)
    assert lora.target_modules == regex  # a str: peft full-matches it
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir), lora)
    adapted = sorted(
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and n.endswith("_proj")
    )
    assert adapted == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
    assert "modules whose full name matches the regex" in resolve(cfg, env={}).adapter


def test_target_list_with_target_linear_is_the_union(tmp_path, model_dir):
    model = LlamaForCausalLM.from_pretrained(model_dir)
    cfg = loaded(
        tmp_path, adapter="lora", lora_target_linear=True, lora_target_modules=["embed_tokens"]
    ).config
    assert lora_targets(cfg, model) == sorted(["embed_tokens", *LINEAR])
    assert lora_config(cfg, model).target_modules == {"embed_tokens", *LINEAR}
    plain = loaded(tmp_path, adapter="lora", lora_target_linear=True).config
    assert lora_config(plain, model).target_modules == "all-linear"


def test_regex_target_with_target_linear_is_refused_with_the_alternative(tmp_path):
    msg = error_of(
        tmp_path, adapter="lora", lora_target_linear=True, lora_target_modules="model.*_proj"
    )
    assert (
        "`lora_target_modules` is a regex string and `lora_target_linear: true` is set; Axolotl "
        "would read the regex as one literal module name (matching nothing) and adapt only the "
        "linear layers. Keep `lora_target_linear: true` alone (every linear layer), or the "
        "regex alone (matched against full module names), or give a list of names"
    ) in msg
    bad = error_of(tmp_path, adapter="lora", lora_target_modules="model.(q")
    assert "`lora_target_modules` (" in bad and "'model.(q' is not a valid regex" in bad


# -- 3. keys read as Axolotl reads them -------------------------------------------------------


def test_evals_per_epoch_zero_means_no_evaluation_during_training(tmp_path):
    result = loaded(tmp_path, evals_per_epoch=0, val_set_size=0.1)
    assert result.notes == ["`evals_per_epoch: 0`: no evaluation during training"]
    args = args_of(result.config)
    assert (args.eval_strategy.value, args.eval_steps) == ("no", None)
    assert args_of(loaded(tmp_path, val_set_size=0.1).config).eval_strategy.value == "epoch"


def test_eval_strategy_and_its_legacy_spelling_reach_training_arguments(tmp_path):
    cfg = loaded(tmp_path, eval_strategy="no", val_set_size=0.1).config
    assert args_of(cfg).eval_strategy.value == "no"
    legacy = loaded(tmp_path, evaluation_strategy="epoch", val_set_size=0.1, evals_per_epoch=None)
    assert args_of(legacy.config).eval_strategy.value == "epoch"
    assert legacy.notes[0] == (
        "`evaluation_strategy` is deprecated; read as `eval_strategy: epoch` (write that instead)."
    )
    assert "`eval_strategy: no` and `eval_steps` are both set" in error_of(
        tmp_path, eval_strategy="no", eval_steps=5, val_set_size=0.1
    )
    assert "`eval_strategy: epoch` evaluates during training, but there is no eval split" in (
        error_of(tmp_path, eval_strategy="epoch")
    )


def test_cosine_constant_lr_ratio_zero_is_unset(tmp_path):
    cfg = loaded(tmp_path, cosine_constant_lr_ratio=0, cosine_min_lr_ratio=0.1).config
    assert cfg.cosine_constant_lr_ratio is None and schedule_for(cfg) is None
    assert args_of(cfg).lr_scheduler_type.value == "cosine_with_min_lr"


def test_warmup_steps_fraction_is_a_ratio_with_a_note(tmp_path):
    result = loaded(tmp_path, warmup_steps=0.1)
    assert result.notes == [
        "`warmup_steps: 0.1` is a fraction: read as warmup over 10% of the steps, i.e. "
        "`warmup_ratio: 0.1` (write that; Axolotl refuses a fraction here)"
    ]
    args = args_of(result.config)
    assert args.warmup_steps == 0.1 and args.get_warmup_steps(200) == 20
    assert args_of(loaded(tmp_path, warmup_steps=12.0).config).get_warmup_steps(200) == 12
    assert "`warmup_steps: 1.5` is neither a whole number of steps nor a fraction below 1" in (
        error_of(tmp_path, warmup_steps=1.5)
    )


def test_tokens_as_a_mapping_points_at_special_tokens(tmp_path):
    path = write(tmp_path, tokens={"bos_token": "<s>"})
    err = error_line(cli("validate", path))
    assert (
        f"`tokens` ({path}, line 5): Value error, `tokens` is the list of tokens to add to the "
        "vocabulary (e.g. ['<a>', '<b>']); a mapping of token roles (bos_token, eos_token, "
        "pad_token, ...) is `special_tokens:`, so move it there (Axolotl refuses a mapping here "
        "too)"
    ) in err


def test_float16_loads_float16_weights_without_mixed_precision(tmp_path, model_dir):
    result = loaded(tmp_path, float16=True, fp16=False)
    assert result.notes == [
        "`float16: true`: the weights are loaded in float16 and trained without mixed "
        "precision (no loss scaling), as in Axolotl; `fp16: true` adds mixed precision"
    ]
    plan = resolve(result.config, env={}, probe=lambda: ("cuda", True))
    assert (plan.dtype, plan.mixed_precision) == ("float16", "no")
    args = build_training_args(result.config, plan, False)
    assert (args.fp16, args.bf16) == (False, False)
    model = load_model(str(model_dir), plan.dtype, options=ModelOptions.from_config(result.config))
    assert {p.dtype for p in model.parameters()} == {__import__("torch").float16}
    amp = resolve(loaded(tmp_path, float16=True, fp16=True).config, env={})
    assert (amp.dtype, amp.mixed_precision) == ("float16", "fp16")
    assert "`float16: true` loads float16 weights and `bf16` trains in bfloat16" in error_of(
        tmp_path, float16=True, bf16=True
    )


def test_model_config_is_overrides_of_model_config(tmp_path, model_dir):
    result = loaded(tmp_path, model_config={"output_router_logits": True, "rms_norm_eps": 1e-3})
    assert result.config.overrides_of_model_config == {
        "output_router_logits": True,
        "rms_norm_eps": 1e-3,
    }
    model = load_model(str(model_dir), options=ModelOptions.from_config(result.config))
    assert model.config.rms_norm_eps == 1e-3 and model.config.output_router_logits is True


def test_save_only_model_and_torch_compile_mode_reach_training_arguments(tmp_path):
    cfg = loaded(tmp_path, save_only_model=True, torch_compile=True, torch_compile_mode="default")
    args = args_of(cfg.config, has_eval=False)
    assert (args.save_only_model, args.torch_compile_mode) == (True, "default")
    assert args_of(loaded(tmp_path).config).save_only_model is False
    assert "`save_only_model: true` writes checkpoints without optimizer, scheduler and RNG " in (
        error_of(tmp_path, save_only_model=True, auto_resume_from_checkpoints=True)
    )
    assert "`torch_compile_mode: max-autotune` applies with `torch_compile: true`" in error_of(
        tmp_path, torch_compile_mode="max-autotune"
    )


def test_keys_that_do_what_newtune_always_does_or_are_refused(tmp_path):
    result = loaded(tmp_path, low_cpu_mem_usage=True, experimental_skip_move_to_device=True)
    assert result.notes == [
        "`low_cpu_mem_usage: true` is how transformers 5 always loads a model (it drops the "
        "option); nothing to set",
        "`experimental_skip_move_to_device: true` is how newtune always loads: the Trainer "
        "places the model",
    ]
    msg = error_of(tmp_path, low_cpu_mem_usage=False, experimental_skip_move_to_device=False)
    assert "`low_cpu_mem_usage: false` cannot be honoured: transformers 5 always loads" in msg
    assert "`experimental_skip_move_to_device: false` asks the loader to move the model" in msg


def test_use_wandb_agrees_with_wandb_project(tmp_path):
    assert loaded(tmp_path, use_wandb=False).notes == []
    assert "`use_wandb: true` without `wandb_project`" in error_of(tmp_path, use_wandb=True)
    assert "`use_wandb: false` and `wandb_project: p` contradict each other" in error_of(
        tmp_path, use_wandb=False, wandb_project="p"
    )


# -- 3/5. keys Axolotl drops or removed: off accepted, values refused by name ---------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            "adam_eps",
            1e-8,
            "`adam_eps: 1e-08`: `adam_eps` is not an Axolotl key (Axolotl drops it unread, so it "
            "does nothing there); use `adam_epsilon` (AdamW epsilon) instead; remove it or set "
            "it to null",
        ),
        (
            "torch_dtype",
            "bfloat16",
            "`torch_dtype: 'bfloat16'`: `torch_dtype` is not an Axolotl key (Axolotl drops it "
            "unread, so it does nothing there); the dtype follows bf16 / fp16 / float16; use "
            "`bf16: true`, `fp16: true` or `float16: true` instead",
        ),
        # eta_min (the cosine floor) and flex_attn_compile_kwargs: tests/test_axolotl_compat4.py
        (
            "max_packed_sequence_len",
            2048,
            "`max_packed_sequence_len: 2048`: `max_packed_sequence_len` was removed from Axolotl "
            "(it drops or rejects the key); use `sample_packing: true` with `sequence_len` instead",
        ),
        ("gptq_groupsize", 128, "`gptq_groupsize: 128`: `gptq_groupsize` was removed from Axolotl"),
    ],
)
def test_dropped_and_legacy_keys_refused_by_name_when_set(tmp_path, key, value, expected):
    assert expected in error_of(tmp_path, **{key: value})


def test_dropped_and_legacy_keys_accepted_when_off(tmp_path):
    off = {
        "gptq_groupsize": None,
        "gptq_model_v1": False,
        "max_packed_sequence_len": None,
        "sample_packing_seq_len_multiplier": None,
        "trackio_project_name": None,
        "trackio_run_name": None,
        "trackio_space_id": None,
        "jagged_restart_steps": None,
        "jagged_restart_warmup_steps": None,
        "jagged_restart_anneal_steps": None,
        "adam_eps": None,
        "torch_dtype": None,
        "ddp": None,
        "use_wandb": None,
    }
    result = loaded(tmp_path, **off)
    assert result.notes == [] and result.config.gptq_model_v1 is False


# -- 4. pretraining_dataset without datasets is streamed (needs max_steps) --------------------


def test_pretraining_dataset_without_datasets_needs_max_steps(tmp_path):
    path = tmp_path / "cfg.yml"
    path.write_text("base_model: m\npretraining_dataset:\n  - path: c4\n    type: pretrain\n")
    err = error_line(cli("validate", str(path)))
    assert "`pretraining_dataset` needs `max_steps`: a stream has no length" in err
    assert "is required" not in err
    path.write_text(path.read_text() + "max_steps: 10\n")
    assert cli("validate", str(path)).returncode == 0


# -- 6. attention values Axolotl accepts ------------------------------------------------------


def test_flex_attention_validates_and_needs_cuda_at_train_time(tmp_path):
    result = loaded(tmp_path, attn_implementation="flex_attention")
    assert result.notes == [] and result.config.attn_implementation == "flex_attention"
    assert ModelOptions.from_config(result.config).attn == "flex_attention"
    assert machine_problems(result.config, device="cuda", world_size=1) == []
    assert machine_problems(result.config, device="cpu", world_size=1) == [
        "`attn_implementation: flex_attention` needs CUDA (torch's FlexAttention has no "
        "backward pass on CPU), and this machine trains on cpu; train on a CUDA GPU, or use "
        "`attn_implementation: sdpa`"
    ]


@pytest.mark.skipif(importlib.util.find_spec("kernels") is not None, reason="kernels installed")
def test_hub_kernel_attention_warns_here_and_train_needs_the_kernels_package(tmp_path):
    kernel = "kernels-community/vllm-flash-attn3"
    result = loaded(tmp_path, attn_implementation=kernel)
    assert result.notes == [
        f"warning: `attn_implementation: {kernel}` needs the kernels package (transformers' "
        "hub-kernels integration), which is not installed here; the machine that trains needs "
        "it (`pip install kernels`)."
    ]
    assert ModelOptions.from_config(result.config).attn == kernel
    assert machine_problems(result.config, device="cuda", world_size=1) == [
        f"`attn_implementation: {kernel}` needs the kernels package (transformers' hub-kernels "
        "integration), which is not installed; run `pip install kernels`, or use "
        "`attn_implementation: sdpa` (or flash_attention_2)"
    ]


def test_xformers_attention_is_read_as_sdpa_with_a_note(tmp_path, model_dir):
    result = loaded(tmp_path, attn_implementation="xformers")
    assert result.notes == [
        "`attn_implementation: xformers` is read as sdpa: torch's scaled_dot_product_attention "
        "runs the memory-efficient kernel that came from xformers (newtune does not install "
        "xformers)"
    ]
    assert resolve(result.config, env={}).attn_implementation == "sdpa"
    model = load_model(str(model_dir), options=ModelOptions.from_config(result.config))
    assert model.config._attn_implementation == "sdpa"


def test_unknown_attention_names_the_choices(tmp_path):
    assert (
        "`sage` is not an attention newtune runs; choose eager, sdpa (default), "
        "flash_attention_2, flex_attention, xformers (read as sdpa) or a hub kernel `org/repo`"
    ) in error_of(tmp_path, attn_implementation="sage")


# -- 6. next config-only families ---------------------------------------------------------------


def test_lora_kernels_false_accepted_true_warned_and_refused_at_train(tmp_path):
    off = loaded(tmp_path, adapter="lora", lora_mlp_kernel=False, lora_qkv_kernel=False)
    assert off.notes == [] and off.config.lora_mlp_kernel is False
    check_machine(off.config, device="cuda")  # nothing to refuse
    on = loaded(tmp_path, adapter="lora", lora_mlp_kernel=True, lora_o_kernel=True)
    why = (
        "`lora_mlp_kernel: true`, `lora_o_kernel: true` ask for Axolotl's own fused Triton LoRA "
        "kernels, which neither peft nor liger-kernel provide; newtune trains LoRA with peft "
        "(the same math, unfused), so set them to false (or remove them)"
    )
    assert on.notes == [f"warning: {why}; `train` refuses them"]
    with pytest.raises(ConfigError) as info:
        check_machine(on.config, device="cuda")
    assert str(info.value) == (
        f"newtune cannot train this config here: {why}. The config itself is valid "
        "(`newtune validate` accepts it)."
    )


def test_accelerator_config_reaches_training_arguments(tmp_path):
    kwargs = {"gradient_accumulation_kwargs": {"sync_each_batch": True}}
    cfg = loaded(tmp_path, accelerator_config=kwargs).config
    args = args_of(cfg, has_eval=False)
    assert args.accelerator_config.gradient_accumulation_kwargs == {"sync_each_batch": True}


def test_keys_axolotl_drops_full_finetune_and_test_value_are_refused(tmp_path):
    msg = error_of(tmp_path, full_finetune=True, test_value=True)
    assert (
        "`full_finetune: True`: `full_finetune` is not an Axolotl key (Axolotl drops it unread, "
        "so it does nothing there); use a config without `adapter` (that is a full fine-tune) "
        "instead"
    ) in msg
    assert "`test_value: True`: `test_value` is not an Axolotl key" in msg
