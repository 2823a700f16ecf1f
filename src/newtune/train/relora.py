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
import shutil
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
BNB_STATE = (("state1", "qmap1", "absmax1"), ("state2", "qmap2", "absmax2"))  # bitsandbytes Adam
BNB_BLOCK = 256  # bitsandbytes' 8-bit optimizers quantize their state in blocks of 256


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


# -- QLoRA: a full-precision master the 4-bit weights are quantized from ----------------------
#
# Merging a delta into 4-bit weights and quantizing again would add a new rounding error at every
# restart. As Axolotl does, the merged base is kept at full precision in safetensors files (the
# base model's own files until the first restart, then output_dir/relora_base): a restart adds
# the delta there, in float32, and re-quantizes each 4-bit weight from the result, so the
# quantized weights are always quantize(master) and the errors do not compound.


def is_4bit(layer: Any) -> bool:
    """Whether a LoRA layer's base layer holds bitsandbytes 4-bit weights."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)


def weights_folder(base_model: str) -> Path:
    """The folder of the base model's safetensors files (a local folder or the hub cache)."""
    path = Path(base_model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        raise ModelError(
            f"`relora: true` with `adapter: qlora` re-quantizes the base from its full-precision "
            f"weights at each restart, and `base_model: {base_model}` is a GGUF file; point "
            "base_model at a safetensors model folder, or use `adapter: lora`"
        )
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(
                snapshot_download(
                    base_model, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]
                )
            )
        except Exception as exc:  # noqa: BLE001 - any hub failure is the same user problem
            raise ModelError(
                f"`relora: true` with `adapter: qlora` reads the full-precision weights of "
                f"`base_model: {base_model}`, which are not in the local hub cache ({exc}); "
                "download the model first"
            ) from exc
    if not any(path.glob("*.safetensors")):
        raise ModelError(
            f"`relora: true` with `adapter: qlora` reads the base model's full-precision "
            f"safetensors weights, and {path} has none; convert the model to safetensors "
            "(save_pretrained) or use `adapter: lora`"
        )
    return path


def _weight_key(model: Any, layer: Any) -> str:
    base = model.get_base_model()
    for name, module in base.named_modules():
        if module is layer:
            return f"{name}.weight"
    raise ModelError("ReLoRA: a LoRA layer is not a module of the base model")


def check_master(model: Any, folder: Path) -> None:
    """Every LoRA target's weight must be in the master files, under the same name and shape."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    bad = []
    for _, layer in lora_layers(model):
        key = _weight_key(model, layer)
        weight = layer.get_base_layer().weight
        shape = tuple(weight.quant_state.shape) if is_4bit(layer) else tuple(weight.shape)
        if shapes.get(key) != shape:
            bad.append(key)
    if bad:
        raise ModelError(
            f"`relora: true` with `adapter: qlora` keeps the merged base at full precision "
            f"beside the 4-bit model, starting from {folder}, and {len(bad)} LoRA target "
            f"weights are not there under the model's name and shape (first: {bad[0]}; resized "
            "embeddings or renamed checkpoint keys); use `adapter: lora` for this model"
        )


def requantize_(layer: Any, full: torch.Tensor) -> None:
    """Replace a 4-bit base layer's weight by the quantization of `full` (same settings)."""
    import bitsandbytes as bnb

    base = layer.get_base_layer()
    old = base.weight
    state = old.quant_state
    new = bnb.nn.Params4bit(
        full.to(state.dtype).cpu(),
        requires_grad=False,
        quant_type=old.quant_type,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_storage=old.quant_storage,
        module=base,
    )
    base.weight = new.to(old.device)


