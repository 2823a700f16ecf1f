"""Rules and notes of issue 16, part 4: eta_min, flex_attn_compile_kwargs and
unfrozen_parameters under an adapter (schema fields in schema/compat.py and compat2.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from newtune.config.compat2 import unfreeze_pattern
from newtune.config.schema import NewtuneConfig

# every parameter name of a peft-wrapped model starts with this (PeftModel.base_model.model)
PEFT_PREFIX = "base_model.model."
_META = set(".^$*+?{}[]\\|()")


def literal_prefix(regex: str) -> str | None:
    """The text every re.match of `regex` starts with ('' when unknown, None with `|`)."""
    if "|" in regex:
        return None
    out: list[str] = []
    i = 1 if regex.startswith("^") else 0
    while i < len(regex):
        char = regex[i]
        if char == "\\" and i + 1 < len(regex) and regex[i + 1] in "._-/":
            literal, step = regex[i + 1], 2
        elif char in _META:
            break
        else:
            literal, step = char, 1
        if regex[i + step : i + step + 1] in ("*", "?", "{"):
            break  # the literal is optional
        out.append(literal)
        i += step
    return "".join(out)


def dead_under_adapter(patterns: list[str]) -> list[str]:
    """The unfrozen_parameters patterns that can never match a name under peft's wrapper."""
    dead = []
    for pattern in patterns:
        prefix = literal_prefix(unfreeze_pattern(pattern)[0].pattern)
        if prefix and not (PEFT_PREFIX.startswith(prefix) or prefix.startswith(PEFT_PREFIX)):
            dead.append(pattern)
    return dead


def _eta_min_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    if cfg.eta_min is None:
        return []
    key = names("eta_min")
    errors = []
    if cfg.lr_scheduler != "cosine":
        errors.append(
            f"`{key}` is the floor of the cosine schedule, but `{names('lr_scheduler')}` is "
            f"{cfg.lr_scheduler}; set `lr_scheduler: cosine` or remove `{key}`"
        )
    if cfg.cosine_min_lr_ratio is not None:
        errors.append(
            f"`{key}` and `{names('cosine_min_lr_ratio')}` both set the cosine floor "
            "(absolute and relative to learning_rate); keep one"
        )
    if cfg.eta_min > cfg.learning_rate:
        errors.append(
            f"`{key}: {cfg.eta_min}` is above `learning_rate: {cfg.learning_rate}`: the cosine "
            "would rise instead of decay; set it below the peak lr (or remove it)"
        )
    floors = sorted({"min_lr", "min_lr_rate"} & set(cfg.lr_scheduler_kwargs or {}))
    if floors:
        errors.append(
            f"`{key}` and `{names('lr_scheduler_kwargs')}` {floors} both set the cosine floor "
            "(transformers refuses two); keep one"
        )
    if cfg.jagged_restart_steps:
        errors.append(
            f"`{key}` with `jagged_restart_steps`: the restarts anneal to "
            "`cosine_min_lr_ratio`; set that (= eta_min / learning_rate) instead"
        )
    return errors


def _flex_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    if cfg.flex_attn_compile_kwargs is None:
        return []
    key = names("flex_attn_compile_kwargs")
    errors = []
    if cfg.attn_implementation != "flex_attention":
        errors.append(
            f"`{key}` sets how flex attention is compiled, and `attn_implementation` is "
            f"{cfg.attn_implementation or 'sdpa (the default)'}; set `attn_implementation: "
            f"flex_attention` or remove `{key}`"
        )
    if cfg.torch_compile in (True, "auto"):
        errors.append(
            f"`{key}` with `torch_compile: {cfg.torch_compile}`: the compiled model traces flex "
            "attention into its own graph (transformers then calls the uncompiled function, "
            "under torch_compile_mode), so these options would never apply; remove one of them"
        )
    return errors


def _unfrozen_adapter_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    if not (cfg.unfrozen_parameters and cfg.adapter):
        return []
    try:
        dead = dead_under_adapter(cfg.unfrozen_parameters)
    except re.error:  # an invalid regex: compat2's rule names it
        return []
    if not dead:
        return []
    every = len(dead) == len(cfg.unfrozen_parameters)
    outcome = (
        "Axolotl then freezes every parameter, the adapter weights too, and trains nothing"
        if every
        else "Axolotl skips them silently"
    )
    return [
        f"`{names('unfrozen_parameters')}` with `adapter: {cfg.adapter}`: the patterns are "
        "matched (re.match, as in Axolotl) against the names of peft's wrapped model, which all "
        f"start with `{PEFT_PREFIX}`, so {', '.join(repr(p) for p in dead)} can never match: "
        f"{outcome}. Write the names as peft has them (e.g. `base_model.+lora_` for every "
        "LoRA weight), or remove `unfrozen_parameters` (LoRA freezes the "
        "base itself; `lora_modules_to_save` trains and saves whole modules beside it)"
    ]


