"""Rules, notes and machine needs of the Axolotl plugin/kernel/tracker/parallelism keys
(schema/compat2.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from newtune.config.schema import NewtuneConfig

LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
KERNELS_PLUGIN = "axolotl.integrations.kernels.KernelsPlugin"
SWANLAB_PLUGIN = "axolotl.integrations.swanlab.SwanLabPlugin"
DIFFUSION_PLUGIN = "axolotl.integrations.diffusion.DiffusionPlugin"
EP_PLUGIN = "axolotl.integrations.expert_parallel.ExpertParallelPlugin"
# plugin -> what newtune does for it (the plugin itself only makes its keys readable)
KNOWN_PLUGINS = {
    LIGER_PLUGIN: "the liger_* keys (liger-kernel)",
    CCE_PLUGIN: "cut_cross_entropy (the cut-cross-entropy package)",
    KERNELS_PLUGIN: "use_kernels / experts_implementation (transformers' kernels integration)",
    SWANLAB_PLUGIN: "use_swanlab / swanlab_* (transformers' SwanLabCallback)",
    DIFFUSION_PLUGIN: "the `diffusion` block (masked-diffusion training; as in Axolotl, "
    "noise_schedule and min/max_mask_ratio do not change it)",
    EP_PLUGIN: "expert_parallel_size (transformers' expert parallelism, train.expert_parallel)",
}
PARALLEL_KEYS = {  # config key -> accelerate ParallelismConfig field
    "dp_replicate_size": "dp_replicate_size",
    "dp_shard_size": "dp_shard_size",
    "tensor_parallel_size": "tp_size",
    "context_parallel_size": "cp_size",
}
COMPLETION_METHODS = ("dpo", "orpo", "kto")  # training_method names with a completion table
RANGE = re.compile(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")


def _short(plugin: str) -> str:
    return plugin.rsplit(".", 1)[-1]


def _listed(cfg: NewtuneConfig, plugin: str) -> bool:
    return any(_short(p) == _short(plugin) for p in cfg.plugins or [])


def unknown_plugins(cfg: NewtuneConfig) -> list[str]:
    """Plugins in `plugins` that newtune has no equivalent for."""
    known = {_short(p) for p in KNOWN_PLUGINS}
    return [p for p in cfg.plugins or [] if _short(p) not in known]


def diffusion_enabled(cfg: NewtuneConfig) -> bool:
    """Masked-diffusion training is on: DiffusionPlugin listed in `plugins` (as in Axolotl,
    the plugin turns it on; the `diffusion` block only tunes it)."""
    return _listed(cfg, DIFFUSION_PLUGIN)


def cce_enabled(cfg: NewtuneConfig) -> bool:
    """Cut Cross Entropy is on: `cut_cross_entropy: true`, or its plugin listed (Axolotl's
    default for the key is true once the plugin is loaded)."""
    if cfg.cut_cross_entropy is not None:
        return bool(cfg.cut_cross_entropy)
    return _listed(cfg, CCE_PLUGIN)


def swanlab_enabled(cfg: NewtuneConfig) -> bool:
    """Reporting to SwanLab is asked for (`use_swanlab: true`)."""
    return bool(cfg.use_swanlab)


def swanlab_completions(cfg: NewtuneConfig) -> bool:
    """The SwanLab completion table is logged: SwanLab on, a method with completions (DPO, IPO,
    SimPO, ORPO, KTO), `swanlab_log_completions` not false (Axolotl's default is true)."""
    from newtune.config.schema.preference import training_method

    return (
        swanlab_enabled(cfg)
        and training_method(cfg) in COMPLETION_METHODS
        and cfg.swanlab_log_completions is not False
    )


def _completion_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    """swanlab_log_completions and its two knobs need a preference method that logs it."""
    from newtune.config.schema.preference import training_method

    if not cfg.use_swanlab:
        return []  # `set without use_swanlab` says it already
    method = training_method(cfg)
    if cfg.swanlab_log_completions and method not in COMPLETION_METHODS:
        trains = "a reward model" if method == "reward" else "SFT"
        return [
            f"`{names('swanlab_log_completions')}: true` logs the prompt, chosen/rejected (or "
            "KTO's completion) and per-row rewards of preference training (`rl: dpo`, ipo, "
            f"simpo, orpo or kto), but this config trains {trains}, which has no such rows; "
            "remove the key or set it false"
        ]
    knobs = [
        k
        for k in ("swanlab_completion_log_interval", "swanlab_completion_max_buffer")
        if getattr(cfg, k) is not None
    ]
    if knobs and not swanlab_completions(cfg):
        why = (
            "`swanlab_log_completions` is false"
            if method in COMPLETION_METHODS
            else "only preference training (`rl: dpo`, ipo, simpo, orpo or kto) logs one"
        )
        verb, them = ("shape", "them") if len(knobs) > 1 else ("shapes", "it")
        return [
            f"{' and '.join(f'`{names(k)}`' for k in knobs)} {verb} the SwanLab completion "
            f"table, which this run does not log ({why}); remove {them}"
        ]
    return []


def trackio_enabled(cfg: NewtuneConfig) -> bool:
    """Reporting to trackio is asked for (`trackio_project_name` set)."""
    return bool(cfg.trackio_project_name)


def parallel_sizes(cfg: NewtuneConfig) -> dict[str, int]:
    """ParallelismConfig keyword arguments for the sizes the config sets (1 = off is kept)."""
    return {field: getattr(cfg, key) for key, field in PARALLEL_KEYS.items() if getattr(cfg, key)}


def parallel_world(cfg: NewtuneConfig) -> int:
    """The product of the parallelism sizes set (1 when none is)."""
    world = 1
    for size in parallel_sizes(cfg).values():
        world *= size
    return world


def parallel_layout(cfg: NewtuneConfig, world_size: int) -> dict[str, int]:
    """The ParallelismConfig sizes for `world_size` processes, filled as Axolotl does: the
    processes the set sizes leave over go to `dp_shard_size` when FSDP is on and it is unset,
    else to `dp_replicate_size` (DDP replicas) when that is unset. ValueError when the launch
    does not fit the sizes."""
    sizes = parallel_sizes(cfg)
    fixed = parallel_world(cfg)
    if world_size % fixed:
        raise ValueError(f"they need a multiple of {fixed} processes")
    rest = world_size // fixed
    if rest > 1:
        fsdp = bool(cfg.fsdp or cfg.fsdp_config)
        if fsdp and "dp_shard_size" not in sizes:
            sizes["dp_shard_size"] = rest
        elif "dp_replicate_size" not in sizes:
            sizes["dp_replicate_size"] = rest
        else:
            raise ValueError(f"they multiply to {fixed} processes")
    return sizes


def tensor_parallel_kwargs(config: NewtuneConfig) -> dict[str, Any]:
    """from_pretrained arguments that shard the model for tensor parallelism (transformers'
    `tp_plan="auto"` over `tp_size` ranks), as Axolotl loads it; empty without TP."""
    size = config.tensor_parallel_size or 1
    return {"tp_plan": "auto", "tp_size": size} if size > 1 else {}


def parallelism_config(config: NewtuneConfig, world_size: int = 1) -> Any:
    """accelerate's ParallelismConfig for `world_size` processes (config.compat2.parallel_layout);
    None when no size is set or only data replicas remain: that is plain DDP over the launched
    processes, which the Trainer runs without a device mesh (and which, unlike a
    ParallelismConfig, accelerate also runs on CPU processes). ValueError (accelerate's, or the
    layout's) when the sizes do not fit the launch or each other."""
    if not parallel_sizes(config) or (config.expert_parallel_size or 1) > 1:
        return None  # expert parallelism: transformers shards the model (train.expert_parallel)
    sizes = parallel_layout(config, world_size)
    if all(size == 1 for key, size in sizes.items() if key != "dp_replicate_size"):
        return None
    from accelerate import ParallelismConfig

    return ParallelismConfig(**sizes)


def parallel_problem(config: NewtuneConfig, world_size: int) -> str | None:
    """Why the launch does not fit the parallelism sizes, or accelerate refuses them (None when
    they run)."""
    if (config.expert_parallel_size or 1) > 1:
        from newtune.config.expert_parallel import launch_problem

        return launch_problem(config, world_size)
    try:
        parallelism_config(config, world_size)
    except ValueError as exc:
        sizes = ", ".join(
            f"`{k}: {getattr(config, k)}`" for k in PARALLEL_KEYS if getattr(config, k)
        )
        return (
            f"the parallelism sizes ({sizes}) do not fit this launch of {world_size} "
            f"process(es): {str(exc).splitlines()[0]}; launch a fitting number (`accelerate "
            f"launch --num_processes N`), or change the sizes (with TP/CP the other processes "
            "must shard: add `fsdp_config` with `fsdp_version: 2`)"
        )
    return None


def unfreeze_pattern(pattern: str) -> tuple[re.Pattern[str], tuple[int, int | None] | None]:
    """Axolotl's unfrozen_parameters pattern: a regex matched at the start of the parameter
    name, where `.` not followed by `+` is a literal dot, with an optional row range `[a:b]`."""
    rows: tuple[int, int | None] | None = None
    match = RANGE.match(pattern)
    if match:
        pattern = match.group(1)
        start = int(match.group(2) or 0)
        end_text = match.group(3)
        end = int(end_text) if end_text else None
        rows = (start, end) if ":" in match.group(0)[len(pattern) :] else (start, start + 1)
    return re.compile(re.sub(r"\.(?!\+)", r"\\.", pattern)), rows


def _unfrozen_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    errors = []
    key = names("unfrozen_parameters")
    for pattern in cfg.unfrozen_parameters or []:
        try:
            unfreeze_pattern(pattern)
        except re.error as exc:
            errors.append(f"`{key}`: {pattern!r} is not a valid regex ({exc})")
    # with an adapter: config/compat4.py (patterns see peft's base_model.model. names)
    kwargs = cfg.gradient_checkpointing_kwargs or {}
    if cfg.unfrozen_parameters and kwargs.get("use_reentrant") is True:
        errors.append(
            f"`{key}` with `gradient_checkpointing_kwargs.use_reentrant: true`: reentrant "
            "checkpoints do not backpropagate into a partly frozen model; set it false "
            "(Axolotl refuses this too)"
        )
    return errors


def _kernel_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    errors = []
    if cce_enabled(cfg) and not (cfg.bf16 or cfg.fp16):
        errors.append(
            "Cut Cross Entropy (`cut_cross_entropy`, or CutCrossEntropyPlugin in `plugins`) "
            "needs half-precision training for its backward pass; set `bf16: true` (or "
            "`fp16: true`), or `cut_cross_entropy: false` (Axolotl refuses this too)"
        )
    liger = [
        k for k in ("liger_cross_entropy", "liger_fused_linear_cross_entropy") if getattr(cfg, k)
    ]
    if cce_enabled(cfg) and liger:
        errors.append(
            f"Cut Cross Entropy and `{names(liger[0])}` both replace the loss; keep one "
            "(`cut_cross_entropy: false` turns the plugin's off)"
        )
    offload = cfg.activation_offloading
    if offload in ("disk", "hidden_states"):
        errors.append(
            f"`{names('activation_offloading')}: {offload}` uses TRL's offloader with "
            "Axolotl's trainer mixin, which newtune does not wire; use `activation_offloading: "
            "true` (saved activations in CPU memory)"
        )
    if offload and not cfg.gradient_checkpointing:
        errors.append(
            f"`{names('activation_offloading')}` requires `gradient_checkpointing: true` "
            "(Axolotl refuses it without too)"
        )
    if cfg.lora_target_parameters and cfg.lora_dropout:
        errors.append(
            f"`{names('lora_target_parameters')}` needs `lora_dropout: 0` (peft's "
            f"ParamWrapper has no dropout); `lora_dropout` is {cfg.lora_dropout}"
        )
    if cfg.lora_target_parameters and cfg.adapter not in (None, "lora", "qlora"):
        errors.append(f"`{names('lora_target_parameters')}` needs `adapter: lora` or `qlora`")
    if cfg.quantize_moe_experts and not (cfg.load_in_4bit or cfg.load_in_8bit):
        errors.append(
            f"`{names('quantize_moe_experts')}: true` quantizes the experts with the bits of "
            "`load_in_4bit` or `load_in_8bit`; set one (Axolotl requires it too)"
        )
    if cfg.quantize_moe_experts and cfg.adapter not in ("lora", "qlora"):
        errors.append(
            f"`{names('quantize_moe_experts')}: true` freezes the quantized experts; it needs "
            "`adapter: lora` or `qlora` (Axolotl requires it too)"
        )
    if cfg.llama4_linearized_experts and cfg.reinit_weights:
        errors.append(
            f"`{names('llama4_linearized_experts')}: true` with `{names('reinit_weights')}: "
            "true`: linearizing loads a linearized checkpoint's expert weights, and reinit_weights "
            "loads none (the model is built with fresh weights); remove one of them"
        )
    return errors


def _tracker_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    errors = []
    if cfg.use_swanlab and not cfg.swanlab_project:
        errors.append(
            f"`{names('use_swanlab')}: true` needs `swanlab_project` (Axolotl refuses it "
            "without too)"
        )
    swan = sorted(
        k
        for k in cfg.model_fields_set
        if k.startswith("swanlab_") and getattr(cfg, k) not in (None, False)
    )
    if swan and not cfg.use_swanlab:
        errors.append(
            f"{', '.join(f'`{names(k)}`' for k in swan)} set without `use_swanlab: true`; "
            "nothing would be reported to SwanLab: add `use_swanlab: true` or remove them"
        )
    errors += _completion_rules(cfg, names)
    for key in ("trackio_run_name", "trackio_space_id"):
        if getattr(cfg, key) and not cfg.trackio_project_name:
            errors.append(
                f"`{names(key)}` without `trackio_project_name`; set the project to report to "
                "trackio, or remove it"
            )
    return errors


def _parallel_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    errors = []
    sizes = {k: getattr(cfg, k) for k in PARALLEL_KEYS if (getattr(cfg, k) or 1) > 1}
    if sizes and cfg.deepspeed:
        errors.append(
            f"{', '.join(f'`{names(k)}`' for k in sizes)} build accelerate's ParallelismConfig "
            "(FSDP2 / DDP / TP / CP device mesh), and `deepspeed` is its own engine; choose one"
        )
    if (cfg.dp_shard_size or 1) > 1 and not (cfg.fsdp or cfg.fsdp_config):
        errors.append(
            f"`{names('dp_shard_size')}` shards with FSDP2, which is not configured; add "
            "`fsdp_config` (with `fsdp_version: 2`) or remove dp_shard_size (Axolotl refuses "
            "this too)"
        )
    if (cfg.dp_shard_size or 1) > 1 and cfg.fsdp_version not in (None, 2):
        errors.append(
            f"`{names('dp_shard_size')}` shards with FSDP2; `fsdp_version: {cfg.fsdp_version}` "
            "is FSDP1: set `fsdp_version: 2` or remove dp_shard_size"
        )
    return errors


GPU_QUANT = ("float8_e4m3fn", "nvfp4", "mxfp4")


def _qat_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    """Axolotl's QAT layout rules (torchao's QAT supports these combinations only)."""
    qat = cfg.qat
    if qat is None:
        return []
    key = names("qat")
    act, weight, group = qat.activation_dtype, qat.weight_dtype, qat.group_size
    errors = []
    if cfg.adapter:
        errors.append(
            f"`{key}` fake-quantizes the model's own linear layers in a full fine-tune, and "
            f"`adapter: {cfg.adapter}` trains adapter weights; remove one of them"
        )
    unsupported = {
        (None, "int8"): "int8 weight-only",
        ("int4", "int4"): "int4 activations with int4 weights",
        ("int8", "int8"): "int8 activations with int8 weights",
    }
    if (act, weight) in unsupported:
        errors.append(
            f"`{key}`: {unsupported[(act, weight)]} is not a layout torchao's QAT supports; use "
            "`weight_dtype: int4` (with `activation_dtype: int8` or none), or a float8/nvfp4/"
            "mxfp4 layout (Axolotl refuses this too)"
        )
    if weight == "nvfp4" and group not in (None, 16):
        errors.append(f"`{key}`: nvfp4 uses a group_size of 16, not {group}")
    if weight == "mxfp4" and group not in (None, 32):
        errors.append(f"`{key}`: mxfp4 uses a group_size (block size) of 32, not {group}")
    if cfg.fp8:
        errors.append(f"`{key}` and `fp8` both change the linear layers; keep one")
    return errors


def compat2_rules(cfg: NewtuneConfig, names: Callable[[str], str] = str) -> list[str]:
    """Errors for the plugin, kernel, tracker and parallelism keys."""
    from newtune.config.expert_parallel import ep_rules

    errors = []
    others = unknown_plugins(cfg)
    if others:
        errors.append(
            f"`{names('plugins')}`: {', '.join(others)} are Axolotl plugins newtune does not run; "
            f"newtune reads {', '.join(_short(p) for p in KNOWN_PLUGINS)}; remove them"
        )
    return (
        errors
        + _unfrozen_rules(cfg, names)
        + _kernel_rules(cfg, names)
        + _tracker_rules(cfg, names)
        + _parallel_rules(cfg, names)
        + _qat_rules(cfg, names)
        + ep_rules(cfg, names)  # expert_parallel_size (train.expert_parallel)
    )


def compat2_notes(cfg: NewtuneConfig) -> list[str]:
    """Notes: what the plugins in `plugins` turn into, and parallelism that is off."""
    notes = []
    for plugin in cfg.plugins or []:
        for known, what in KNOWN_PLUGINS.items():
            if _short(plugin) == _short(known) and known != LIGER_PLUGIN:
                notes.append(f"plugin {_short(known)}: newtune reads {what}")
    from newtune.config.expert_parallel import ep_notes

    notes += ep_notes(cfg)  # expert_parallel_size: transformers shards, no ParallelismConfig
    sizes = {k: v for k, v in parallel_sizes(cfg).items() if v > 1}
    if sizes and not (cfg.expert_parallel_size or 1) > 1:
        mesh = "ParallelismConfig" if set(sizes) - {"dp_replicate_size"} else "DDP replicas"
        notes.append(
            f"parallelism ({mesh}): "
            + ", ".join(f"{k}={v}" for k, v in sizes.items())
            + f"; launch a multiple of {parallel_world(cfg)} processes (the rest fill "
            "dp_shard_size with FSDP, else dp_replicate_size)"
        )
    return notes


def machine_needs2(cfg: NewtuneConfig, names: Callable[[str], str], need: Any) -> list[Any]:
    """The packages (and CUDA) these keys need; `need` builds a config.machine.Need."""
    needs = []
    if cce_enabled(cfg):
        needs.append(
            need(
                "Cut Cross Entropy (`cut_cross_entropy` / CutCrossEntropyPlugin)",
                "the cut-cross-entropy package",
                "cut_cross_entropy",
                ("pip install cut-cross-entropy",),
                "set `cut_cross_entropy: false` (plain cross-entropy)",
                "its kernels are Triton GPU kernels",
            )
        )
    impl = cfg.experts_implementation
    if cfg.use_kernels or impl in ("sonicmoe", "deepgemm", "scattermoe"):
        what = (
            f"`{names('use_kernels')}: true`"
            if cfg.use_kernels
            else f"`experts_implementation: {impl}`"
        )
        needs.append(
            need(
                what,
                "the kernels package (transformers' hub-kernels integration)",
                "kernels",
                ("pip install kernels",),
                "remove it (the model's own PyTorch layers)",
                "hub kernels are CUDA builds"
                if impl in ("sonicmoe", "deepgemm", "scattermoe")
                else None,
            )
        )
    if cfg.tokenizer_use_mistral_common:
        needs.append(
            need(
                f"`{names('tokenizer_use_mistral_common')}: true`",
                "the mistral-common package",
                "mistral_common",
                ("pip install mistral-common",),
                "remove it (the model's Hugging Face tokenizer)",
            )
        )
    for on, tracker in ((swanlab_enabled(cfg), "swanlab"), (trackio_enabled(cfg), "trackio")):
        if on:
            needs.append(
                need(
                    f"reporting to {tracker}",
                    tracker,
                    tracker,
                    (f"pip install {tracker}",),
                    f"remove the {tracker} keys",
                )
            )
    if cfg.qat is not None:
        gpu = [d for d in (cfg.qat.weight_dtype, cfg.qat.activation_dtype) if d in GPU_QUANT]
        needs.append(
            need(
                f"`{names('qat')}` ({cfg.qat.weight_dtype} weights)",
                "the torchao package",
                "torchao",
                ("pip install torchao",),
                "use `weight_dtype: int4` / `activation_dtype: int8`, or remove `qat`"
                if gpu
                else "remove `qat`",
                f"torchao's {gpu[0]} fake quantization targets CUDA GPUs" if gpu else None,
            )
        )
    gpu_only = [
        k
        for k in ("dp_shard_size", "tensor_parallel_size", "context_parallel_size")
        if (getattr(cfg, k) or 1) > 1
        # with expert_parallel_size, transformers' FSDP2 shards (gloo CPU ranks too)
        and not (k == "dp_shard_size" and (cfg.expert_parallel_size or 1) > 1)
    ]
    if gpu_only:
        needs.append(
            need(
                ", ".join(f"`{names(k)}`" for k in gpu_only),
                "torch",
                "torch",
                ("pip install torch",),
                "use `dp_replicate_size` (DDP) alone",
                "accelerate builds FSDP2 / tensor / context parallelism on a CUDA device mesh",
                plural=len(gpu_only) > 1,
            )
        )
    return needs