@torch.no_grad()
def merge_quantized(model: Any, source: Path, destination: Path | None) -> int:
    """Add every LoRA delta to the master weights in `source` (float32, cast back to the file's
    dtype), re-quantize the 4-bit layers from them (unquantized targets get the delta in place),
    re-draw the adapters, and (on the rank that saves) write the new master to `destination`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    layers = lora_layers(model)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    by_key = {_weight_key(model, layer): layer for _, layer in layers}
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        for key in by_key.keys() & tensors.keys():
            layer = by_key[key]
            adapter = _adapter(layer)
            delta = delta_fp32(layer, adapter, torch.device("cpu"))
            orig = tensors[key]
            tensors[key] = (orig.to(torch.float32) + delta).to(orig.dtype).contiguous()
            if is_4bit(layer):
                requantize_(layer, tensors[key])
            else:
                weight = layer.get_base_layer().weight
                merged = weight.detach().float() + delta.to(weight.device)
                weight.data.copy_(merged.to(weight.dtype))
            layer.reset_lora_parameters(adapter, _init_kind(model, adapter))
        shards[file.name] = tensors
    _barrier()  # every rank has read `source` before one replaces it
    if destination is not None:
        with atomic_dir(destination) as tmp:
            for name, tensors in shards.items():
                save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            for extra in source.iterdir():  # config, index, generation config: unchanged
                if extra.is_file() and extra.suffix == ".json":
                    shutil.copy2(extra, tmp / extra.name)
    _barrier()  # the new master is on disk before any rank reads it
    return len(layers)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


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
        entry = state.get(param, {})
        for key in ADAM_STATE:
            value = entry.get(key)
            if torch.is_tensor(value):
                prune_(value, ratio, method, generator)
                zeros += int((value == 0).sum())
                total += value.numel()
        for key, code, absmax in BNB_STATE:
            value = entry.get(key)
            if not torch.is_tensor(value):
                continue
            if value.dtype == torch.uint8:  # 8-bit blockwise: prune the values it stands for
                value = _prune_8bit(value, entry[code], entry[absmax], ratio, method, generator)
            else:  # bitsandbytes keeps small tensors' state in 32 bits
                prune_(value, ratio, method, generator)
            zeros += int((value == 0).sum())
            total += value.numel()
    return zeros, total


def _prune_8bit(
    quantized: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    ratio: float,
    method: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """Prune a bitsandbytes 8-bit state by its dequantized values, in place: a pruned entry
    gets the code of 0 (re-quantizing would not give exact zeros); return the values."""
    import bitsandbytes.functional as bnb_f

    if -(-quantized.numel() // BNB_BLOCK) != absmax.numel():
        raise ModelError(
            f"ReLoRA prunes bitsandbytes 8-bit optimizer state in blocks of {BNB_BLOCK}, and "
            f"this state has {absmax.numel()} blocks for {quantized.numel()} values; use "
            "optimizer adamw_torch"
        )
    values = bnb_f.dequantize_blockwise(quantized, absmax=absmax, code=code, blocksize=BNB_BLOCK)
    prune_(values, ratio, method, generator)
    # the pruned entries get the code of 0; the others keep their codes (and blocks their absmax)
    quantized[values.view(quantized.shape) == 0] = int(code.abs().argmin())
    return bnb_f.dequantize_blockwise(quantized, absmax=absmax, code=code, blocksize=BNB_BLOCK)


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


@torch.no_grad()
def load_quantized_base(model: Any, folder: Path) -> None:
    """Set every LoRA target's base weight from a saved master (4-bit ones re-quantized)."""
    from safetensors import safe_open

    by_key = {_weight_key(model, layer): layer for _, layer in lora_layers(model)}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in by_key.keys() & set(handle.keys()):
                layer, tensor = by_key[key], handle.get_tensor(key)
                if is_4bit(layer):
                    requantize_(layer, tensor)
                else:
                    weight = layer.get_base_layer().weight
                    weight.data.copy_(tensor.to(weight.dtype))


def base_for(adapter_dir: str | Path, base_model: str) -> str:
    """The base an adapter belongs to: its ReLoRA merged base when it has one, else base_model."""
    folder = Path(adapter_dir) / RELORA_BASE
    return str(folder) if (folder / "config.json").is_file() else base_model


# -- the callback -----------------------------------------------------------------------------


