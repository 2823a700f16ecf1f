"""ReLoRA (arXiv 2307.05695): merge the LoRA delta into the base weights at every restart,
re-initialise the adapter, prune its optimizer state, and warm the lr up again (jagged schedule).

Axolotl's `monkeypatch/relora.py` and `JaggedLRRestartScheduler` define the behaviour; this
module re-implements it on peft's LoRA layers: the merge is computed in float32 and cast back to
the weight's dtype, the adapter is re-drawn with peft's own initialisation, and the pruning
zeroes exactly round(ratio x size) entries of each Adam state tensor.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from newtune.errors import ConfigError, ModelError
from newtune.fileio import atomic_dir

log = logging.getLogger(__name__)

RELORA_BASE = "relora_base"  # output_dir/relora_base: the merged-so-far base model
DEFAULT_WARMUP = 10
DEFAULT_ANNEAL = 1
DEFAULT_MIN_SCALE = 0.001
FULL_RESET_RATIO = 0.999  # `relora_prune_method: reset` (the paper's near-full reset)
DEFAULT_PRUNE_RATIO = 0.9
ADAM_STATE = ("exp_avg", "exp_avg_sq")


# -- the jagged schedule ----------------------------------------------------------------------


@dataclass(frozen=True)
class Jagged:
    """Restart period, warm-up after and anneal before each restart, and the lowest lr scale."""

    restart: int
    warmup: int = DEFAULT_WARMUP
    anneal: int = DEFAULT_ANNEAL
    min_scale: float = DEFAULT_MIN_SCALE

    @classmethod
    def from_config(cls, config: Any) -> Jagged | None:
        """The config's jagged restarts (`jagged_restart_*`), or None when not set."""
        if not config.jagged_restart_steps:
            return None
        return cls(
            config.jagged_restart_steps,
            _unset(config.jagged_restart_warmup_steps, DEFAULT_WARMUP),
            _unset(config.jagged_restart_anneal_steps, DEFAULT_ANNEAL),
            config.cosine_min_lr_ratio or DEFAULT_MIN_SCALE,
        )


def _unset(value: int | None, default: int) -> int:
    return default if value is None else value


def jagged_factor(step: int, jagged: Jagged) -> float:
    """Multiplier of the inner schedule's lr at `step` (Axolotl's JaggedLRRestartScheduler)."""
    if step < jagged.restart - jagged.anneal:
        return 1.0
    progress = step % jagged.restart
    if progress < jagged.warmup:
        cycle = min(1.0, progress / jagged.warmup)
    elif progress > jagged.restart - jagged.anneal:
        cycle = min(1.0, (jagged.restart - progress) / jagged.anneal)
    else:
        cycle = 1.0
    return cycle * (1.0 - jagged.min_scale) + jagged.min_scale


def _product(inner: Any, jagged: Jagged, step: int) -> float:
    return inner(step) * jagged_factor(step, jagged)


def jagged_scheduler(inner: Any, optimizer: Any, jagged: Jagged) -> LambdaLR:
    """A LambdaLR whose factor is the inner LambdaLR's factor times the jagged factor."""
    if not isinstance(inner, LambdaLR):
        raise ConfigError(
            f"`jagged_restart_steps` scales a step-wise schedule, and the configured one "
            f"({type(inner).__name__}) is not; use lr_scheduler cosine, linear or constant"
        )
    factors = [partial(_product, f, jagged) for f in inner.lr_lambdas]
    return LambdaLR(optimizer, factors, last_epoch=inner.last_epoch - 1)  # its init steps once


# -- the restart: merge, re-initialise, prune -------------------------------------------------


