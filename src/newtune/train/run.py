"""The train command's work: data, model, adapter, Trainer, and the saved outputs."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from transformers import Trainer

from newtune.config.load import LoadedConfig
from newtune.config.resolve import RunPlan, resolve
from newtune.config.secrets import redact
from newtune.data.collate import PadCollator
from newtune.data.prepare import PreparedData, prepare
from newtune.models.adapters import attach_lora, describe_parameters
from newtune.models.load import load_model
from newtune.models.tokenizer import load_tokenizer
from newtune.train.args import build_training_args

log = logging.getLogger(__name__)

CONFIG_FILE = "newtune_config.yml"


def prepare_data(loaded: LoadedConfig, force: bool = False) -> tuple[Any, PreparedData]:
    """Load the tokenizer and prepare (or reuse) the tokenized dataset."""
    tokenizer = load_tokenizer(loaded.config)
    return tokenizer, prepare(loaded.config, tokenizer, tokenizer.chat_template, force=force)


def train(loaded: LoadedConfig, plan: RunPlan | None = None) -> Path:
    """Train as the config says; return the output folder."""
    config = loaded.config
    plan = plan or resolve(config)
    tokenizer, prepared = prepare_data(loaded)
    log.info("prepared data: %s (%s)", prepared.path, "reused" if prepared.reused else "new")
    model = load_model(config.base_model, plan.dtype, attn=config.attn_implementation or "sdpa")
    if plan.train_mode in ("lora", "qlora"):
        model = attach_lora(model, config)
    log.info(describe_parameters(model))
    eval_ds = prepared.data.get("test", None)
    trainer = Trainer(
        model=model,
        args=build_training_args(config, plan, has_eval=eval_ds is not None),
        train_dataset=prepared.data["train"],
        eval_dataset=eval_ds,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    result = trainer.train()
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    out = Path(config.output_dir)
    if trainer.is_world_process_zero():
        save_outputs(trainer.model, tokenizer, loaded, prepared, metrics, out, trainer.state)
    return out


def save_outputs(
    model: Any,
    tokenizer: Any,
    loaded: LoadedConfig,
    prepared: PreparedData,
    metrics: dict[str, Any],
    out: Path,
    state: Any,
) -> None:
    """Write weights (or adapter), tokenizer, config and reports to a temp folder, then move."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-save-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    resolved = redact(loaded.config.model_dump(mode="json"))
    (tmp / CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
    (tmp / "stats.json").write_text(json.dumps(prepared.stats, indent=2))
    (tmp / "train_results.json").write_text(json.dumps(metrics, indent=2))
    (tmp / "log_history.json").write_text(json.dumps(state.log_history, indent=2))
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()
