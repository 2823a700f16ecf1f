"""What a config needs from the machine that trains it: packages, a CUDA GPU, the launch.

A config is valid independent of the machine that validates it: `validate` only warns that a
package is missing here (`missing_here`), and `train` refuses at start, before any data is
prepared, when this machine cannot run it (`check_machine`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError

# optimizer name prefix -> (module it imports, pip package)
OPTIMIZER_PACKAGES = [
    (("galore_",), "galore_torch", "galore-torch"),
    (("apollo_",), "apollo_torch", "apollo-torch"),
    (("lomo", "adalomo"), "lomo_optim", "lomo-optim"),
    (("grokadamw",), "grokadamw", "grokadamw"),
    (("schedule_free_",), "schedulefree", "schedulefree"),
    (("adamw_torch_4bit", "adamw_torch_8bit"), "torchao", "torchao"),
    (("adamw_anyprecision",), "torchdistx", "torchdistx"),
    (("stable_adamw",), "optimi", "torch-optimi"),
    (
        ("adamw_bnb", "adamw_8bit", "lion_", "paged_", "ademamix", "rmsprop_bnb"),
        "bitsandbytes",
        "bitsandbytes",
    ),
]
TRACKERS = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}
LIGER_KEYS = (
    "liger_rope",
    "liger_rms_norm",
    "liger_layer_norm",
    "liger_glu_activation",
    "liger_cross_entropy",
    "liger_fused_linear_cross_entropy",
    "liger_rms_norm_gated",
)


@dataclass(frozen=True)
class Need:
    """Something a config needs from the machine: a package, and maybe a CUDA GPU."""

    what: str  # the keys that ask for it, e.g. "`attn_implementation: flash_attention_2`"
    package: str  # the package name as a user knows it
    module: str  # what `import` needs
    pip: tuple[str, ...]  # install commands, any one does

    @property
    def commands(self) -> str:
        """The install commands in backticks, joined by `or`."""
        return " or ".join(f"`{c}`" for c in self.pip)

    alternative: str  # what to write instead
    cuda: str | None = None  # why a CUDA GPU is needed (None: runs anywhere)
    plural: bool = False  # `what` names several keys

    @property
    def needs(self) -> str:
        """`need` or `needs`, agreeing with `what`."""
        return "need" if self.plural else "needs"


def machine_needs(cfg: NewtuneConfig, names: Callable[[str], str] = str) -> list[Need]:
    """Every package (and CUDA GPU) the config asks for, whether or not this machine has it."""
    needs = []
    if cfg.attn_implementation == "flash_attention_2":
        spelled = names("attn_implementation")
        what = "`attn_implementation: flash_attention_2`"
        needs.append(
            Need(
                what if spelled == "attn_implementation" else f"`{spelled}: true` ({what})",
                "the flash-attn package",
                "flash_attn",
                (
                    "pip install 'newtune[flash-attn]'",
                    "pip install flash-attn --no-build-isolation",
                ),
                "use `attn_implementation: sdpa`",
                "flash-attn's kernels are CUDA kernels",
            )
        )
    attn = cfg.attn_implementation or ""
    if attn == "flex_attention":
        needs.append(
            Need(
                f"`{names('attn_implementation')}: flex_attention`",
                "torch",
                "torch",
                ("pip install torch",),
                "use `attn_implementation: sdpa`",
                "torch's FlexAttention has no backward pass on CPU",
            )
        )
    if "/" in attn:
        needs.append(
            Need(
                f"`{names('attn_implementation')}: {attn}`",
                "the kernels package (transformers' hub-kernels integration)",
                "kernels",
                ("pip install kernels",),
                "use `attn_implementation: sdpa` (or flash_attention_2)",
            )
        )
    liger = [k for k in LIGER_KEYS if getattr(cfg, k)]
    if liger:
        needs.append(
            Need(
                ", ".join(f"`{names(k)}`" for k in liger),
                "liger-kernel",
                "liger_kernel",
                ("pip install 'newtune[liger]'", "pip install liger-kernel"),
                "remove the liger_* keys",
                "liger-kernel's kernels are Triton GPU kernels",
                plural=len(liger) > 1,
            )
        )
    for prefixes, module, pip in OPTIMIZER_PACKAGES:
        if cfg.optimizer.startswith(prefixes):
            needs.append(
                Need(
                    f"`{names('optimizer')}: {cfg.optimizer}`",
                    f"the {pip} package",
                    module,
                    (f"pip install {pip}",),
                    "choose another optimizer (adamw_torch)",
                )
            )
    bits = "load_in_4bit" if cfg.load_in_4bit else ("load_in_8bit" if cfg.load_in_8bit else None)
    if bits:
        needs.append(
            Need(
                f"`{names(bits)}: true`",
                "bitsandbytes",
                "bitsandbytes",
                ("pip install 'newtune[bnb]'", "pip install bitsandbytes"),
                "train without quantization (remove the key)",
            )
        )
    if cfg.deepspeed:
        needs.append(
            Need(
                f"`{names('deepspeed')}`",
                "the deepspeed package",
                "deepspeed",
                ("pip install 'newtune[deepspeed]'",),
                "remove the key",
            )
        )
    wanted = {
        "wandb": bool(cfg.wandb_project) and cfg.wandb_mode != "disabled",
        "mlflow": bool(cfg.mlflow_tracking_uri or cfg.mlflow_experiment_name),
        "tensorboard": bool(cfg.use_tensorboard),
    }
    for tracker, on in wanted.items():
        if on:
            needs.append(
                Need(
                    f"reporting to {tracker}",
                    tracker,
                    TRACKERS[tracker],
                    (f"pip install {tracker}", f"pip install 'newtune[{tracker}]'"),
                    f"remove the {tracker} keys",
                )
            )
    if getattr(cfg, "rl", None) in ("grpo", "gdpo", "ebft") and not _strided(cfg):
        needs.append(
            Need(
                f"`{names('rl')}: {cfg.rl}`",
                "TRL (its GRPOTrainer generates and trains)",
                "trl",
                ("pip install 'newtune[trl]'",),
                "train without online RL (e.g. `rl: dpo` on preference pairs)",
            )
        )
    if cfg.use_ray:
        needs.append(
            Need(
                f"`{names('use_ray')}: true`",
                "Ray Train (ray[train])",
                "ray.train",
                ("pip install 'newtune[ray]'",),
                "remove `use_ray` and start the ranks with accelerate launch/torchrun",
            )
        )
    from newtune.config.compat2 import machine_needs2
    from newtune.config.compat4 import machine_needs4

    return needs + machine_needs2(cfg, names, Need) + machine_needs4(cfg, names, Need)


def _strided(cfg: NewtuneConfig) -> bool:
    """Strided EBFT trains on newtune's own Trainer (no TRL)."""
    block = getattr(cfg, "ebft", None)
    return cfg.rl == "ebft" and getattr(block, "mode", None) == "strided"


