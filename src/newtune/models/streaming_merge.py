"""Merge a LoRA adapter into safetensors shards one shard at a time (bounded memory).

For each base shard: read its tensors, add `scale * B @ A` (fp32 math, cast back to the
tensor's dtype) to every adapted weight in it, replace the tensors the adapter saved whole
(`modules_to_save`, resized embeddings), and write the shard. Peak memory is about one shard
plus the adapter, whatever the model's size. Adapters this cannot merge exactly (DoRA, LoRA
biases, trainable-token deltas, a whole-tensor replacement of a tied weight) return None from
`plan_merge`, and the caller merges in memory through peft instead.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from newtune.errors import ModelError

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
COPIED = ("config.json", "generation_config.json")


@dataclass
class MergePlan:
    """What to do to the base tensors: low-rank deltas and whole replacements, by name."""

    deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = field(
        default_factory=dict
    )  # weight -> (B, A, scale, transpose)
    replace: dict[str, torch.Tensor] = field(default_factory=dict)


def base_shards(folder: Path) -> list[str] | None:
    """The safetensors shard files of a model folder, or None if it has none."""
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    if (folder / SINGLE).is_file():
        return [SINGLE]
    return None


def _alpha(module: str, config: dict) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(alpha)
    return float(config["lora_alpha"])


def plan_merge(adapter_dir: Path, tied: bool) -> MergePlan | None:
    """Read the adapter into a merge plan; None when only peft can merge it exactly."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("lora_bias") or config.get("peft_type") != "LORA":
        return None
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), "pt") as f:
        tensors = {k.removeprefix(PREFIX): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    plan = MergePlan()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_[AB])", name)
        if match:
            module = match.group(1) or match.group(3)
            pairs.setdefault(module, {})[match.group(2) or match.group(4)] = tensor
        elif name.endswith(".base_layer.weight"):
            plan.replace[name.removesuffix(".base_layer.weight") + ".weight"] = tensor
        elif name.endswith((".weight", ".bias")) and "lora_" not in name:
            if tied and name == "lm_head.weight":
                return None
            plan.replace[name] = tensor
        else:
            log.info("adapter tensor %s needs peft's merge", name)
            return None
    for module, parts in pairs.items():
        if "lora_A" in parts:
            a, b, embedding = parts.get("lora_A"), parts.get("lora_B"), False
        else:
            a, b, embedding = parts.get("lora_embedding_A"), parts.get("lora_embedding_B"), True
        if a is None or b is None:
            return None
        rank = a.shape[0]
        alpha = _alpha(module, config)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        transpose = embedding or bool(config.get("fan_in_fan_out"))
        plan.deltas[module + ".weight"] = (b, a, scale, transpose)
    if tied and "lm_head.weight" in plan.deltas:
        return None  # the tied head is not stored on its own
    return plan


def merge_shards(base: Path, plan: MergePlan, out: Path, device: str = "cpu") -> int:
    """Write the merged shards, index and config to `out`; return the merged tensor count."""
    shards = base_shards(base)
    if shards is None:
        raise ModelError(f"{base} has no safetensors weights to merge into")
    done = 0
    weight_map: dict[str, str] = {}
    total = 0
    vocab_rows: int | None = None
    for shard in shards:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(base / shard), "pt") as f:
            metadata = f.metadata()
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensors[name] = _merged(name, f.get_tensor(name), plan, device)
                done += name in plan.deltas or name in plan.replace
                weight_map[name] = shard
                total += tensors[name].numel() * tensors[name].element_size()
                if name.endswith("embed_tokens.weight") and name in plan.replace:
                    vocab_rows = tensors[name].shape[0]
        save_file(tensors, str(out / shard), metadata=metadata or {"format": "pt"})
        del tensors
    missing = (set(plan.deltas) | set(plan.replace)) - set(weight_map)
    if missing:
        raise ModelError(
            f"the adapter changes tensors the base model does not have ({sorted(missing)[:3]}); "
            "check that `base_model` is the model the adapter was trained on"
        )
    if len(shards) > 1 or (base / INDEX).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2))
    for name in COPIED:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    if vocab_rows is not None:  # embeddings resized for added tokens
        config = json.loads((out / "config.json").read_text())
        config["vocab_size"] = vocab_rows
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return done


def _merged(name: str, tensor: torch.Tensor, plan: MergePlan, device: str) -> torch.Tensor:
    if name in plan.replace:
        tensor = plan.replace[name].to(tensor.dtype)
    if name in plan.deltas:
        b, a, scale, transpose = plan.deltas[name]
        delta = (b.to(device).float() @ a.to(device).float()) * scale
        merged = tensor.to(device).float() + (delta.T if transpose else delta)
        tensor = merged.to(tensor.dtype).cpu()
    return tensor.contiguous()
