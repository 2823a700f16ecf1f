"""Cross-key rules and not-implemented keys: checks on a validated config, no mutation."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

from newtune.config.keys import is_off
from newtune.config.schema import DatasetEntry, NewtuneConfig, status_of
from newtune.data.strategies.registry import type_problems


@dataclass
class Findings:
    """Errors (the config cannot run) and warnings (it runs, but probably not as meant)."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _both(names: Callable[[str], str], a: str, b: str, why: str) -> str:
    return f"`{names(a)}` and `{names(b)}` are both set; {why}"


def check_rules(cfg: NewtuneConfig, names: Callable[[str], str] = str) -> Findings:
    """Every cross-key rule; messages name the keys as the user spelled them."""
    out = Findings()
    err = out.errors.append
    if cfg.warmup_steps is not None and cfg.warmup_ratio is not None:
        err(_both(names, "warmup_steps", "warmup_ratio", "keep one of them"))
    if cfg.eval_steps is not None and cfg.evals_per_epoch is not None:
        err(_both(names, "eval_steps", "evals_per_epoch", "keep one of them"))
    if cfg.save_steps is not None and cfg.saves_per_epoch is not None:
        err(_both(names, "save_steps", "saves_per_epoch", "keep one of them"))
    if cfg.val_set_size and cfg.test_datasets:
        err(_both(names, "val_set_size", "test_datasets", "evaluate on one or the other"))
    if cfg.load_in_8bit and cfg.load_in_4bit:
        err(_both(names, "load_in_8bit", "load_in_4bit", "choose one quantization"))
    if cfg.bf16 and cfg.fp16:
        err(_both(names, "bf16", "fp16", "choose one precision"))
    batch_keys = [
        k
        for k in ("micro_batch_size", "gradient_accumulation_steps", "batch_size")
        if k in cfg.model_fields_set
    ]
    if len(batch_keys) == 3:
        err(
            "`micro_batch_size`, `gradient_accumulation_steps` and `batch_size` are all set; "
            "set at most two (batch_size = micro_batch_size x gradient_accumulation_steps)"
        )
    elif cfg.batch_size is not None and cfg.batch_size % cfg.micro_batch_size:
        err(
            f"`batch_size: {cfg.batch_size}` is not a multiple of "
            f"`micro_batch_size: {cfg.micro_batch_size}`"
        )
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        err("`adapter: qlora` requires `load_in_4bit: true`")
    if cfg.lora_target_linear and cfg.lora_target_modules:
        err(
            _both(
                names,
                "lora_target_modules",
                "lora_target_linear",
                "lora_target_linear already adapts every linear layer; keep one",
            )
        )
    if cfg.sample_packing and cfg.group_by_length:
        err(
            _both(
                names,
                "sample_packing",
                "group_by_length",
                "packing already groups samples into full rows; keep one",
            )
        )
    if (
        cfg.attn_implementation == "flash_attention_2"
        and importlib.util.find_spec("flash_attn") is None
    ):
        err(
            "`attn_implementation: flash_attention_2` needs the flash-attn package, which is not "
            "installed; on a CUDA machine run `pip install 'newtune[flash-attn]'` (or "
            "`pip install flash-attn --no-build-isolation`), or use `attn_implementation: sdpa`"
        )
    if cfg.save_safetensors is False:
        err(
            "`save_safetensors: false` asks for pickle weights; newtune always writes "
            "safetensors (loadable everywhere, safe to open); remove the key"
        )
    if cfg.adapter is None:
        set_lora = sorted(
            k for k in cfg.model_fields_set if k.startswith("lora_") and k != "lora_model_dir"
        )
        if set_lora:
            out.warnings.append(
                f"{', '.join(f'`{k}`' for k in set_lora)} set without `adapter`; "
                "they are ignored and all weights are trained"
            )
    return out


def _unimplemented_in(model: NewtuneConfig | DatasetEntry, prefix: str) -> list[str]:
    found = []
    for name, info in type(model).model_fields.items():
        meta = status_of(info)
        if meta["status"] in ("implemented", "ignored"):
            continue
        value = getattr(model, name)
        if is_off(value):
            continue
        what = "is not implemented by newtune"
        if meta["status"].startswith("planned: "):
            what = f"is not implemented by newtune yet (planned with the {meta['status'][9:]} work)"
        alt = f"; use {meta['alternative']} instead" if "alternative" in meta else ""
        found.append(f"`{prefix}{name}: {value!r}` {what}{alt}; remove it or set it to null")
    return found


def check_unimplemented(cfg: NewtuneConfig) -> list[str]:
    """Keys that newtune knows but does not implement, set to a value that asks for something."""
    found = _unimplemented_in(cfg, "")
    for i, entry in enumerate(cfg.datasets):
        found += _unimplemented_in(entry, f"datasets[{i}].")
        # unknown formats (registry, name.load_fn, plugins, dotted paths), bad `:style`,
        # bad user-defined `type:` mappings and format keys the type does not read
        found += type_problems(entry, i)
    return found


def ignored_keys(cfg: NewtuneConfig) -> list[str]:
    """Notes for ignored keys that were given a value."""
    notes = []
    for name in sorted(cfg.model_fields_set):
        info = type(cfg).model_fields[name]
        if status_of(info)["status"] == "ignored" and getattr(cfg, name) is not None:
            notes.append(f"`{name}` is ignored: {info.description}")
    return notes