def lora_layers(model: Any) -> list[tuple[str, Any]]:
    """(name, peft LoraLayer) of every LoRA-wrapped module of the model."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _adapter(layer: Any) -> str:
    active = layer.active_adapter
    if isinstance(active, list | tuple):
        if len(active) != 1:
            raise ModelError(f"ReLoRA merges one active LoRA adapter; this layer has {active}")
        return active[0]
    return active


def delta_fp32(layer: Any, adapter: str, device: Any) -> torch.Tensor:
    """The layer's LoRA delta weight computed in float32 on `device`."""
    from peft.tuners.lora import Embedding, Linear
    from peft.utils import transpose

    scaling = layer.scaling[adapter]
    if isinstance(layer, Linear):
        a = layer.lora_A[adapter].weight.detach().to(device, torch.float32)
        b = layer.lora_B[adapter].weight.detach().to(device, torch.float32)
        return transpose(b @ a, layer.fan_in_fan_out) * scaling
    if isinstance(layer, Embedding):
        a = layer.lora_embedding_A[adapter].detach().to(device, torch.float32)
        b = layer.lora_embedding_B[adapter].detach().to(device, torch.float32)
        return transpose(b @ a, True) * scaling
    return layer.get_delta_weight(adapter).detach().to(device, torch.float32)


def _init_kind(model: Any, adapter: str) -> Any:
    config = getattr(model, "peft_config", {}).get(adapter)
    kind = getattr(config, "init_lora_weights", True)
    return kind if kind == "gaussian" else True  # both give B = 0: the model is unchanged


@torch.no_grad()
def merge_and_reinit(model: Any, cpu_offload: bool = False) -> int:
    """Add every LoRA delta to its base weight (float32, cast back) and re-draw the adapter
    with peft's initialisation (B = 0); return the number of layers merged."""
    layers = lora_layers(model)
    for _, layer in layers:
        adapter = _adapter(layer)
        weight = layer.get_base_layer().weight
        device = torch.device("cpu") if cpu_offload else weight.device
        merged = weight.detach().to(device, torch.float32) + delta_fp32(layer, adapter, device)
        weight.data.copy_(merged.to(weight.dtype))
        layer.reset_lora_parameters(adapter, _init_kind(model, adapter))
    return len(layers)


def _prune_count(numel: int, ratio: float) -> int:
    return min(numel, int(math.floor(ratio * numel + 0.5)))


@torch.no_grad()
def prune_(
    tensor: torch.Tensor, ratio: float, method: str, generator: torch.Generator | None = None
) -> None:
    """Zero round(ratio x size) entries: the smallest by magnitude, or a random set."""
    count = _prune_count(tensor.numel(), ratio)
    if count == 0:
        return
    flat = tensor.view(-1)
    if method == "magnitude":
        order = flat.abs().float().argsort(stable=True)
        flat[order[:count]] = 0
    else:  # random, reset
        order = torch.randperm(flat.numel(), generator=generator)[:count]
        flat[order.to(flat.device)] = 0


def prune_optimizer(
    optimizer: Any, params: list[torch.nn.Parameter], ratio: float, method: str, seed: int = 0
) -> tuple[int, int]:
    """Prune the Adam state of `params`; return (zeros, entries) over the pruned tensors.

    Random choices come from a CPU generator seeded with `seed`, so every rank prunes alike."""
    generator = torch.Generator().manual_seed(seed)
    zeros = total = 0
    state = getattr(optimizer, "optimizer", optimizer).state  # accelerate's wrapper
    for param in params:
        for key in ADAM_STATE:
            value = state.get(param, {}).get(key)
            if torch.is_tensor(value):
                prune_(value, ratio, method, generator)
                zeros += int((value == 0).sum())
                total += value.numel()
    return zeros, total


def prune_ratio(config: Any) -> float:
    """`relora_prune_ratio`, else 0.999 for `reset` and 0.9 otherwise (Axolotl's defaults)."""
    if config.relora_prune_ratio is not None:
        return float(config.relora_prune_ratio)
    return FULL_RESET_RATIO if config.relora_prune_method == "reset" else DEFAULT_PRUNE_RATIO


