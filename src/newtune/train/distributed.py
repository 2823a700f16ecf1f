"""DeepSpeed, FSDP and DDP options -> TrainingArguments keyword arguments.

newtune writes no distributed code: the DeepSpeed JSON and the FSDP settings go to
transformers' TrainingArguments, which hands them to accelerate. This module finds and
completes the DeepSpeed JSON, maps Axolotl's FSDP spellings, and gathers sharded weights
for the final save.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

from newtune.config.resolve import RunPlan, resolve
from newtune.config.schema import NewtuneConfig
from newtune.config.schema.distributed import fsdp_config_key, fsdp_option_list
from newtune.errors import ConfigError

SHIPPED_DIR = "deepspeed_configs"  # inside the newtune package, and at the repository root
FSDP1_STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard")


def shipped_deepspeed_configs() -> list[str]:
    """Names of the DeepSpeed configs shipped with newtune (zero1.json, ...)."""
    folder = resources.files("newtune") / SHIPPED_DIR
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".json"))


def find_deepspeed_file(value: str, config_dir: Path | None = None) -> Path:
    """The DeepSpeed JSON a `deepspeed:` path names: as given, beside the config, or shipped."""
    given = Path(value).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given]
    if config_dir is not None and not given.is_absolute():
        candidates.append(config_dir / given)
    name = given.name if given.suffix == ".json" else f"{given.name}.json"
    if given.parent in (Path("."), Path(SHIPPED_DIR)):
        candidates.append(Path(str(resources.files("newtune") / SHIPPED_DIR / name)))
    for path in candidates:
        if path.is_file():
            return path.resolve()
    tried = ", ".join(str(p) for p in candidates)
    raise ConfigError(
        f"`deepspeed: {value}` names no file (tried {tried}). Give a JSON path relative to the "
        f"working directory or the config file, or a shipped config: "
        f"{', '.join(f'{SHIPPED_DIR}/{n}' for n in shipped_deepspeed_configs())}."
    )


def load_deepspeed_config(value: str | dict[str, Any], config_dir: Path | None = None) -> dict:
    """The DeepSpeed config a `deepspeed:` value names, as a fresh dict."""
    if isinstance(value, dict):
        return copy.deepcopy(value)
    path = find_deepspeed_file(value, config_dir)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"`deepspeed: {value}`: {path} is not valid JSON (line {exc.lineno}: {exc.msg})."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"`deepspeed: {value}`: {path} must hold a JSON object.")
    return data


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _check_fixed(ds: dict, config: NewtuneConfig, plan: RunPlan, source: str) -> None:
    """Values the DeepSpeed JSON fixes (not "auto") must agree with the newtune config."""
    precision = plan.mixed_precision
    checks = [
        ("bf16.enabled", precision == "bf16", "bf16", "bf16: true"),
        ("fp16.enabled", precision == "fp16", "fp16", "fp16: true"),
        (
            "train_micro_batch_size_per_gpu",
            config.micro_batch_size,
            "micro_batch_size",
            f"micro_batch_size: {_get(ds, 'train_micro_batch_size_per_gpu')}",
        ),
        (
            "gradient_accumulation_steps",
            plan.gradient_accumulation_steps,
            "gradient_accumulation_steps",
            f"gradient_accumulation_steps: {_get(ds, 'gradient_accumulation_steps')}",
        ),
    ]
    for ds_key, ours, key, fix in checks:
        value = _get(ds, ds_key)
        if value is None or value == "auto":
            continue
        if bool(value) != ours if isinstance(ours, bool) else value != ours:
            raise ConfigError(
                f"`deepspeed: {source}` sets `{ds_key}: {json.dumps(value)}` but the config's "
                f'`{key}` gives {json.dumps(ours)} on this machine; set `"{ds_key}": "auto"` '
                f"in the DeepSpeed JSON (it is then filled from the config), or set `{fix}`."
            )


def complete_deepspeed_config(
    ds: dict[str, Any], config: NewtuneConfig, plan: RunPlan, source: str
) -> dict[str, Any]:
    """Fill what transformers' HfTrainerDeepSpeedConfig leaves open; check what it would reject.

    transformers fills the "auto" batch sizes, accumulation, clipping, optimizer and scheduler
    parameters, bf16/fp16 and the ZeRO bucket sizes. newtune also needs ZeRO-3 to gather whole
    16-bit weights for the final save, and an offloaded optimizer to be one DeepSpeed can step
    on the CPU: its fused CPU AdamW for `optimizer: adamw_*`, else the torch optimizer.
    """
    ds = copy.deepcopy(ds)
    _check_fixed(ds, config, plan, source)
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
    ):
        ds.setdefault(key, "auto")  # DeepSpeed asserts on a config without batch sizes
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"`deepspeed: {source}`: `zero_optimization` must be a JSON object.")
    if zero.get("stage") == 3:
        gather = zero.get("stage3_gather_16bit_weights_on_model_save", "auto")
        if gather is False:
            raise ConfigError(
                f"`deepspeed: {source}` sets `stage3_gather_16bit_weights_on_model_save: false`; "
                "newtune saves whole weights (safetensors) at the end of training, so ZeRO-3 must "
                'gather them: set it to true (or "auto").'
            )
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    offloaded = _get(zero, "offload_optimizer.device") not in (None, "none")
    if offloaded and "optimizer" not in ds:
        if config.optimizer.startswith("adamw") and "zero_force_ds_cpu_optimizer" not in ds:
            params = {k: "auto" for k in ("lr", "betas", "eps", "weight_decay")}
            ds["optimizer"] = {"type": "AdamW", "params": params}
        else:
            ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def fsdp_settings(config: NewtuneConfig) -> dict[str, Any] | None:
    """transformers' `fsdp_config` for the config's FSDP keys; None when FSDP is off.

    Axolotl's `fsdp:` option list becomes fsdp_config entries (sharding -> reshard_after_forward,
    offload -> cpu_offload, auto_wrap -> transformer-layer wrapping), `fsdp_`-prefixed keys lose
    the prefix, and `fsdp_version` (or `fsdp_config.version`) picks FSDP1 or FSDP2 (default).
    """
    options = fsdp_option_list(config.fsdp)
    given = config.fsdp_config or {}
    if not options and not given:
        return None
    out: dict[str, Any] = {}
    for key, value in given.items():
        out[fsdp_config_key(key) or key] = value
    version = int(out.get("version") or config.fsdp_version or 2)
    if config.fsdp_version and out.get("version") and config.fsdp_version != version:
        raise ConfigError(
            f"`fsdp_version: {config.fsdp_version}` and `fsdp_config.version: {version}` disagree; "
            "keep one."
        )
    out["version"] = version
    strategy = out.pop("sharding_strategy", None)
    sharding = [o for o in options if o in FSDP1_STRATEGIES]
    if strategy is not None:
        sharding.append(str(strategy).lower())
    for item in sharding:
        if version == 2 and item not in ("full_shard", "shard_grad_op"):
            raise ConfigError(
                f"FSDP sharding `{item}` exists only in FSDP1; with FSDP2 use full_shard or "
                "shard_grad_op (set `fsdp_version: 1` to keep it)."
            )
        out.setdefault("reshard_after_forward", item == "full_shard" if version == 2 else item)
    if "offload" in options:
        out.setdefault("cpu_offload", True)
    if "transformer_layer_cls_to_wrap" in out or "auto_wrap" in options:
        out.setdefault("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")
    layers = out.get("transformer_layer_cls_to_wrap")
    if isinstance(layers, str):
        out["transformer_layer_cls_to_wrap"] = [s.strip() for s in layers.split(",") if s.strip()]
    for key in ("state_dict_type", "auto_wrap_policy", "backward_prefetch"):
        if key in out:
            out[key] = str(out[key]).upper()
    out.setdefault("state_dict_type", "FULL_STATE_DICT")
    return out


def deepspeed_source(config: NewtuneConfig) -> str:
    """How the config names its DeepSpeed config, for messages."""
    value = config.deepspeed
    return value if isinstance(value, str) else "<inline mapping>"


def distributed_kwargs(config: NewtuneConfig, plan: RunPlan) -> dict[str, Any]:
    """TrainingArguments keyword arguments for the config's distributed keys."""
    kwargs: dict[str, Any] = {}
    if config.deepspeed:
        ds = load_deepspeed_config(config.deepspeed)
        kwargs["deepspeed"] = complete_deepspeed_config(ds, config, plan, deepspeed_source(config))
    fsdp = fsdp_settings(config)
    if fsdp is not None and (config.expert_parallel_size or 1) > 1:
        fsdp = None  # expert parallelism: transformers FSDP2-shards at load (train.expert_parallel)
    if fsdp is not None:
        if plan.device != "cuda":
            raise ConfigError(
                f"`fsdp`/`fsdp_config` need CUDA GPUs; this run's device is {plan.device}, where "
                "accelerate would silently fall back to DDP. Remove the FSDP keys (DDP is used "
                "under a launcher) or use `deepspeed:` (ZeRO runs on CPU too)."
            )
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = fsdp
    for key in ("ddp_timeout", "ddp_bucket_cap_mb", "ddp_broadcast_buffers"):
        if getattr(config, key) is not None:
            kwargs[key] = getattr(config, key)
    if config.ddp_find_unused_parameters is not None:
        kwargs["ddp_find_unused_parameters"] = config.ddp_find_unused_parameters
    return kwargs


