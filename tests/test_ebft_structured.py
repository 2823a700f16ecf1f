"""Structured EBFT (`rl: ebft`, TRL's GRPOTrainer with the feature-matching reward): exact
rewards on hand-built embeddings, whitening, grouping, the schema on the keys of Axolotl's
structured configs, `newtune train` end to end on the tiny model, and the vLLM errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl

from newtune.config.load import validate_data
from newtune.train.methods import ebft_core as core
from newtune.train.methods.ebft import check_groups, strip_end, structured_rewards

TRANSFORM = """
def transform(cfg, *args, **kwargs):
    def row(example, tokenizer=None):
        return {
            "prompt": [{"role": "user", "content": example["input"]}],
            "ground_truth": example["output"],
        }

    return row, {"remove_columns": ["input", "output", "id"]}
"""
ROWS = [
    {"id": i, "input": q, "output": a}
    for i, (q, a) in enumerate(
        [
            ("The capital of France is", "Paris."),
            ("Name a color.", "Blue"),
            ("What is the answer?", "0123456789"),
            ("Translate to French.", "Hello there!"),
        ]
    )
]
EBFT = {
    "feature_layers": [0.25, 0.5, 0.75],
    "embed_method": "last_token",
    "use_whitening": False,
    "alignment_coef": 1.0,
    "diversity_coef": 1.0,
    "ce_coef": 0.0,
}
TRL = {
    "num_generations": 2,
    "max_completion_length": 8,
    "temperature": 1.0,
    "use_vllm": False,
    "scale_rewards": True,
    "loss_type": "grpo",
    "epsilon": 0.2,
}


def direct_rewards(gen: torch.Tensor, gt: torch.Tensor, a: float, d: float) -> torch.Tensor:
    """Eq. 7 by loops: 2a cos(g_j, gt) - 2d/(n-1) sum_{k != j} g_j . g_k (unit vectors)."""
    gen = gen / gen.norm(dim=-1, keepdim=True)
    gt = gt / gt.norm(dim=-1, keepdim=True)
    p, n, _ = gen.shape
    out = torch.zeros(p, n)
    for i in range(p):
        for j in range(n):
            cos = float(gen[i, j] @ gt[i])
            others = sum(float(gen[i, j] @ gen[i, k]) for k in range(n) if k != j)
            out[i, j] = 2 * a * cos - 2 * d * others / (n - 1)
    return out


def test_rewards_match_the_formula_on_hand_built_vectors() -> None:
    gen = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]],
            [[0.0, 0.0, 3.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]],
        ]
    )
    gt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    parts = structured_rewards(gen.reshape(6, 3), gt, 3, alignment_coef=0.5, diversity_coef=2.0)
    expected = direct_rewards(gen, gt, 0.5, 2.0)
    torch.testing.assert_close(parts.rewards, expected)
    # first sample of group 0: cos 1; others (unit) dots 0 and 1/sqrt(2)
    assert parts.rewards[0, 0].item() == pytest.approx(2 * 0.5 * 1.0 - 2 * 2.0 * (0.5**0.5) / 2)
    torch.testing.assert_close(parts.alignment[0], torch.tensor([2.0, 0.0, 2 * 0.5**0.5]))
    mean_gen = (gen / gen.norm(dim=-1, keepdim=True)).mean(1)
    torch.testing.assert_close(parts.cfm, ((mean_gen - gt) ** 2).sum(-1))


def test_rewards_are_grouped_in_order_of_generations() -> None:
    """Rows are n consecutive samples per prompt: moving a sample to another group changes
    its diversity term, and each group is scored against its own ground truth."""
    gen = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    gt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    parts = structured_rewards(gen, gt, 2)
    # identical samples, aligned with their ground truth: 2*1 - 2*1 = 0 each
    torch.testing.assert_close(parts.rewards, torch.zeros(2, 2))
    swapped = structured_rewards(gen[[0, 2, 1, 3]], gt, 2)
    # [e1, e2] vs gt e1: align (2, 0), diversity 0 -> (2, 0); [e1, e2] vs gt e2 -> (0, 2)
    torch.testing.assert_close(swapped.rewards, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    with pytest.raises(ValueError, match="groups of 2"):
        structured_rewards(gen[:3], gt, 2)


def test_whitening_decorrelates_each_group() -> None:
    """With whitening the group's samples become orthonormal in the whitened space (n <= D),
    so the diversity term vanishes; the ground truth goes through the same map."""
    torch.manual_seed(0)
    gen = torch.randn(2, 3, 6) * torch.tensor([10.0, 1, 1, 0.1, 1, 1])
    gt = torch.randn(2, 6)
    parts = structured_rewards(gen.reshape(6, 6), gt, 3, use_whitening=True)
    torch.testing.assert_close(parts.diversity, torch.zeros(2, 3), atol=1e-5, rtol=0)
    white_gen, white_gt = core.whiten(gen, gt)
    gram = white_gen @ white_gen.transpose(-1, -2)
    torch.testing.assert_close(gram, torch.eye(3).expand(2, 3, 3), atol=1e-5, rtol=0)
    cos = torch.nn.functional.cosine_similarity(white_gen, white_gt.unsqueeze(1), dim=-1)
    torch.testing.assert_close(parts.alignment, 2 * cos)
    plain = structured_rewards(gen.reshape(6, 6), gt, 3, use_whitening=False)
    assert not torch.allclose(plain.diversity, parts.diversity, atol=1e-3)


def test_groups_must_share_their_prompt() -> None:
    check_groups(["a", "a", "b", "b"], ["x", "x", "y", "y"], 2)
    with pytest.raises(Exception, match="mixes prompts"):
        check_groups(["a", "b", "b", "b"], ["x", "y", "y", "y"], 2)
    with pytest.raises(Exception, match="whole groups"):
        check_groups(["a", "a", "a"], ["x", "x", "x"], 2)
    assert strip_end([5, 6, 2, 2, 0], {2, 0}) == [5, 6]
    from newtune.errors import DataError
    from newtune.train.methods.ebft import FeatureReward

    reward = FeatureReward(None)
    with pytest.raises(DataError, match="`ground_truth` is NoneType, not text"):
        reward(["a", "a"], ["x", "y"], [[1], [2]], ground_truth=["ok", None])
    with pytest.raises(DataError, match="lack"):
        reward(["a", "a"], ["x", "y"], [[1], [2]])


# -- schema --------------------------------------------------------------------------------

STRUCTURED_CONFIGS = {
    # the keys of Axolotl's five structured examples (llama-1b-ebft-opencode{,-novllm},
    # qwen35-{4b,9b}-ebft-structured{,-async}), with newtune's answer for each
    "novllm": ({"trl": TRL}, None),
    "vllm-server": ({"trl": {**TRL, "use_vllm": True, "max_completion_length": 256}}, None),
    "qwen-structured": (
        {
            "trl": {
                **TRL,
                "use_vllm": True,
                "vllm_server_host": "0.0.0.0",
                "vllm_server_port": 8000,
                "generation_kwargs": {"stop_token_ids": [248044, 248046]},
                "chat_template_kwargs": {"enable_thinking": False},
            }
        },
        None,
    ),
    "qwen-9b": (
        {
            "trl": {**TRL, "use_vllm": True, "vllm_server_timeout": 300},
            "vllm": {
                "gpu_memory_utilization": 0.7,
                "max_model_len": 2048,
                "serve_module": "axolotl.scripts.vllm_serve_lora",
                "enforce_eager": True,
            },
        },
        None,  # the server keys are read by `newtune vllm-serve` (tests/test_vllm_serve.py)
    ),
    "qwen-async": (
        {"trl": {**TRL, "use_vllm": True, "async_prefetch": True}},
        "`trl.async_prefetch: True` is Axolotl's asynchronous GRPO trainer",
    ),
}


def _config(extra: dict) -> dict:
    return {
        "base_model": "org/model",
        "rl": "ebft",
        "ebft": EBFT,
        "datasets": [
            {
                "path": "nvidia/OpenCodeInstruct",
                "type": "ebft_opencode.transform",
                "split": "train[:1%]",
            }
        ],
        # the other top-level keys of Axolotl's structured EBFT examples
        "chat_template": "llama3",
        "sequence_len": 512,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "num_epochs": 1,
        "max_steps": 10,
        "learning_rate": 1.0e-5,
        "optimizer": "adamw_torch_fused",
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "weight_decay": 0.01,
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "lora_target_modules": r".*\.layers\.(3|7)\.self_attn\.(q|k|v|o)_proj|.*\.mlp\.(gate|up)_proj",
        "bf16": "auto",
        "attn_implementation": "flash_attention_2",
        "gradient_checkpointing": True,
        "special_tokens": {"pad_token": "<|end_of_text|>"},
        "val_set_size": 0.0,
        "output_dir": "./out",
        "wandb_project": "ebft",
        "wandb_run_id": None,
        "wandb_watch": None,
        "wandb_log_model": None,
        "use_tensorboard": True,
        "logging_steps": 1,
        "save_steps": 25,
        **extra,
    }


@pytest.mark.parametrize("name", list(STRUCTURED_CONFIGS))
def test_schema_on_the_structured_configs(name: str) -> None:
    from newtune.errors import ConfigError

    extra, refusal = STRUCTURED_CONFIGS[name]
    if refusal is None:
        loaded = validate_data(_config(extra), "cfg.yml", None)
        assert loaded.config.rl == "ebft"
        assert loaded.config.ebft.feature_layers == [0.25, 0.5, 0.75]
        assert loaded.config.trl.num_generations == 2
        return
    with pytest.raises(ConfigError) as err:
        validate_data(_config(extra), "cfg.yml", None)
    assert refusal in str(err.value)


def test_schema_defaults_and_mode_rules() -> None:
    from newtune.config.schema.online import EBFTBlock, TRLBlock, online_rules
    from newtune.errors import ConfigError

    block = EBFTBlock()
    assert (block.mode, block.embed_method, block.use_whitening, block.ce_coef) == (
        "structured",
        "last_token",
        False,
        0.0,
    )
    assert (block.adaptive_max_tokens, block.gt_length_multiplier, block.n_samples_per_prompt) == (
        True,
        1.5,
        4,
    )
    assert TRLBlock().vllm_server_port == 8000
    with pytest.raises(
        ConfigError, match=r"`ebft.n_samples_per_prompt` \(use `trl.num_generations`\)"
    ):
        validate_data(_config({"ebft": {**EBFT, "n_samples_per_prompt": 4}}), "cfg.yml", None)
    with pytest.raises(ConfigError, match="configure online RL"):
        validate_data({**_config({"trl": TRL}), "rl": "dpo", "ebft": None}, "cfg.yml", None)
    with pytest.raises(ConfigError, match="module.function"):
        bad = _config({"trl": TRL})
        bad["datasets"] = [{"path": "x.jsonl", "type": "alpaca"}]
        validate_data(bad, "cfg.yml", None)
    with pytest.raises(ConfigError, match=r"num_generations = 8 \(TRL's default\).*= 4 per round"):
        validate_data(_config({"trl": {"max_completion_length": 16}}), "cfg.yml", None)
    colocate = _config(
        {
            "trl": {**TRL, "use_vllm": True, "vllm_mode": "colocate"},
            "vllm": {"gpu_memory_utilization": 0.4},
        }
    )
    loaded = validate_data(colocate, "cfg.yml", None)
    from newtune.train.methods.grpo import grpo_kwargs

    kwargs = grpo_kwargs(loaded.config)
    assert kwargs["vllm_mode"] == "colocate" and kwargs["vllm_gpu_memory_utilization"] == 0.4
    assert online_rules(loaded.config) == []


# -- end to end ----------------------------------------------------------------------------


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=cwd,
    )


def write_run(
    tmp_path: Path, model_dir: Path, ebft: dict | None = None, trl: dict | None = None
) -> Path:
    """A structured EBFT config, its data and its transform module beside it."""
    (tmp_path / "my_ebft_rows.py").write_text(TRANSFORM)
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    cfg = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {**EBFT, **(ebft or {})},
        "trl": {**TRL, **(trl or {})},
        "datasets": [{"path": str(data), "type": "my_ebft_rows.transform"}],
        "sequence_len": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "seed": 7,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "output_dir": str(tmp_path / "out"),
        "val_set_size": 0.0,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_structured_ebft_two_steps(tmp_path: Path, model_dir: Path) -> None:
    cfg = write_run(tmp_path, model_dir, ebft={"ce_coef": 0.1, "use_whitening": True})
    proc = cli("train", str(cfg), cwd=tmp_path.parent)  # the module is found beside the config
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    logs = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for entry in logs:
        assert math.isfinite(entry["loss"])
        for name in (
            "ebft/alignment",
            "ebft/diversity",
            "ebft/cfm_loss",
            "ebft/reward",
            "ebft/ce_loss",
        ):
            assert math.isfinite(entry[name]), name
        assert entry["ebft/ce_loss"] > 0
        # reward = alignment - diversity (coefs 1), as means over the batch
        assert entry["ebft/reward"] == pytest.approx(
            entry["ebft/alignment"] - entry["ebft/diversity"], abs=1e-4
        )


def test_use_vllm_without_vllm_is_one_paragraph(tmp_path: Path, model_dir: Path) -> None:
    pytest.importorskip("trl")
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    cfg = write_run(tmp_path, model_dir, trl={"use_vllm": True, "vllm_server_port": 8123})
    assert cli("validate", str(cfg)).returncode == 0
    proc = cli("train", str(cfg))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "`trl.use_vllm: true`" in proc.stderr
    assert f"trl vllm-serve --model {model_dir} --host 0.0.0.0 --port 8123" in proc.stderr
    assert "`trl.use_vllm: false`" in proc.stderr
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_missing_transform_module_is_a_data_error(tmp_path: Path, model_dir: Path) -> None:
    cfg = write_run(tmp_path, model_dir)
    text = cfg.read_text().replace("my_ebft_rows.transform", "no_such_rows.transform")
    cfg.write_text(text)
    proc = cli("train", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no module `no_such_rows`" in proc.stderr


def test_adaptive_max_tokens_caps_generation(tmp_path: Path, model_dir: Path) -> None:
    """Ground truths of a few tokens: the completion cap is Axolotl's floor of 64 tokens, below
    trl.max_completion_length (the tiny random model rarely stops by itself)."""
    cfg = write_run(tmp_path, model_dir, trl={"max_completion_length": 80})
    text = yaml.safe_load(cfg.read_text())
    text["max_steps"] = 1
    cfg.write_text(yaml.safe_dump(text))
    proc = cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [
        h for h in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in h
    ]
    assert logs[0]["completions/max_length"] <= 64
    assert logs[0]["completions/clipped_ratio"] > 0  # some completions were cut at the cap


def test_preprocess_refuses_structured_ebft(tmp_path: Path, model_dir: Path) -> None:
    cfg = write_run(tmp_path, model_dir)
    proc = cli("preprocess", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "`rl: ebft` (structured) has nothing to preprocess" in proc.stderr


def test_multi_turn_rows_are_refused(tmp_path: Path, model_dir: Path) -> None:
    cfg = write_run(tmp_path, model_dir)
    module = tmp_path / "my_ebft_rows.py"
    module.write_text(
        TRANSFORM.replace(
            '"ground_truth": example["output"],',
            '"ground_truth": example["output"], "remaining_turns": [],',
        )
    )
    proc = cli("train", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "`remaining_turns` column" in proc.stderr
    assert not (tmp_path / "out" / "adapter_config.json").exists()


# -- rl: grpo / gdpo (TRL's GRPOTrainer with user reward functions) --------------------------

REWARDS = """
def transform(cfg, *args, **kwargs):
    def row(example, tokenizer=None):
        return {"prompt": [{"role": "user", "content": example["input"]}], "answer": example["output"]}

    return row, {"remove_columns": ["input", "output", "id"]}