def _onebit_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    if not cfg.use_onebitllms:
        return []
    errors = []
    if cfg.adapter:
        errors.append(
            f"`{names('use_onebitllms')}` trains the BitNet layers themselves, and onebitllms "
            f"has no LoRA (Axolotl refuses `adapter: {cfg.adapter}` with it too); remove "
            "`adapter` for a full 1.58-bit fine-tune"
        )
    if cfg.load_in_4bit or cfg.load_in_8bit:
        errors.append(
            f"`{names('use_onebitllms')}` replaces the linear layers with BitNet layers, which "
            "bitsandbytes' quantized layers cannot become; remove load_in_4bit / load_in_8bit"
        )
    return errors


def _otel_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    if cfg.use_otel_metrics:
        return []
    return [
        f"`{names(key)}` sets the OpenTelemetry metrics endpoint, and `use_otel_metrics` is "
        "not true; set `use_otel_metrics: true` or remove it"
        for key in ("otel_metrics_host", "otel_metrics_port")
        if getattr(cfg, key) is not None
    ]


def _eaft_rules(cfg: NewtuneConfig, names: Callable[[str], str]) -> list[str]:
    from newtune.config.schema.preference import training_method

    given = [k for k in ("eaft_alpha", "eaft_k") if getattr(cfg, k) is not None]
    if not cfg.use_eaft:
        if given:
            keys = " and ".join(f"`{names(k)}`" for k in given)
            return [f"{keys} set without `{names('use_eaft')}: true`: set it or remove them"]
        return []
    errors = []
    why = f"`{names('use_eaft')}: true`"
    from newtune.config.compat2 import diffusion_enabled

    other = None
    if cfg.rl or training_method(cfg) != "sft":
        other = f"rl: {cfg.rl}" if cfg.rl else "reward_model: true"
        if cfg.process_reward_model and not cfg.rl and not cfg.reward_model:
            other = "process_reward_model: true"
    elif diffusion_enabled(cfg):
        other = "diffusion (DiffusionPlugin)"
    if other:
        errors.append(
            f"{why} weights the next-token loss of SFT, and the config trains with `{other}`, "
            "which has its own loss; remove use_eaft"
        )
    fused_keys = ("liger_fused_linear_cross_entropy", "cut_cross_entropy")
    fused = [k for k in fused_keys if getattr(cfg, k, None)]
    if fused:
        errors.append(
            f"{why} with `{names(fused[0])}: true`: EAFT weights each token by the entropy of "
            "its logits, and the fused head never materialises them; remove one of the two"
        )
    return errors


def compat4_rules(cfg: NewtuneConfig, names: Callable[[str], str] = str) -> list[str]:
    """Errors for eta_min, flex_attn_compile_kwargs, unfrozen_parameters with an adapter and
    use_onebitllms."""
    return (
        _eta_min_rules(cfg, names)
        + _flex_rules(cfg, names)
        + _unfrozen_adapter_rules(cfg, names)
        + _onebit_rules(cfg, names)
        + _otel_rules(cfg, names)
        + _eaft_rules(cfg, names)
    )


def machine_needs4(cfg: NewtuneConfig, names: Callable[[str], str], need: Any) -> list[Any]:
    """The packages (and CUDA) these keys need; `need` builds a config.machine.Need."""
    needs = []
    if cfg.use_onebitllms:
        needs.append(
            need(
                f"`{names('use_onebitllms')}: true`",
                "the onebitllms package",
                "onebitllms",
                ("pip install onebitllms",),
                "remove `use_onebitllms` (the model's own bf16 layers train)",
                "onebitllms' BitNet layers quantize with Triton CUDA kernels",
            )
        )
    if cfg.use_otel_metrics:
        needs.append(
            need(
                f"`{names('use_otel_metrics')}: true`",
                "OpenTelemetry's Prometheus exporter",
                "opentelemetry.exporter.prometheus",
                ("pip install opentelemetry-sdk opentelemetry-exporter-prometheus",),
                "remove `use_otel_metrics` (or report to tensorboard / wandb / mlflow)",
            )
        )
    return needs


def compat4_notes(cfg: NewtuneConfig) -> list[str]:
    """Warnings: eta_min is read although Axolotl drops it."""
    if cfg.eta_min is None:
        return []
    return [
        f"warning: `eta_min: {cfg.eta_min}` is read as the absolute floor of the cosine "
        f"schedule (transformers' cosine_with_min_lr, min_lr): the lr decays from "
        f"{cfg.learning_rate} to {cfg.eta_min}. Axolotl drops this key unread (its cosine "
        "decays to 0 unless cosine_min_lr_ratio is set), so the same file trains differently "
        "there"
    ]
