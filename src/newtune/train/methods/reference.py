"""The reference model of DPO and KTO: the base under a disabled LoRA adapter, a frozen copy, or
log-probs computed once (`precompute_ref_log_probs`) and cached beside the prepared data."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import datasets
import torch
from filelock import FileLock

from newtune.fileio import atomic_dir, clean_stale
from newtune.train.methods.base import Reference, mask_attention, to_device
from newtune.train.methods.trainer import sequential_loader

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.json"


def frozen_copy(config: Any, plan: Any, tokenizer: Any) -> Any:
    """The base model again, frozen and in eval mode: the reference of a full fine-tune."""
    from newtune.models.load import ModelOptions, load_model
    from newtune.models.tokenizer import resize_embeddings

    model = load_model(
        config.base_model, plan.dtype, options=ModelOptions.from_config(config, plan)
    )
    resize_embeddings(model, tokenizer, config)
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.eval()


def live_reference(method: Any, config: Any, plan: Any, tokenizer: Any) -> Reference:
    """The reference a method scores against during training (none for SimPO, ORPO, reward)."""
    if not method.needs_reference:
        return Reference("none")
    if plan.train_mode in ("lora", "qlora"):
        return Reference("adapter")
    log.info("loading a frozen copy of %s as the reference model", config.base_model)
    return Reference("model", frozen_copy(config, plan, tokenizer))


def reference_identity(config: Any, plan: Any) -> dict[str, Any]:
    """What makes reference log-probs what they are: the base model (and its files), dtype,
    attention and model options. A LoRA reference is the base with the adapter disabled."""
    from newtune.models.location import locate

    files: dict[str, list[int]] = {}
    loc = locate(config.base_model)
    if loc.is_local:
        folder = Path(loc.name_or_path)
        for pattern in ("*.json", "*.safetensors", "*.bin", "*.gguf"):
            for path in sorted(folder.glob(pattern)):
                stat = path.stat()
                files[path.name] = [stat.st_size, stat.st_mtime_ns]
    return {
        "base_model": config.base_model,
        "revision": config.revision_of_model,
        "base_model_config": config.base_model_config,
        "model_type": config.model_type,
        "overrides": config.overrides_of_model_config,
        "dtype": plan.dtype,
        "attn": plan.attn_implementation,
        "quantized": bool(config.load_in_4bit or config.load_in_8bit),
        "files": files,
    }


def reference_folder(prepared_path: Path, key_inputs: dict[str, Any]) -> Path:
    """The cache folder of these reference log-probs, beside the prepared data."""
    text = json.dumps(key_inputs, sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    return prepared_path.parent / f"{prepared_path.name}-ref-{key}"


def score_split(
    method: Any,
    reference: Reference,
    policy: Any,
    ds: Any,
    batch_size: int,
    pad_id: int,
    device: Any,
    capacity: int | None = None,
    attention: str | None = None,
) -> dict[str, list[float]]:
    """The method's reference columns for every row of a split, in row order (scored packed
    when `capacity` is set: the log-probs are those of the padded rows, without the padding)."""
    columns: dict[str, list[float]] = {name: [] for name in method.ref_columns}
    collate = method.collator(pad_id, capacity, None, mask_attention(policy, attention))
    loader = sequential_loader(ds, batch_size, collate)
    with reference.scoring(policy) as ref:
        was_training = ref.training
        ref.eval()
        for batch in loader:
            for name, values in method.reference_columns(ref, to_device(batch, device)).items():
                columns[name].extend(values.detach().float().cpu().tolist())
        ref.train(was_training)
    return columns


def precompute(
    method: Any,
    config: Any,
    plan: Any,
    prepared_path: Path,
    splits: dict[str, Any],
    reference: Reference,
    policy: Any,
    pad_id: int,
) -> dict[str, Any]:
    """The splits with the reference log-prob columns, computed once and cached on disk.

    The cache is keyed by the prepared data, the method (and KTO's KL pairing, which follows
    `micro_batch_size`) and the reference model's identity; it is written whole or not at all.
    """
    identity = reference_identity(config, plan)
    key_inputs = {
        "prepared": prepared_path.name,
        "method": method.name,
        "micro_batch_size": config.micro_batch_size if method.name == "kto" else None,
        "splits": {name: len(ds) for name, ds in splits.items()},
        "reference": identity,
    }
    folder = reference_folder(prepared_path, key_inputs)
    device = torch.device(plan.device if plan.device != "cuda" else f"cuda:{plan.local_rank}")
    batch_size = config.eval_batch_size or config.micro_batch_size
    attention = plan.attn_implementation
    # packed scoring only when training packs (a model that trains packed scores packed
    # exactly; others, e.g. state-space hybrids, are scored padded), laid out as in training
    capacity = None
    if config.sample_packing or getattr(config, "dpo_padding_free", None):
        flash = attention.startswith("flash_attention")
        capacity = 2 * config.sequence_len * batch_size if flash else config.sequence_len
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        clean_stale(folder.parent)
        if not (folder / REFERENCE_FILE).is_file():
            log.info("computing reference log-probs once into %s", folder)
            policy.to(device)
            if reference.model is not None:
                reference.model.to(device)
            with atomic_dir(folder) as tmp:
                for name, ds in splits.items():
                    columns = score_split(
                        method,
                        reference,
                        policy,
                        ds,
                        batch_size,
                        pad_id,
                        device,
                        capacity,
                        attention,
                    )
                    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp / name))
                (tmp / REFERENCE_FILE).write_text(json.dumps(key_inputs, indent=2, default=str))
        else:
            log.info("reference log-probs reused from %s", folder)
    return {
        name: datasets.concatenate_datasets(
            [ds, datasets.load_from_disk(str(folder / name))], axis=1
        )
        for name, ds in splits.items()
    }
