"""The evaluate command's work: eval loss of the base, trained or adapter model on a split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from newtune.config.load import LoadedConfig
from newtune.config.resolve import resolve
from newtune.config.schema.multimodal import is_multimodal
from newtune.data.packing import packing_plan, sample_lengths
from newtune.data.prepare import prepare_data
from newtune.errors import ConfigError, DataError
from newtune.fileio import clean_stale
from newtune.inference import choose_model, load_trained
from newtune.train.methods import method_for
from newtune.train.preflight import check_sequence_len
from newtune.train.trainer import loss_metrics, packed_loader, padded_loader, token_loss

log = logging.getLogger(__name__)


def evaluate(
    loaded: LoadedConfig,
    split: str = "test",
    base_only: bool = False,
    base_overridden: bool = False,
) -> dict[str, Any]:
    """Eval metrics (trained-token mean loss, perplexity, counts) of the chosen model."""
    config = loaded.config
    for entry in clean_stale(Path(config.output_dir)):  # what killed runs left there
        log.info("removed %s, left by a process that no longer runs", entry)
    if is_multimodal(config):  # image rows: the vision collator (inference_vision)
        from newtune.inference_vision import evaluate_vision

        return evaluate_vision(loaded, split, base_only, base_overridden)
    check_sequence_len(config, resolve(config))  # padded batches must fit: refuse before work
    method = method_for(config)
    if getattr(method, "online", False):  # rl: ebft (structured) / grpo / gdpo: TRL generates
        raise ConfigError(
            f"`newtune evaluate` scores the tokens of a fixed split, but `{method.describe()}` "
            "is evaluated by sampling completions and scoring them: set `val_set_size` or "
            "`test_datasets` and `newtune train` logs eval_reward and the method's eval metrics."
        )
    _, prepared = prepare_data(loaded)
    method.check_data(prepared.data)
    dataset = split_of(prepared.data, split)
    model_source, adapter_dir = choose_model(config, base_overridden, base_only)
    model, tokenizer = load_trained(config, model_source, adapter_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    if method.is_preference:
        result = evaluate_preference(method, config, model, tokenizer, dataset, device)
        return {**result, "split": split, "model": model_source, "adapter": adapter_dir}
    _, eval_packing = packing_plan(config)
    rows = config.eval_batch_size or config.micro_batch_size
    pad_to = config.sequence_len if config.pad_to_sequence_len else None
    if eval_packing is not None:
        batches = packed_loader(
            dataset, eval_packing, tokenizer.pad_token_id, seed=config.seed, shuffle=False
        )
    else:
        batches = padded_loader(dataset, rows, tokenizer.pad_token_id, pad_to)
    if method.name == "diffusion":  # masked-diffusion loss (train.methods.diffusion)
        from newtune.train.methods.diffusion import evaluate_diffusion

        summary = evaluate_diffusion(method, model, tokenizer, batches, device, config.seed)
    else:
        summary = loss_summary(*token_loss(model, batches, device), split, dataset)
    return {
        **summary,
        "total_tokens": int(sample_lengths(dataset).sum()),
        "split": split,
        "model": model_source,
        "adapter": adapter_dir,
        "sample_packing": eval_packing is not None,
    }


def split_of(data: Any, split: str) -> Any:
    """The prepared dataset of `split`; a DataError naming the splits there are when it is absent."""
    if split not in data:
        raise DataError(
            f"the prepared data has no `{split}` split (it has: {', '.join(data)}). "
            "Set `val_set_size` or `test_datasets` in the config, or pass --split=train."
        )
    return data[split]


def loss_summary(total: float, count: int, split: str, dataset: Any) -> dict[str, Any]:
    """eval_loss, perplexity, eval_tokens and eval_rows from a split's summed token loss."""
    if not count:
        raise DataError(f"the `{split}` split has no trained token to evaluate")
    metrics = loss_metrics(total, count)
    return {
        "eval_loss": metrics["eval_loss"],
        "perplexity": metrics["eval_perplexity"],
        "eval_tokens": count,
        "eval_rows": len(dataset),
    }


def evaluate_preference(
    method: Any, config: Any, model: Any, tokenizer: Any, dataset: Any, device: Any
) -> dict[str, Any]:
    """`eval_loss` and the method's metrics (TRL's names, e.g. `rewards/accuracies`)."""
    from newtune.train.methods.base import Reference, evaluate_batches, mask_attention
    from newtune.train.methods.reference import frozen_copy
    from newtune.train.methods.trainer import sequential_loader
    from newtune.train.run import pair_capacity

    reference = Reference("none")
    if method.needs_reference and hasattr(model, "disable_adapter"):
        reference = Reference("adapter")  # the base under the trained adapter
    elif method.needs_reference:  # a full fine-tune: the base model it started from
        plan = resolve(config)
        reference = Reference("model", frozen_copy(config, plan, tokenizer)).to(device)
    if method.sequence_classification and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    rows = config.eval_batch_size or config.micro_batch_size
    _, eval_packing = packing_plan(config)
    pad_to = config.sequence_len if config.pad_to_sequence_len else None
    capacity = pair_capacity(eval_packing, config)
    dataset = method.prepare_rows(dataset, config.micro_batch_size)
    attention = mask_attention(model, getattr(model.config, "_attn_implementation", None))
    collate = method.collator(tokenizer.pad_token_id, capacity, pad_to, attention)
    values = evaluate_batches(
        method, model, reference, sequential_loader(dataset, rows, collate), device
    )
    return {
        "eval_loss": values.pop("loss"),
        **values,
        "eval_rows": len(dataset),
        "sample_packing": capacity is not None,
    }