def _installed(module: str) -> bool:
    try:  # a dotted name imports its parents, which may be missing too
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def missing_here(cfg: NewtuneConfig, names: Callable[[str], str] = str) -> list[str]:
    """`validate`'s warnings: packages the config needs that this machine lacks (not errors)."""
    return [
        f"{need.what} {need.needs} {need.package}, which is not installed here; the machine that "
        f"trains needs it ({need.commands})"
        for need in machine_needs(cfg, names)
        if not _installed(need.module)
    ]


def _device() -> str:
    from newtune.config.resolve import probe_device

    return probe_device()[0]


def machine_problems(
    cfg: NewtuneConfig, device: str | None = None, world_size: int | None = None
) -> list[str]:
    """Why this machine (device: cuda/mps/cpu; the launch's world size) cannot train `cfg`."""
    problems = []
    needs = machine_needs(cfg)
    for need in needs:
        if not _installed(need.module):
            problems.append(
                f"{need.what} {need.needs} {need.package}, which is not installed; run {need.commands}, "
                f"or {need.alternative}"
            )
    cuda = [need for need in needs if need.cuda]
    if cuda:
        device = device or _device()
        for need in cuda if device != "cuda" else []:
            problems.append(
                f"{need.what} {need.needs} CUDA ({need.cuda}), and this machine trains on {device}; "
                f"train on a CUDA GPU, or {need.alternative}"
            )
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    from newtune.config.compat2 import parallel_problem

    parallel = parallel_problem(cfg, world_size)
    if parallel:
        problems.append(parallel)
    if cfg.ddp is True and world_size == 1:
        problems.append(
            "`ddp: true`, but this run is one process; launch it on several (`accelerate "
            "launch` or `torchrun --nproc_per_node N`), or remove `ddp`"
        )
    if cfg.ddp is False and world_size > 1:
        problems.append(
            f"`ddp: false`, but this run was launched on {world_size} processes, which newtune "
            "trains with DDP; launch one process, or remove `ddp`"
        )
    return problems


LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


def lora_kernel_problem(cfg: NewtuneConfig) -> str | None:
    """Axolotl's fused LoRA kernels asked for: newtune has none (validate warns, train refuses)."""
    keys = [k for k in LORA_KERNELS if getattr(cfg, k)]
    if not keys:
        return None
    return (
        f"{', '.join(f'`{k}: true`' for k in keys)} ask for Axolotl's own fused Triton LoRA "
        "kernels, which neither peft nor liger-kernel provide; newtune trains LoRA with peft "
        "(the same math, unfused), so set them to false (or remove them)"
    )


def check_machine(cfg: NewtuneConfig, device: str | None = None) -> None:
    """`train`'s start: raise one ConfigError naming what this machine lacks for `cfg` and what
    newtune only refuses at train time (Axolotl's fused LoRA kernels)."""
    problems = machine_problems(cfg, device)
    kernels = lora_kernel_problem(cfg)
    if kernels:
        problems.append(kernels)
    if problems:
        raise ConfigError(
            "newtune cannot train this config here: " + "; ".join(problems) + ". "
            "The config itself is valid (`newtune validate` accepts it)."
        )