def length_reward(prompts, completions, **kwargs):
    return [float(len(c[0]["content"])) for c in completions]


def answer_reward(prompts, completions, answer, **kwargs):
    return [1.0 if a[:1] in c[0]["content"] else 0.0 for c, a in zip(completions, answer)]
"""


def test_gdpo_schema_and_aggregation() -> None:
    from newtune.errors import ConfigError
    from newtune.train.methods.grpo import grpo_kwargs

    gdpo = {
        "base_model": "org/model",
        "rl": "gdpo",
        "trl": {
            "beta": 0.001,
            "max_completion_length": 128,
            "num_generations": 2,
            "temperature": 0.7,
            "top_p": 0.95,
            "use_vllm": False,
            "reward_funcs": ["rwd.format_reward", "rwd.correctness_reward"],
            "reward_weights": [1.0, 2.0],
            "log_completions": True,
            "num_completions_to_print": 3,
            "scale_rewards": True,
        },
        "datasets": [{"path": "openai/gsm8k", "name": "main", "type": "rwd.gsm8k_transform"}],
        "sequence_len": 512,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 8,
        "output_dir": "./out",
    }
    loaded = validate_data(gdpo, "cfg.yml", None)
    kwargs = grpo_kwargs(loaded.config)
    assert kwargs["multi_objective_aggregation"] == "normalize_then_sum"
    assert kwargs["reward_weights"] == [1.0, 2.0] and kwargs["beta"] == 0.001
    assert (
        grpo_kwargs(validate_data({**gdpo, "rl": "grpo"}, "c.yml", None).config).get(
            "multi_objective_aggregation"
        )
        is None
    )
    no_beta = {k: v for k, v in gdpo["trl"].items() if k != "beta"}
    rl_beta = validate_data({**gdpo, "rl_beta": 0.2, "trl": no_beta}, "c.yml", None).config
    assert grpo_kwargs(rl_beta)["beta"] == 0.2  # Axolotl: trl.beta, else rl_beta
    assert grpo_kwargs(validate_data({**gdpo, "rl_beta": 0.2}, "c.yml", None).config)["beta"] == (
        0.001
    )
    bad = {**gdpo, "trl": {**gdpo["trl"], "multi_objective_aggregation": "sum_then_normalize"}}
    with pytest.raises(ConfigError, match="`sum_then_normalize` is `rl: grpo`"):
        validate_data(bad, "cfg.yml", None)
    with pytest.raises(ConfigError, match="`rl: grpo` rewards completions with `trl.reward_funcs`"):
        validate_data({**gdpo, "rl": "grpo", "trl": {"num_generations": 2}}, "cfg.yml", None)
    with pytest.raises(ConfigError, match="has 1 weights for 2"):
        validate_data({**gdpo, "trl": {**gdpo["trl"], "reward_weights": [1.0]}}, "cfg.yml", None)


def test_train_gdpo_with_user_rewards(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    cfg = yaml.safe_load(write_run(tmp_path, model_dir).read_text())
    cfg.pop("ebft")
    cfg["rl"] = "gdpo"
    cfg["trl"] = {
        **TRL,
        "beta": 0.01,
        "reward_funcs": ["my_rewards.length_reward", "my_rewards.answer_reward"],
        "reward_weights": [0.5, 2.0],
    }
    cfg["datasets"] = [{"path": str(data), "type": "my_rewards.transform"}]
    path = tmp_path / "gdpo.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = cli("train", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file()
    logs = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for entry in logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["kl"])
        assert entry["rewards/length_reward/mean"] > 0
        assert 0 <= entry["rewards/answer_reward/mean"] <= 1


def test_stop_token_ids_end_transformers_generation(tmp_path: Path, model_dir: Path) -> None:
    """`generation_kwargs.stop_token_ids` (vLLM's key, in Axolotl's Qwen3.5 configs) ends a
    completion under transformers generate too: with every token a stop token, each completion
    is its first token, and TRL counts it as terminated."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    cfg = write_run(
        tmp_path, model_dir, trl={"generation_kwargs": {"stop_token_ids": list(range(vocab))}}
    )
    text = yaml.safe_load(cfg.read_text())
    text["max_steps"] = 1
    cfg.write_text(yaml.safe_dump(text))
    proc = cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [
        h for h in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in h
    ]
    assert logs[0]["completions/max_length"] == 1
    assert logs[0]["completions/clipped_ratio"] == 0
    assert math.isfinite(logs[0]["ebft/reward"])