def same_on_every_rank(params: list[torch.nn.Parameter]) -> None:
    """Under DDP, broadcast rank 0's values (re-drawn adapters must agree across ranks)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for param in params:
            dist.broadcast(param.data, src=0)


# -- the merged base on disk ------------------------------------------------------------------


def base_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The base model's weights without LoRA tensors, under the base model's own names."""
    base = model.get_base_model()
    out = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor.detach().contiguous()
    return out


def save_base(model: Any, folder: Path) -> Path:
    """Write the merged-so-far base model (safetensors + config) to `folder`, atomically."""
    base = model.get_base_model()
    with atomic_dir(folder) as tmp:
        base.save_pretrained(tmp, state_dict=base_state_dict(model), safe_serialization=True)
    return folder


def load_base(model: Any, folder: Path) -> None:
    """Load a saved merged base into the (peft) model's base weights."""
    from safetensors.torch import load_file

    named = {
        name.replace(".base_layer.", "."): param
        for name, param in model.get_base_model().state_dict(keep_vars=True).items()
        if "lora_" not in name
    }
    for file in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            if name in named:
                with torch.no_grad():
                    named[name].data.copy_(tensor.to(named[name].dtype))


def base_for(adapter_dir: str | Path, base_model: str) -> str:
    """The base an adapter belongs to: its ReLoRA merged base when it has one, else base_model."""
    folder = Path(adapter_dir) / RELORA_BASE
    return str(folder) if (folder / "config.json").is_file() else base_model


# -- the callback -----------------------------------------------------------------------------


class ReLoRACallback(TrainerCallback):
    """At every `jagged_restart_steps` step: merge, re-initialise, prune, log; saves the base."""

    def __init__(self, trainer: Any, config: Any) -> None:
        self.trainer = trainer
        self.every = int(config.jagged_restart_steps)
        self.method = config.relora_prune_method or "magnitude"
        self.ratio = prune_ratio(config)
        self.cpu_offload = bool(config.relora_cpu_offload)
        self.resume = config.resume_from_checkpoint
        self.seed = int(config.seed)
        self.restarts = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """On resume, load the merged base the checkpoint holds (if a restart happened)."""
        folder = Path(self.resume) / RELORA_BASE if self.resume else None
        if folder is not None and folder.is_dir():
            load_base(self.trainer.model, folder)
            self.restarts = state.global_step // self.every
            log.info("ReLoRA: merged base loaded from %s", folder)
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Restart before the first micro-batch of every `jagged_restart_steps`-th step."""
        if state.global_step > 0 and state.global_step % self.every == 0:
            self.restart(state.global_step)
        return control

    def restart(self, step: int) -> None:
        """Merge the adapter into the base, re-initialise it and prune its Adam state."""
        model = self.trainer.model
        params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        layers = merge_and_reinit(model, self.cpu_offload)
        same_on_every_rank(params)  # the re-drawn A matrices of rank 0
        seed = self.seed * 1_000_003 + step
        zeros, total = prune_optimizer(
            self.trainer.optimizer, params, self.ratio, self.method, seed
        )
        self.restarts += 1
        log.info(
            "ReLoRA restart %d at step %d: %d LoRA layers merged into the base and "
            "re-initialised; %s pruning zeroed %d of %d optimizer state entries (%.1f%%)",
            self.restarts,
            step,
            layers,
            self.method,
            zeros,
            total,
            100 * zeros / max(1, total),
        )

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
        """Every log line carries the number of restarts so far (Axolotl's num_lora_restarts)."""
        if logs is not None:  # first callback: trackers see it; log_history holds a copy
            logs["num_lora_restarts"] = self.restarts
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["num_lora_restarts"] = self.restarts
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """A checkpoint after a restart holds the merged base, so a resume continues from it."""
        if self.restarts and args.should_save:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                save_base(self.trainer.model, folder / RELORA_BASE)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Write output_dir/relora_base: the base the final adapter is trained on."""
        if args.should_save:
            out = save_base(self.trainer.model, Path(args.output_dir) / RELORA_BASE)
            log.info("ReLoRA: %d restarts; merged base written to %s", self.restarts, out)
        return control
