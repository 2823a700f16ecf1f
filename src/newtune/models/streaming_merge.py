"""Merge a LoRA adapter into safetensors shards as a stream (memory bounded by a chunk, not a model).

Each base shard is rewritten tensor by tensor and, within a tensor, block of rows by block of
rows: read the rows from the file (plain reads, not a whole-file mmap, so input pages never
count as the process's memory), add `scale * B @ A` for those rows in fp32 (on the GPU when
asked), cast back to the tensor's dtype and append the bytes to the output shard, whose
header is written first (the shapes and dtypes are known before any data is). Tensors the
adapter does not touch are copied as bytes. Tensors the adapter saved whole
(`modules_to_save`, resized embeddings) replace the base's. The fp32 temporaries live for one
block of rows. Adapters this cannot merge exactly (DoRA, LoRA biases, trainable-token deltas,
conv LoRA, a whole-tensor replacement of a tied weight) return None from `plan_merge`, and the
caller merges in memory through peft instead.

The safetensors format is simple: an 8-byte little-endian header length, a JSON header
mapping each tensor name to its dtype, shape and `data_offsets` (start and end, relative to
the end of the header), then the raw little-endian bytes of every tensor, back to back. The
safetensors library only writes a file from tensors that are all in memory at once
(`save_file`), so writing one incrementally is done here by hand; the result is an ordinary
safetensors file (`safe_open`/`load_file` read it).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

from newtune.errors import ModelError
from newtune.models.location import json_problem

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
COPIED = ("config.json", "generation_config.json")
BLOCK_BYTES = 16 * 2**20  # fp32 rows merged (or bytes copied) at a time
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on a header
ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
TORCH_DTYPES = {
    code: dtype
    for code, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }.items()
    if dtype is not None
}  # the dtypes a LoRA delta can be added to


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
        problem = json_problem(folder / INDEX)
        if problem:
            raise ModelError(problem)
        weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
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
        if a is None or b is None or a.dim() != 2 or b.dim() != 2:
            return None  # conv LoRA: peft merges it
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
    headers = {shard: read_header(base / shard) for shard in shards}
    weight_map = {info.name: shard for shard, (_, infos) in headers.items() for info in infos}
    missing = (set(plan.deltas) | set(plan.replace)) - set(weight_map)
    if missing:
        raise ModelError(
            f"the adapter changes tensors the base model does not have ({sorted(missing)[:3]}); "
            "check that `base_model` is the model the adapter was trained on"
        )
    _check_shapes(plan, {info.name: info.shape for _, infos in headers.values() for info in infos})
    total = 0
    for shard, (metadata, infos) in headers.items():
        total += write_shard(base / shard, out / shard, metadata, infos, plan, device)
    if len(shards) > 1 or (base / INDEX).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2))
    for name in COPIED:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    embed = next((n for n in plan.replace if n.endswith("embed_tokens.weight")), None)
    if embed is not None:  # embeddings resized for added tokens
        config = json.loads((out / "config.json").read_text())
        config["vocab_size"] = plan.replace[embed].shape[0]
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return sum(name in plan.deltas or name in plan.replace for name in weight_map)


def _check_shapes(plan: MergePlan, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, before anything is written, a low-rank delta whose shape is not its weight's."""
    for name, (b, a, _, transpose) in plan.deltas.items():
        target = tuple(plan.replace[name].shape) if name in plan.replace else shapes[name]
        delta = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        if tuple(target) != delta:
            raise ModelError(
                f"the adapter's update of {name} has shape {list(delta)}, but the base tensor "
                f"is {list(target)}; check that `base_model` is the model the adapter was "
                "trained on"
            )


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: name, dtype code, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> tuple[dict[str, str] | None, list[TensorInfo]]:
    """The metadata and tensors (in file order) of a safetensors file, from its header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, MAX_HEADER):
            raise ModelError(f"{path} is not a safetensors file (bad header length); copy it again")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(
                f"{path} has a broken safetensors header ({exc}); copy it again"
            ) from exc
    metadata = header.pop("__metadata__", None)
    infos = sorted(
        (
            TensorInfo(
                name,
                v["dtype"],
                tuple(v["shape"]),
                8 + length + v["data_offsets"][0],
                8 + length + v["data_offsets"][1],
            )
            for name, v in header.items()
        ),
        key=lambda info: info.start,
    )
    if infos and infos[-1].end > size:
        raise ModelError(
            f"{path} is truncated ({size} bytes, its header describes {infos[-1].end}); "
            "copy the model again"
        )
    return metadata, infos


def write_shard(
    src: Path,
    dst: Path,
    metadata: dict[str, str] | None,
    infos: list[TensorInfo],
    plan: MergePlan,
    device: str = "cpu",
) -> int:
    """Stream the merged tensors of shard `src` to `dst`; return the bytes of tensor data."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for info in infos:
        shape = tuple(plan.replace[info.name].shape) if info.name in plan.replace else info.shape
        nbytes = math.prod(shape) * _itemsize(info)
        header[info.name] = {
            "dtype": info.dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(struct.pack("<Q", len(raw)) + raw)
        for info in infos:
            if info.name in plan.deltas or info.name in plan.replace:
                for block in _merged_blocks(fin, info, plan, device):
                    fout.write(block.reshape(-1).view(torch.uint8).numpy())
                    del block
            else:
                _copy_bytes(fin, fout, info.start, info.end)
    return offset


def _itemsize(info: TensorInfo) -> int:
    """Bytes per element of a safetensors dtype code."""
    size = ITEMSIZE.get(info.dtype)
    if size is None:
        raise ModelError(
            f"tensor {info.name} has dtype {info.dtype}, which merge-lora cannot write"
        )
    return size


def _merged_blocks(
    fin: BinaryIO, info: TensorInfo, plan: MergePlan, device: str
) -> Iterator[torch.Tensor]:
    """The rows of one merged tensor, a block at a time, in the base tensor's dtype."""
    dtype = TORCH_DTYPES.get(info.dtype)
    if dtype is None:
        raise ModelError(
            f"tensor {info.name} has dtype {info.dtype}, which merge-lora cannot merge"
        )
    replaced = plan.replace.get(info.name)
    shape = tuple(replaced.shape) if replaced is not None else info.shape
    rows = shape[0] if shape else 1
    row_elems = math.prod(shape[1:]) if shape else 1
    step = max(1, BLOCK_BYTES // max(1, row_elems * 4))
    delta = plan.deltas.get(info.name)
    if delta is not None:
        b, a, scale, transpose = delta
        # rows i:j of B @ A are B[i:j] @ A; of (B @ A).T they are A[:, i:j].T @ B.T
        left, right = (a.T, b.T) if transpose else (b, a)
        left, right = left.to(device, torch.float32), right.to(device, torch.float32)
    for i in range(0, rows, step):
        j = min(rows, i + step)
        if replaced is not None:
            block = replaced.reshape(rows, -1)[i:j].to(dtype)
        else:
            block = _read_rows(fin, info, dtype, row_elems, i, j)
        if delta is not None:
            merged = block.to(device, torch.float32)
            merged.addmm_(left[i:j], right, alpha=scale)
            block = merged.to(dtype).cpu()
            del merged
        yield block.contiguous()


def _read_rows(
    fin: BinaryIO, info: TensorInfo, dtype: torch.dtype, row_elems: int, i: int, j: int
) -> torch.Tensor:
    """Rows i:j of a tensor, read from the file into fresh memory (no mmap)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    fin.seek(info.start + i * row_elems * itemsize)
    buf = bytearray((j - i) * row_elems * itemsize)
    if not buf:
        return torch.empty((j - i, row_elems), dtype=dtype)
    if fin.readinto(buf) != len(buf):
        raise ModelError(f"{fin.name} ended inside tensor {info.name}; copy the model again")
    return torch.frombuffer(buf, dtype=dtype).view(j - i, row_elems)


def _copy_bytes(fin: BinaryIO, fout: BinaryIO, start: int, end: int) -> None:
    """Copy bytes start:end of `fin` to `fout`, a block at a time."""
    fin.seek(start)
    left = end - start
    while left:
        chunk = fin.read(min(left, BLOCK_BYTES))
        if not chunk:
            raise ModelError(f"{fin.name} is truncated; copy the model again")
        fout.write(chunk)
        left -= len(chunk)