@pytest.mark.parametrize(
    ("embed_method", "whitening"),
    [("last_token", False), ("mean_pooling", False), ("last_token", True)],
)
def test_trainer_rewards_equal_a_direct_computation(
    model_dir: Path, embed_method: str, whitening: bool
) -> None:
    """The trainer's reward path (prompt ids + generated ids without the trailing EOS, right
    padding in chunks, frozen copy of the model, pooling, grouping) against each sequence run
    alone through the model and eq. 7 written out."""
    import types

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from newtune.config.schema.online import EBFTBlock
    from newtune.train.methods.ebft import ebft_trainer_class

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ebft = EBFTBlock(embed_method=embed_method, use_whitening=whitening, diversity_coef=0.5)
    cls = ebft_trainer_class()
    fake = types.SimpleNamespace(
        processing_class=tok,
        eos_token_ids=[tok.eos_token_id],
        method=types.SimpleNamespace(max_length=64),
        ebft=ebft,
        feature_network=core.FeatureNetwork(model),
        feature_layers=core.layer_indices(2, ebft.feature_layers),
        args=types.SimpleNamespace(per_device_train_batch_size=2),
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
        _metrics={"train": defaultdict(list)},
        _tokenize_prompts=lambda prompts: (tok(prompts)["input_ids"], None, {}),
    )
    fake._embed = types.MethodType(cls._embed, fake)
    prompts = [
        "The capital of France is",
        "The capital of France is",
        "Name a color.",
        "Name a color.",
    ]
    eos = tok.eos_token_id
    completions = [
        tok(" Paris.", add_special_tokens=False)["input_ids"] + [eos],
        tok(" Brintmoor. The quick", add_special_tokens=False)["input_ids"],
        tok(" Blue", add_special_tokens=False)["input_ids"] + [eos, tok.pad_token_id],
        tok(" red, green", add_special_tokens=False)["input_ids"],
    ]
    truths = [" Paris.", " Paris.", " Blue", " Blue"]
    got = cls.ebft_rewards(fake, prompts, completions, truths, 2, True)

    def embed(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        feats = torch.cat(
            [
                torch.nn.functional.normalize(hidden[i][0].float(), dim=-1)
                for i in fake.feature_layers
            ],
            -1,
        )
        return feats[-1] if embed_method == "last_token" else feats.mean(0)

    gen, gt = [], []
    for i, comp in enumerate(completions):
        prompt = tok(prompts[i])["input_ids"]
        body = list(comp)
        while body and body[-1] in (eos, tok.pad_token_id):
            body.pop()
        gen.append(embed(prompt + body))
        if i % 2 == 0:
            gt.append(embed(prompt + tok(truths[i], add_special_tokens=False)["input_ids"]))
    gen_t = torch.stack(gen).view(2, 2, -1)
    gt_t = torch.stack(gt)
    if whitening:
        gen_t, gt_t = core.whiten(gen_t, gt_t)
    else:
        gen_t = torch.nn.functional.normalize(gen_t, dim=-1)
        gt_t = torch.nn.functional.normalize(gt_t, dim=-1)
    expected = []
    for p in range(2):
        for j in range(2):
            cos = torch.nn.functional.cosine_similarity(gen_t[p, j], gt_t[p], dim=0)
            dot = gen_t[p, j] @ gen_t[p, 1 - j]
            expected.append(float(2 * cos - 0.5 * 2 * dot))
    assert got == pytest.approx(expected, abs=1e-4)
    assert fake._metrics["train"]["ebft/reward"] == [pytest.approx(sum(expected) / 4, abs=1e-4)]


def test_each_rank_must_generate_whole_groups() -> None:
    """Under several GPUs TRL may split a prompt's completions across ranks; EBFT's diversity
    term needs the whole group on one rank, so that is refused before the trainer is built."""
    import types

    from newtune.errors import ConfigError
    from newtune.train.methods.ebft import StructuredEBFTMethod

    method = StructuredEBFTMethod(validate_data(_config({"trl": TRL}), "cfg.yml", None).config)
    assert method.max_length == 512 + 8  # sequence_len + max_completion_length: features' cut
    split = types.SimpleNamespace(
        per_device_train_batch_size=2, steps_per_generation=1, num_generations=4
    )
    with pytest.raises(ConfigError, match="each GPU generates 2 completions per round"):
        method.build_trainer(None, split, {}, None, [])


def test_evaluate_command_refuses_online_methods(tmp_path: Path, model_dir: Path) -> None:
    cfg = write_run(tmp_path, model_dir)
    proc = cli("evaluate", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "`rl: ebft` is evaluated by sampling completions" in proc.stderr


def test_train_structured_ebft_full_finetune_with_kl(tmp_path: Path, model_dir: Path) -> None:
    """No adapter: the feature network is a frozen copy of the model; trl.beta loads TRL's
    reference model (KL 0 at the first step, the policy has not moved yet)."""
    cfg = write_run(tmp_path, model_dir, trl={"beta": 0.05})
    text = yaml.safe_load(cfg.read_text())
    for key in ("adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_linear"):
        text.pop(key)
    cfg.write_text(yaml.safe_dump(text))
    proc = cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is a frozen copy" in proc.stderr
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    logs = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert logs[0]["kl"] == 0.0 and math.isfinite(logs[1]["kl"])
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["ebft/reward"]) for h in logs)


def test_colocate_without_vllm_names_colocate() -> None:
    from newtune.errors import ConfigError
    from newtune.train.methods.grpo import check_vllm

    colocate = _config({"trl": {**TRL, "use_vllm": True, "vllm_mode": "colocate"}})
    config = validate_data(colocate, "cfg.yml", None).config
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ConfigError, match="colocate mode runs vLLM inside the training process"):
        check_vllm(config)
