"""Keys of the LoRA adapter."""

from typing import Any, Literal

from pydantic import Field, field_validator

from newtune.config.schema.base import MERGE, MODELS, Section, planned


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
    lora_target_modules: list[str] | None = Field(
        default=None, description="Module names to adapt, e.g. [q_proj, v_proj]."
    )
    lora_target_linear: bool | None = Field(
        default=None, description="Adapt every linear layer except the output head."
    )
    lora_modules_to_save: list[str] | None = planned(MODELS, "Modules trained in full and saved.")
    lora_fan_in_fan_out: bool | None = planned(MODELS, "Weights stored as (fan_in, fan_out).")
    lora_on_cpu: bool | None = planned(MERGE, "Merge the adapter on the CPU.")
    peft_layers_to_transform: list[int] | None = planned(MODELS, "Only adapt these layer indices.")
    peft_use_rslora: bool | None = planned(MODELS, "Rank-stabilised LoRA scaling.")
    peft_use_dora: bool | None = planned(MODELS, "Weight-decomposed LoRA (DoRA).")
    peft: dict[str, Any] | None = planned(MODELS, "Extra peft options, e.g. loftq_config.")

    @field_validator("adapter", mode="before")
    @classmethod
    def _empty_adapter_is_none(cls, value: object) -> object:
        """Axolotl configs write `adapter:` with no value for a full fine-tune."""
        return None if value == "" else value
