"""Keys that choose the base model, its tokenizer, precision and attention."""

from typing import Any, Literal

from pydantic import Field

from newtune.config.schema.base import MERGE, MODELS, Section, planned

AttnImplementation = Literal["eager", "sdpa", "flash_attention_2"]


class ModelSection(Section):
    """Base model, tokenizer, precision and attention."""

    base_model: str = Field(
        description="Hub id, local folder, or a .gguf file of the model to fine-tune."
    )
    base_model_config: str | None = planned(MODELS, "Where to read the model config from.")
    base_model_ignore_patterns: str | list[str] | None = planned(
        MERGE, "File patterns to skip when fetching the base model."
    )
    revision_of_model: str | None = planned(
        MODELS, "Hub revision (branch, tag, commit) of the model."
    )
    model_type: str | None = planned(MODELS, "Model class to load, e.g. AutoModelForCausalLM.")
    tokenizer_config: str | None = Field(
        default=None, description="Where to load the tokenizer from; defaults to base_model."
    )
    tokenizer_type: str | None = planned(MODELS, "Tokenizer class to load.")
    tokenizer_use_fast: bool | None = planned(MODELS, "Use the fast (Rust) tokenizer.")
    tokenizer_legacy: bool | None = planned(MODELS, "Legacy mode of Llama/T5 tokenizers.")
    trust_remote_code: bool | None = planned(MODELS, "Allow code from the model repository.")
    special_tokens: dict[str, str] | None = planned(MODELS, "bos/eos/pad/unk tokens to set.")
    tokens: list[str] | None = planned(MODELS, "Tokens to add to the vocabulary.")
    resize_token_embeddings_to_32x: bool | None = planned(
        MODELS, "Pad the embedding matrix to a multiple of 32."
    )
    default_system_message: str | None = planned(MODELS, "System message added to chats.")
    bf16: bool | Literal["auto"] | None = Field(
        default=None, description="Train in bfloat16; `auto` uses it when the device supports it."
    )
    fp16: bool | None = Field(default=None, description="Train in float16 mixed precision.")
    tf32: bool | None = planned(MODELS, "Allow TF32 matmuls on Ampere+ GPUs.")
    attn_implementation: AttnImplementation | None = Field(
        default=None,
        description="Attention kernel: eager, sdpa (default) or flash_attention_2.",
    )
    device_map: str | dict[str, Any] | None = planned(MODELS, "Where to place model layers.")
    max_memory: dict[str, Any] | None = planned(MODELS, "Memory cap per device.")
    gpu_memory_limit: int | str | None = planned(MODELS, "Memory cap per GPU.")
    overrides_of_model_config: dict[str, Any] | None = planned(
        MODELS, "Values that replace entries of the model config (e.g. rope_scaling)."
    )
    gradient_checkpointing: bool | Literal["unsloth", "offload"] | None = planned(
        MODELS, "Recompute activations in the backward pass to save memory."
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = planned(
        MODELS, "Options of gradient checkpointing, e.g. {use_reentrant: false}."
    )
    load_in_8bit: bool | None = planned(MODELS, "Load the base model in 8-bit (bitsandbytes).")
    load_in_4bit: bool | None = planned(MODELS, "Load the base model in 4-bit (bitsandbytes).")
    bnb_config_kwargs: dict[str, Any] | None = planned(MODELS, "Extra BitsAndBytesConfig options.")
