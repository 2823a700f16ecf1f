"""Merge a LoRA adapter into its base model and write a plain transformers folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from newtune.config.schema import NewtuneConfig
from newtune.errors import ModelError
from newtune.fileio import replace_dir, temp_dir_beside
from newtune.models.adapters import load_adapter
from newtune.models.load import DTYPES, ModelOptions, load_model
from newtune.models.location import json_problem, locate
from newtune.models.streaming_merge import base_shards, merge_shards, plan_merge
from newtune.models.tokenizer import resize_embeddings

log = logging.getLogger(__name__)


def merge_lora(
    base_model: str,
    adapter_dir: str,
    out_dir: Path,
    dtype: str,
    tokenizer: Any,
    config: NewtuneConfig | None = None,
) -> Path:
    """Merge the adapter and write model + tokenizer to `out_dir` atomically.

    Safetensors bases are merged shard by shard (bounded memory, each tensor keeps its
    dtype); other bases (.gguf, .bin) and adapters only peft can merge are merged in memory
    in fp32 and cast to `dtype`. `config` supplies the loading keys (revision, model class,
    `base_model_ignore_patterns`, added tokens) and `lora_on_cpu`.
    """
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ModelError(
            f"{adapter_dir} has no adapter_config.json, so there is no LoRA adapter to merge; "
            "point `lora_model_dir` at a folder written by `newtune train` with `adapter: lora`."
        )
    ignore = (config.base_model_ignore_patterns if config else None) or None
    folder = _local_folder(base_model, ignore)
    if _is_sequence_classifier(adapter_dir):  # a (process) reward model: peft merges its class
        log.info("this adapter is a classifier's (reward model): merging in memory")
    elif folder is not None and base_shards(folder) is not None:
        problem = json_problem(folder / "config.json")
        if problem:
            raise ModelError(f"`base_model: {base_model}`: {problem}")
        base_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tied = bool(base_config.get("tie_word_embeddings", True))
        plan = plan_merge(Path(adapter_dir), tied=tied)
        if plan is not None:
            tmp = temp_dir_beside(out_dir)
            try:
                count = merge_shards(folder, plan, tmp, device=_merge_device(config))
                tokenizer.save_pretrained(tmp)
                replace_dir(tmp, out_dir)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("merged %d tensors shard by shard from %s", count, folder)
            return out_dir
        log.info("this adapter needs peft's merge: merging in memory")
    return _merge_in_memory(base_model, adapter_dir, out_dir, dtype, tokenizer, config)


def _is_sequence_classifier(adapter_dir: str) -> bool:
    """True for an adapter of a classifier: peft task type SEQ_CLS (a reward model) or
    TOKEN_CLS (a process reward model)."""
    return _adapter_task(adapter_dir) in ("SEQ_CLS", "TOKEN_CLS")


def _adapter_task(adapter_dir: str) -> str | None:
    """The peft task type an adapter was saved with (None when unreadable)."""
    try:
        text = (Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8")
        return json.loads(text).get("task_type")
    except (OSError, ValueError, AttributeError):
        return None


def _merge_device(config: NewtuneConfig | None) -> str:
    """Where the delta matmuls run: a GPU when there is one, unless `lora_on_cpu`."""
    if (config is not None and config.lora_on_cpu) or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def _local_folder(base_model: str, ignore: str | list[str] | None = None) -> Path | None:
    """The local folder of a base model (a hub id from the local cache), if it has one."""
    loc = locate(base_model)
    if loc.gguf_file:
        return None
    if loc.is_local:
        return Path(loc.name_or_path)
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                loc.name_or_path,
                allow_patterns=["*.json", "*.safetensors"],
                ignore_patterns=ignore,
            )
        )
    except Exception:  # noqa: BLE001 - the in-memory path reports hub problems clearly
        return None


def _merge_in_memory(
    base_model: str,
    adapter_dir: str,
    out_dir: Path,
    dtype: str,
    tokenizer: Any,
    config: NewtuneConfig | None = None,
) -> Path:
    """peft's merge_and_unload in fp32 on the CPU, cast to `dtype`, written atomically."""
    options = ModelOptions()
    if config is not None:  # never quantized: QLoRA adapters merge into the full weights
        full = ModelOptions.from_config(config, quantize=False)
        options = dataclasses.replace(full, device_map=None, max_memory=None)
    task = _adapter_task(adapter_dir)
    if task == "SEQ_CLS":
        options = dataclasses.replace(options, num_labels=1)
    elif task == "TOKEN_CLS":  # a process reward model: its classes, 2 unless the config says
        labels = options.num_labels or 2
        options = dataclasses.replace(options, num_labels=labels, token_classification=True)
    model = load_model(base_model, "float32", options=options)
    if config is not None:
        resize_embeddings(model, tokenizer, config)
    model = load_adapter(model, adapter_dir).merge_and_unload()
    model = model.to(DTYPES[dtype])
    model.config.name_or_path = str(out_dir)
    tmp = temp_dir_beside(out_dir)
    with torch.no_grad():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, out_dir)
    return out_dir