def gather_weights(trainer: Any) -> dict[str, Any] | None:
    """The whole model's weights when they are sharded (ZeRO-3, FSDP), else None.

    A collective operation: call it on every rank; the main process gets the weights
    (other ranks may get an empty dict). Pass the result to `save_pretrained(state_dict=...)`.
    """
    from newtune.train.expert_parallel import gather_expert_parallel

    sharded = gather_expert_parallel(trainer)  # expert_parallel_size: sharded at load time
    if sharded is not None:
        return sharded
    accelerator = trainer.accelerator
    if trainer.is_deepspeed_enabled:
        if _get(accelerator.deepspeed_config, "zero_optimization.stage") != 3:
            return None
        return accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.is_fsdp_enabled:
        return accelerator.get_state_dict(trainer.model_wrapped)
    return None


def pinned_deepspeed(loaded: Any) -> Any:
    """`loaded` with a relative `deepspeed:` path made absolute (working dir, the config's
    folder, or shipped), as a new LoadedConfig; `loaded` itself is left as it was."""
    value = loaded.config.deepspeed
    if not isinstance(value, str):
        return loaded
    source = str(loaded.source)
    config_dir = None if "://" in source else Path(source).resolve().parent
    path = str(find_deepspeed_file(value, config_dir))
    if path == value:
        return loaded
    return dataclasses.replace(loaded, config=loaded.config.model_copy(update={"deepspeed": path}))


def check_distributed(loaded: Any) -> Any:
    """Fail now, not after preprocessing, on DeepSpeed/FSDP settings that cannot run; return
    the config to train with (`pinned_deepspeed`), leaving the caller's `loaded` unchanged."""
    pinned = pinned_deepspeed(loaded)
    distributed_kwargs(pinned.config, resolve(pinned.config))
    return pinned
