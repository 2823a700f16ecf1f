"""Axolotl keys read as Axolotl reads them, and Axolotl's legacy or dropped keys, refused by name.

Axolotl silently drops keys it does not know (pydantic's `extra="ignore"`), so some keys in its
own example configs do nothing there. newtune never ignores a value silently: such a key is
accepted when off (null/false/empty) and refused with the reason when set.
"""

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from newtune.config.schema.base import Section


def refused(description: str, reason: str, alternative: str | None = None) -> Any:
    """A key accepted when off; any other value is refused with `reason` (and the alternative)."""
    extra = {"status": "not implemented", "reason": reason}
    if alternative:
        extra["alternative"] = alternative
    return Field(default=None, description=description, json_schema_extra=extra)


ATTENTION = ("eager", "sdpa", "flash_attention_2", "flex_attention", "xformers")
HUB_KERNEL = re.compile(r"^[\w.-]+/[\w.-]+(@[\w.-]+)?(:[\w.-]+)?$")  # org/repo[@rev][:name]
AXOLOTL_DROPS = "is not an Axolotl key (Axolotl drops it unread, so it does nothing there)"
COMPILE_KWARGS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")
AXOLOTL_REMOVED = "was removed from Axolotl (it drops or rejects the key)"


class CompatSection(Section):
    """Keys of Axolotl's configs that newtune reads as Axolotl does, or refuses by name."""

    float16: bool | None = Field(
        default=None,
        description="Load the weights in float16 and train them without mixed precision "
        "(Axolotl's non-AMP float16); `fp16: true` is float16 with AMP and wins when both are set.",
    )
    eval_strategy: Literal["no", "steps", "epoch"] | None = Field(
        default=None,
        description="`no`: no evaluation during training; `epoch`: at each epoch's end; `steps`: "
        "every eval_steps / evals_per_epoch (default: steps when those are set, else epoch).",
    )
    save_only_model: bool | None = Field(
        default=None,
        description="Checkpoints hold the weights only (no optimizer, scheduler or RNG state): "
        "smaller, but a run cannot resume from them.",
    )
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune"] | None = Field(
        default=None, description="torch.compile mode (with torch_compile)."
    )
    low_cpu_mem_usage: bool | None = Field(
        default=None,
        description="`true` is how transformers 5 always loads (one copy of the weights in "
        "memory); `false` cannot be honoured and is refused.",
    )
    experimental_skip_move_to_device: bool | None = Field(
        default=None,
        description="`true` (Axolotl's default): the loader does not move the model to the "
        "device; the Trainer (DDP/FSDP/DeepSpeed) places it. newtune always works this way; "
        "`false` is refused.",
    )
    ddp: bool | None = Field(
        default=None,
        description="Whether the run uses DDP; newtune uses it exactly when launched on several "
        "processes, and `train` refuses a value that disagrees with the launch.",
    )
    use_wandb: bool | None = Field(
        default=None,
        description="Report to Weights & Biases; newtune reports when `wandb_project` is set, "
        "so `true` needs it and `false` contradicts it.",
    )
    lora_mlp_kernel: bool | None = Field(
        default=None,
        description="Axolotl's fused Triton LoRA MLP kernel; newtune has none (peft runs the "
        "same math unfused): `false` is accepted, `true` validates with a warning and `train` "
        "refuses it.",
    )
    lora_qkv_kernel: bool | None = Field(
        default=None, description="Axolotl's fused LoRA QKV kernel; as lora_mlp_kernel."
    )
    lora_o_kernel: bool | None = Field(
        default=None,
        description="Axolotl's fused LoRA output-projection kernel; as lora_mlp_kernel.",
    )
    lora_embedding_kernel: bool | None = Field(
        default=None, description="Axolotl's fused LoRA embedding kernel; as lora_mlp_kernel."
    )
    accelerator_config: dict[str, Any] | None = Field(
        default=None,
        description="accelerate options passed to TrainingArguments.accelerator_config "
        "(e.g. {gradient_accumulation_kwargs: {sync_each_batch: true}}).",
    )
    full_finetune: Any = refused(
        "Not an Axolotl key.",
        f"`full_finetune` {AXOLOTL_DROPS}",
        "a config without `adapter` (that is a full fine-tune)",
    )
    test_value: Any = refused("Not an Axolotl key.", f"`test_value` {AXOLOTL_DROPS}")
    adam_eps: Any = refused(
        "Not an Axolotl key.", f"`adam_eps` {AXOLOTL_DROPS}", "`adam_epsilon` (AdamW epsilon)"
    )
    torch_dtype: Any = refused(
        "Not an Axolotl key.",
        f"`torch_dtype` {AXOLOTL_DROPS}; the dtype follows bf16 / fp16 / float16",
        "`bf16: true`, `fp16: true` or `float16: true`",
    )
    eta_min: float | None = Field(
        default=None,
        ge=0,
        description="Absolute floor of the cosine schedule (transformers' cosine_with_min_lr, "
        "`min_lr`): the lr decays from learning_rate to eta_min. Axolotl drops this key unread "
        "(its cosine decays to 0), so validate warns; cosine_min_lr_ratio is the relative form.",
    )
    gptq_groupsize: Any = refused(
        "Pre-2024 GPTQ group size.", f"`gptq_groupsize` {AXOLOTL_REMOVED}"
    )
    gptq_model_v1: Any = refused(
        "Pre-2024 GPTQ model format.", f"`gptq_model_v1` {AXOLOTL_REMOVED}"
    )
    max_packed_sequence_len: Any = refused(
        "Legacy packing length.",
        f"`max_packed_sequence_len` {AXOLOTL_REMOVED}",
        "`sample_packing: true` with `sequence_len`",
    )
    sample_packing_seq_len_multiplier: Any = refused(
        "Legacy packing multiplier.",
        f"`sample_packing_seq_len_multiplier` {AXOLOTL_REMOVED}",
        "`sample_packing: true` (newtune packs rows of `sequence_len` x `micro_batch_size`)",
    )
    flex_attn_compile_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="torch.compile keyword arguments (fullgraph, dynamic, backend, mode, "
        "options, disable) for flex attention, e.g. {dynamic: false, mode: "
        "max-autotune-no-cudagraphs}: transformers' compiled flex function "
        "(WrappedFlexAttention) is built with them. With attn_implementation: flex_attention; "
        "not with torch_compile (the whole model is compiled then).",
    )

    @field_validator("flex_attn_compile_kwargs")
    @classmethod
    def _compile_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Only torch.compile's own keyword arguments."""
        unknown = sorted(set(value or {}) - set(COMPILE_KWARGS))
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not torch.compile "
                f"arguments; use {', '.join(COMPILE_KWARGS)}"
            )
        return value

    @field_validator("attn_implementation", check_fields=False)
    @classmethod
    def _known_attention(cls, value: str | None) -> str | None:
        """An attention transformers runs, or a hub kernel `org/repo` (kernels integration)."""
        if value is None or value in ATTENTION or HUB_KERNEL.match(value):
            return value
        raise ValueError(
            f"`{value}` is not an attention newtune runs; choose eager, sdpa (default), "
            "flash_attention_2, flex_attention, xformers (read as sdpa) or a hub kernel "
            "`org/repo` such as kernels-community/vllm-flash-attn3"
        )

    @field_validator("tokens", mode="before", check_fields=False)
    @classmethod
    def _tokens_is_a_list(cls, value: object) -> object:
        """`tokens` is a list of new tokens; a mapping of token roles belongs in special_tokens."""
        if isinstance(value, dict):
            raise ValueError(
                "`tokens` is the list of tokens to add to the vocabulary (e.g. ['<a>', '<b>']); "
                "a mapping of token roles (bos_token, eos_token, pad_token, ...) is "
                "`special_tokens:`, so move it there (Axolotl refuses a mapping here too)"
            )
        return value

    @field_validator("cosine_constant_lr_ratio", mode="before", check_fields=False)
    @classmethod
    def _zero_ratio_is_unset(cls, value: object) -> object:
        """`cosine_constant_lr_ratio: 0` is unset, as in Axolotl (a falsy ratio is skipped)."""
        return None if value == 0 and not isinstance(value, bool) else value

    @field_validator("warmup_steps", mode="before", check_fields=False)
    @classmethod
    def _warmup_fraction(cls, value: object) -> object:
        """A fraction below 1 is kept (a ratio, as transformers reads it); 2.0 becomes 2."""
        if isinstance(value, float) and not isinstance(value, bool):
            if 0 < value < 1:
                return value
            if value.is_integer():
                return int(value)
            raise ValueError(
                f"`warmup_steps: {value}` is neither a whole number of steps nor a fraction "
                "below 1; write e.g. `warmup_steps: 10` or `warmup_ratio: 0.1`"
            )
        return value

    @field_validator("lora_target_modules", check_fields=False)
    @classmethod
    def _regex_compiles(cls, value: object) -> object:
        """A string target is a regex (peft full-matches it): it must compile."""
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(
                    f"a string is a regex matched against full module names, and {value!r} is "
                    f"not a valid regex ({exc}); fix it, or give a list of module names"
                ) from None
        return value
