"""Derive the run plan from a validated config. Validation checks; this step derives."""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from newtune.config.compat import attention
from newtune.config.schema import NewtuneConfig

NVIDIA_SMI_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RunPlan:
    """Values derived from the config and the environment, fixed for the whole run."""

    world_size: int
    rank: int
    local_rank: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    dtype: str  # "bfloat16" | "float16" | "float32"
    mixed_precision: str  # "bf16" | "fp16" | "no"
    device: str  # "cuda" | "mps" | "cpu"
    attn_implementation: str
    train_mode: str  # "lora" | "qlora" | "full"
    adapter: str
    datasets: tuple[str, ...]
    output_dir: str
    prepared_data_root: str
    merged_dir: str

    @property
    def is_main_process(self) -> bool:
        """True on the process that prepares data, logs and saves."""
        return self.rank == 0

    def as_dict(self) -> dict[str, Any]:
        """The plan as plain values (for printing)."""
        return asdict(self)


def _torch_probe(torch: Any) -> tuple[str, bool]:
    """Ask an already imported torch, as training does.

    bf16 means native support (compute capability >= 8.0, or ROCm), the same test as the
    nvidia-smi probe, so `validate` and `train` agree; emulated bf16 would only be slow.
    """
    if torch.cuda.is_available():
        return "cuda", bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps", False
    return "cpu", False


def _torch_build() -> dict[str, str | None] | None:
    """`cuda` / `hip` of the installed torch, read from torch/version.py without importing torch.

    None when torch is not installed; an empty dict when its version file cannot be read.
    """
    spec = importlib.util.find_spec("torch")
    if spec is None:
        return None
    if not spec.submodule_search_locations:
        return {}
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except (OSError, StopIteration):
        return {}
    build: dict[str, str | None] = {}
    for key in ("cuda", "hip"):
        match = re.search(rf"^{key}\s*(?::[^=\n]*)?=\s*(.+?)\s*$", text, re.MULTILINE)
        if match:
            value = match.group(1).strip("'\"")
            build[key] = None if value == "None" else value
    return build


def _visible_indices(env: dict[str, str]) -> list[int] | None:
    """The GPU indices CUDA_VISIBLE_DEVICES selects; None means all (unset or not indices)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    indices: list[int] = []
    for part in value.split(","):
        part = part.strip()
        if not part.lstrip("-").isdigit():
            return None if part else indices  # UUIDs / MIG names: cannot map, assume all
        if int(part) < 0:
            break  # CUDA stops at the first invalid index
        indices.append(int(part))
    return indices


@functools.lru_cache(maxsize=1)
def _nvidia_compute_caps() -> tuple[float, ...] | None:
    """Compute capability of every GPU `nvidia-smi` lists; None when there is none to ask."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    caps = []
    for line in proc.stdout.splitlines():
        try:
            caps.append(float(line.strip()))
        except ValueError:
            continue
    return tuple(caps) or None


def probe_device() -> tuple[str, bool]:
    """(device, bf16 supported) for this machine, importing torch only when it must.

    If torch is already imported it is asked, as training does. Otherwise: no torch means
    `cpu`; a CUDA build of torch and a GPU that `nvidia-smi` reports (and CUDA_VISIBLE_DEVICES
    does not hide) means `cuda`, with bf16 when every visible GPU has compute capability >= 8.0;
    Apple silicon means `mps`; anything else `cpu`.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        return _torch_probe(torch)
    build = _torch_build()
    if build is None:
        return "cpu", False
    if build.get("hip"):  # ROCm: no nvidia-smi to ask, so ask torch itself
        import torch

        return _torch_probe(torch)
    if build.get("cuda", "unknown") is not None:
        caps = _nvidia_compute_caps()
        if caps is not None:
            visible = _visible_indices(dict(os.environ))
            if visible is not None:
                caps = tuple(caps[i] for i in visible if i < len(caps))
            if caps:
                return "cuda", min(caps) >= 8.0
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mps", False
    return "cpu", False


def resolve(
    config: NewtuneConfig,
    env: dict[str, str] | None = None,
    *,
    probe: Callable[[], tuple[str, bool]] | None = None,
) -> RunPlan:
    """Compute world size, batch size, precision and device for this config.

    `probe` returns (device, bf16 supported); the default is `probe_device`.
    """
    env = dict(os.environ) if env is None else env
    world_size = int(env.get("WORLD_SIZE", "1"))
    device, bf16_ok = (probe or probe_device)()
    bf16_ok = device == "cuda" and bf16_ok
    use_bf16 = bf16_ok if config.bf16 == "auto" else bool(config.bf16)
    if use_bf16:
        dtype, mixed = "bfloat16", "bf16"
    elif config.fp16:
        dtype, mixed = "float16", "fp16"
    elif config.float16:  # Axolotl's non-AMP float16: float16 weights, no mixed precision
        dtype, mixed = "float16", "no"
    else:
        dtype, mixed = "float32", "no"
    accumulation = accumulation_steps(config)
    return RunPlan(
        world_size=world_size,
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        gradient_accumulation_steps=accumulation,
        effective_batch_size=config.micro_batch_size * accumulation * world_size,
        dtype=dtype,
        mixed_precision=mixed,
        device=device,
        attn_implementation=attention(config),  # xformers is read as sdpa
        train_mode=config.adapter or "full",
        adapter=_adapter_summary(config),
        datasets=tuple(f"{e.path} (type: {e.type}, split: {e.split})" for e in config.datasets),
        output_dir=config.output_dir,
        prepared_data_root=config.dataset_prepared_path,
        merged_dir=str(Path(config.output_dir) / "merged"),
    )


def accumulation_steps(config: NewtuneConfig) -> int:
    """gradient_accumulation_steps, derived from batch_size / micro_batch_size when given."""
    if (
        config.batch_size is not None
        and "gradient_accumulation_steps" not in config.model_fields_set
    ):
        return max(1, config.batch_size // config.micro_batch_size)
    return config.gradient_accumulation_steps


def _adapter_summary(config: NewtuneConfig) -> str:
    if config.adapter is None:
        return "none: all weights are trained"
    modules = config.lora_target_modules
    if isinstance(modules, str):
        targets = f"modules whose full name matches the regex {modules!r}"
    elif config.lora_target_linear:
        extra = f" and {', '.join(modules)}" if modules else ""
        targets = f"all linear layers{extra}"
    else:
        targets = ", ".join(modules) if modules else "the model type's default"
    source = f", continuing {config.lora_model_dir}" if config.lora_model_dir else ""
    return (
        f"{config.adapter} r={config.lora_r} alpha={config.lora_alpha} "
        f"dropout={config.lora_dropout} on {targets}{source}"
    )
