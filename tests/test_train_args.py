"""Config keys reach TrainingArguments (asserted on the object)."""

from __future__ import annotations

from newtune.config.resolve import resolve
from newtune.config.schema import NewtuneConfig
from newtune.train.args import build_training_args


def args_for(has_eval: bool = False, steps_per_epoch: int = 10, **keys):
    cfg = NewtuneConfig(base_model="m", datasets=[{"path": "d.jsonl", "type": "alpaca"}], **keys)
    return build_training_args(cfg, resolve(cfg, env={}), has_eval, steps_per_epoch)


def test_optimizer_family_reaches_training_arguments(tmp_path):
    args = args_for(
        output_dir=str(tmp_path),
        weight_decay=0.1,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        max_grad_norm=0.5,
        optimizer="adamw_torch",
        optim_args={"foo": 1},
        lr_scheduler="linear",
        lr_scheduler_kwargs={"x": 1},
        warmup_ratio=0.1,
        neftune_noise_alpha=5.0,
        eval_batch_size=3,
    )
    assert (args.weight_decay, args.adam_beta1, args.adam_beta2) == (0.1, 0.8, 0.95)
    assert (args.adam_epsilon, args.max_grad_norm, args.optim_args) == (1e-6, 0.5, "foo=1")
    assert (args.lr_scheduler_type.value, args.lr_scheduler_kwargs) == ("linear", {"x": 1})
    assert args.get_warmup_steps(100) == 10 and args.neftune_noise_alpha == 5.0
    assert args.per_device_eval_batch_size == 3


def test_batch_size_derives_accumulation(tmp_path):
    args = args_for(output_dir=str(tmp_path), micro_batch_size=2, batch_size=8)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 4)


def test_per_epoch_counts_become_steps(tmp_path):
    args = args_for(
        True, 10, output_dir=str(tmp_path), evals_per_epoch=2, saves_per_epoch=5, save_total_limit=2
    )
    assert (args.eval_strategy.value, args.eval_steps) == ("steps", 5)
    assert (args.save_strategy.value, args.save_steps, args.save_total_limit) == ("steps", 2, 2)
    default = args_for(True, 10, output_dir=str(tmp_path))
    assert (default.eval_strategy.value, default.save_strategy.value) == ("epoch", "no")


def test_unknown_optimizer_is_a_config_error(tmp_path):
    import pytest

    from newtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^`optimizer` is not valid for transformers: "):
        args_for(output_dir=str(tmp_path), optimizer="adamw_nope")


def test_group_by_length_picks_the_length_grouped_sampler(tmp_path):
    assert args_for(output_dir=str(tmp_path)).train_sampling_strategy == "random"
    args = args_for(output_dir=str(tmp_path), group_by_length=True)
    assert (args.train_sampling_strategy, args.length_column_name) == ("group_by_length", "length")