class ReLoRACallback(TrainerCallback):
    """At every `jagged_restart_steps` step: merge, re-initialise, prune, log; saves the base.

    Under QLoRA the merged base lives at full precision in output_dir/relora_base (see
    merge_quantized); checkpoints carry a copy of it."""

    def __init__(self, trainer: Any, config: Any) -> None:
        self.trainer = trainer
        self.every = int(config.jagged_restart_steps)
        self.method = config.relora_prune_method or "magnitude"
        self.ratio = prune_ratio(config)
        self.cpu_offload = bool(config.relora_cpu_offload)
        self.resume = config.resume_from_checkpoint
        self.seed = int(config.seed)
        self.restarts = 0
        self.quantized = config.adapter == "qlora"
        self.base_model = str(config.base_model)
        self.master: Path | None = None  # QLoRA: the full-precision merged base
        self.output_dir: Path | None = None
        self.saves = True

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """On resume, load the merged base the checkpoint holds (if a restart happened)."""
        self.output_dir, self.saves = Path(args.output_dir), bool(args.should_save)
        folder = Path(self.resume) / RELORA_BASE if self.resume else None
        resumed = folder is not None and folder.is_dir()
        if self.quantized:
            self.master = weights_folder(self.base_model)
            if resumed:
                assert folder is not None
                self.master = self._keep(folder)
            check_master(self.trainer.model, self.master)
            if resumed:
                load_quantized_base(self.trainer.model, self.master)
        elif resumed:
            assert folder is not None
            load_base(self.trainer.model, folder)
        if resumed:
            self.restarts = state.global_step // self.every
            log.info("ReLoRA: merged base loaded from %s", folder)
        return control

    def _keep(self, folder: Path) -> Path:
        """A checkpoint's master copied to output_dir/relora_base (checkpoints get rotated)."""
        assert self.output_dir is not None
        target = self.output_dir / RELORA_BASE
        if self.saves and folder.resolve() != target.resolve():
            with atomic_dir(target) as tmp:
                shutil.copytree(folder, tmp, dirs_exist_ok=True)
        _barrier()
        return target

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Restart before the first micro-batch of every `jagged_restart_steps`-th step."""
        if state.global_step > 0 and state.global_step % self.every == 0:
            self.restart(state.global_step)
        return control

    def restart(self, step: int) -> None:
        """Merge the adapter into the base, re-initialise it and prune its Adam state."""
        model = self.trainer.model
        params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        if self.quantized:
            assert self.master is not None and self.output_dir is not None
            target = self.output_dir / RELORA_BASE
            layers = merge_quantized(model, self.master, target if self.saves else None)
            self.master = target
        else:
            layers = merge_and_reinit(model, self.cpu_offload)
        same_on_every_rank(params)  # the re-drawn A matrices of rank 0
        seed = self.seed * 1_000_003 + step
        zeros, total = prune_optimizer(
            self.trainer.optimizer, params, self.ratio, self.method, seed
        )
        self.restarts += 1
        log.info(
            "ReLoRA restart %d at step %d: %d LoRA layers merged into the base%s and "
            "re-initialised; %s pruning zeroed %d of %d optimizer state entries (%.1f%%)",
            self.restarts,
            step,
            layers,
            " (full-precision master, 4-bit weights re-quantized)" if self.quantized else "",
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
                if self.quantized:
                    assert self.master is not None
                    with atomic_dir(folder / RELORA_BASE) as tmp:
                        shutil.copytree(self.master, tmp, dirs_exist_ok=True)
                else:
                    save_base(self.trainer.model, folder / RELORA_BASE)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Write output_dir/relora_base: the base the final adapter is trained on (under QLoRA
        it is already there after a restart, and the base model itself before any)."""
        if args.should_save and not self.quantized:
            out = save_base(self.trainer.model, Path(args.output_dir) / RELORA_BASE)
            log.info("ReLoRA: %d restarts; merged base written to %s", self.restarts, out)
        elif args.should_save and self.restarts:
            log.info(
                "ReLoRA: %d restarts; full-precision merged base in %s",
                self.restarts,
                Path(args.output_dir) / RELORA_BASE,
            )
        return control
