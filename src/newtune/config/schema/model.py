"""Keys that choose the base model, its tokenizer and its precision."""

from typing import Literal

from pydantic import Field

from newtune.config.schema.base import Section


class ModelSection(Section):
    """Base model, tokenizer and precision."""

    base_model: str = Field(
        description="Hub id, local folder, or a .gguf file of the model to fine-tune."
    )
    tokenizer_config: str | None = Field(
        default=None, description="Where to load the tokenizer from; defaults to base_model."
    )
    bf16: bool | Literal["auto"] | None = Field(
        default=None, description="Train in bfloat16; `auto` uses it when the device supports it."
    )
    fp16: bool | None = Field(default=None, description="Train in float16 mixed precision.")
