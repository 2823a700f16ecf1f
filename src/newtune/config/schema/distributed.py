"""Keys of multi-device training."""

import difflib
from typing import Any

from pydantic import Field, field_validator

from newtune.config.schema.base import Section, ignored

# `fsdp:` options (Axolotl's list, as in transformers' FSDPOption).
FSDP_OPTIONS = (
    "full_shard",
    "shard_grad_op",
    "hybrid_shard",
    "hybrid_shard_zero2",
    "no_shard",
    "offload",
    "auto_wrap",
)
# `fsdp_config:` keys -> the name transformers' fsdp_config uses. Axolotl's `fsdp_`-prefixed
# spellings and the newer unprefixed ones are both accepted.
FSDP_CONFIG_KEYS = {
    "version": "version",
    "offload_params": "cpu_offload",
    "cpu_offload": "cpu_offload",
    "state_dict_type": "state_dict_type",
    "auto_wrap_policy": "auto_wrap_policy",
    "transformer_layer_cls_to_wrap": "transformer_layer_cls_to_wrap",
    "min_num_params": "min_num_params",
    "sharding_strategy": "sharding_strategy",
    "reshard_after_forward": "reshard_after_forward",
    "activation_checkpointing": "activation_checkpointing",
    "cpu_ram_efficient_loading": "cpu_ram_efficient_loading",
    "sync_module_states": "sync_module_states",
    "use_orig_params": "use_orig_params",
    "forward_prefetch": "forward_prefetch",
    "backward_prefetch": "backward_prefetch",
    "limit_all_gathers": "limit_all_gathers",
}
FSDP_STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")
FSDP_WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
FSDP_SHARDING_STRATEGIES = (
    "FULL_SHARD",
    "SHARD_GRAD_OP",
    "NO_SHARD",
    "HYBRID_SHARD",
    "HYBRID_SHARD_ZERO2",
)
FSDP_CHOICES = {
    "state_dict_type": FSDP_STATE_DICT_TYPES,
    "auto_wrap_policy": FSDP_WRAP_POLICIES,
    "sharding_strategy": FSDP_SHARDING_STRATEGIES,
    "backward_prefetch": ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"),
}


def fsdp_option_list(value: list[str] | str | None) -> list[str]:
    """The `fsdp:` value as a list of lower-case options (`"full_shard auto_wrap"` is split)."""
    if not value:
        return []
    items = value.split() if isinstance(value, str) else value
    return [str(item).strip().lower() for item in items]


def fsdp_config_key(key: str) -> str | None:
    """The transformers name of an `fsdp_config` key, or None when it is unknown."""
    bare = key[5:] if key.startswith("fsdp_") else key
    return FSDP_CONFIG_KEYS.get(bare)


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


class DistributedSection(Section):
    """DeepSpeed, FSDP and DDP settings."""

    deepspeed: str | dict[str, Any] | None = Field(
        default=None,
        description="DeepSpeed config: a JSON file (relative to the working directory or the "
        "config file), a shipped name (`deepspeed_configs/zero2.json`, `zero3_bf16`, ...) or an "
        'inline mapping. `"auto"` values are filled from the config.',
    )
    fsdp: list[str] | str | None = Field(
        default=None,
        description="FSDP options, e.g. [full_shard, auto_wrap] (also offload, shard_grad_op, "
        "hybrid_shard, no_shard). FSDP runs on GPUs only.",
    )
    fsdp_config: dict[str, Any] | None = Field(
        default=None,
        description="FSDP plugin settings: offload_params, state_dict_type, auto_wrap_policy, "
        "transformer_layer_cls_to_wrap, reshard_after_forward, activation_checkpointing, "
        "cpu_ram_efficient_loading, version, ... (with or without Axolotl's `fsdp_` prefix).",
    )
    fsdp_version: int | None = Field(
        default=None, ge=1, le=2, description="FSDP version: 2 (fully_shard, default) or 1."
    )
    ddp_timeout: int | None = Field(
        default=None,
        gt=0,
        description="Seconds before a distributed operation times out (default 1800).",
    )
    ddp_bucket_cap_mb: int | None = Field(
        default=None, gt=0, description="DDP gradient bucket size in MB."
    )
    ddp_broadcast_buffers: bool | None = Field(
        default=None, description="DDP broadcasts module buffers at each forward."
    )
    ddp_find_unused_parameters: bool | None = Field(
        default=None,
        description="DDP looks for parameters without gradients each step (default: "
        "transformers decides; off for a plain model with gradient checkpointing).",
    )
    local_rank: int | None = ignored("Set by the launcher.")

    @field_validator("fsdp")
    @classmethod
    def _known_fsdp_options(cls, value: list[str] | str | None) -> list[str] | str | None:
        """Every `fsdp:` option is one FSDP knows."""
        for item in fsdp_option_list(value):
            if item not in FSDP_OPTIONS:
                raise ValueError(
                    f"unknown FSDP option `{item}`{_suggest(item, FSDP_OPTIONS)}; "
                    f"choose from {', '.join(FSDP_OPTIONS)}"
                )
        return value

    @field_validator("fsdp_config")
    @classmethod
    def _known_fsdp_config(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Every `fsdp_config` key is known and its value is one FSDP accepts."""
        seen: dict[str, str] = {}
        for key, item in (value or {}).items():
            name = fsdp_config_key(str(key))
            if name is None:
                known = sorted(FSDP_CONFIG_KEYS)
                raise ValueError(
                    f"unknown key `{key}`{_suggest(str(key).removeprefix('fsdp_'), known)}; "
                    f"known keys (with or without the `fsdp_` prefix): {', '.join(known)}"
                )
            if name in seen:
                raise ValueError(f"`{seen[name]}` and `{key}` set the same FSDP option; keep one")
            seen[name] = str(key)
            choices = FSDP_CHOICES.get(name)
            if choices and str(item).upper() not in choices:
                raise ValueError(f"`{key}: {item}` is not one of {', '.join(choices)}")
            if name == "version" and item not in (1, 2):
                raise ValueError(f"`{key}: {item}` must be 1 or 2")
        return value
