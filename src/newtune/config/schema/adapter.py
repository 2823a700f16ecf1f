"""Keys of the LoRA adapter."""

from typing import Any, Literal

from pydantic import Field, field_validator

from newtune.config.schema.base import Section


class AdapterSection(Section):
    """LoRA adapter settings."""

    adapter: Literal["lora", "qlora"] | None = Field(
        default=None, description="`lora` trains a LoRA adapter; absent trains all weights."
    )
    lora_model_dir: str | None = Field(
        default=None, description="An existing adapter to continue training or to use."
    )
    lora_r: int = Field(default=8, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(default=16, gt=0, description="LoRA scaling numerator.")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: str | list[str] | None = Field(
        default=None,
        description="Module names to adapt, e.g. [q_proj, v_proj] (a name matches a module "
        "name's last components), or one regex string matched against full module names "
        "(peft's re.fullmatch).",
    )
    lora_target_linear: bool | None = Field(
        default=None,
        description="Adapt every linear layer except the output head; with a "
        "lora_target_modules list, those modules too (Axolotl's union).",
    )
    lora_modules_to_save: list[str] | None = Field(
        default=None,
        description="Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head).",
    )
    lora_fan_in_fan_out: bool | None = Field(
        default=None, description="Weights stored as (fan_in, fan_out)."
    )
    lora_on_cpu: bool | None = Field(
        default=None,
        description="merge-lora: do the merge math on the CPU even when a GPU is present.",
    )
    peft_layers_to_transform: list[int] | None = Field(
        default=None, description="Only adapt these layer indices."
    )
    peft_use_rslora: bool | None = Field(default=None, description="Rank-stabilised LoRA scaling.")
    peft_use_dora: bool | None = Field(default=None, description="Weight-decomposed LoRA (DoRA).")
    peft: dict[str, Any] | None = Field(
        default=None,
        description="Extra peft LoraConfig options, e.g. {loftq_config: {loftq_bits: 4}}.",
    )

    @field_validator("adapter", mode="before")
    @classmethod
    def _empty_adapter_is_none(cls, value: object) -> object:
        """Axolotl configs write `adapter:` with no value for a full fine-tune."""
        return None if value == "" else value
