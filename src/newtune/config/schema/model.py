"""Keys that choose the base model, its tokenizer, precision and attention."""

from typing import Any, Literal

from pydantic import Field

from newtune.config.schema.base import Section


class ModelSection(Section):
    """Base model, tokenizer, precision and attention."""

    base_model: str = Field(
        description="Hub id, local folder, or a .gguf file of the model to fine-tune."
    )
    base_model_config: str | None = Field(
        default=None, description="Where to read the model config from."
    )
    base_model_ignore_patterns: str | list[str] | None = Field(
        default=None, description="File patterns to skip when merge-lora fetches a hub base model."
    )
    revision_of_model: str | None = Field(
        default=None, description="Hub revision (branch, tag, commit) of the model."
    )
    model_type: str | None = Field(
        default=None,
        description="transformers class to load, e.g. AutoModelForCausalLM (default) or LlamaForCausalLM.",
    )
    tokenizer_config: str | None = Field(
        default=None, description="Where to load the tokenizer from; defaults to base_model."
    )
    tokenizer_type: str | None = Field(
        default=None, description="transformers tokenizer class to load (default AutoTokenizer)."
    )
    tokenizer_use_fast: bool | None = Field(
        default=None, description="Use the fast (Rust) tokenizer."
    )
    tokenizer_legacy: bool | None = Field(
        default=None, description="Legacy mode of Llama/T5 tokenizers."
    )
    trust_remote_code: bool | None = Field(
        default=None, description="Allow code from the model repository."
    )
    special_tokens: dict[str, str] | None = Field(
        default=None,
        description="Special tokens to set: bos_token, eos_token, pad_token, unk_token, ...",
    )
    tokens: list[str] | None = Field(
        default=None,
        description="Tokens to add to the vocabulary (the embeddings grow; with LoRA they train in full).",
    )
    resize_token_embeddings_to_32x: bool | None = Field(
        default=None,
        description="When tokens are added, pad the embedding matrix to a multiple of 32 (default 64).",
    )
    default_system_message: str | None = Field(
        default=None,
        description="System message put first in every chat that has none (training and inference).",
    )
    bf16: bool | Literal["auto"] | None = Field(
        default=None, description="Train in bfloat16; `auto` uses it when the device supports it."
    )
    fp16: bool | None = Field(default=None, description="Train in float16 mixed precision.")
    tf32: bool | None = Field(default=None, description="Allow TF32 matmuls on Ampere+ GPUs.")
    attn_implementation: str | None = Field(
        default=None,
        description="Attention kernel: eager, sdpa (default), flash_attention_2, flex_attention "
        "(CUDA), a hub kernel `org/repo` (transformers' kernels integration, `pip install "
        "kernels`), or xformers (read as sdpa, which runs xformers' memory-efficient kernel).",
    )
    device_map: str | dict[str, Any] | None = Field(
        default=None, description="Where to place model layers."
    )
    max_memory: dict[str, Any] | None = Field(default=None, description="Memory cap per device.")
    gpu_memory_limit: int | str | None = Field(
        default=None,
        description='Memory cap per GPU (GiB as a number, or e.g. "20GiB"); used with device_map: auto.',
    )
    overrides_of_model_config: dict[str, Any] | None = Field(
        default=None,
        description="Values that replace entries of the model config (e.g. rope_scaling).",
    )
    gradient_checkpointing: bool | Literal["unsloth", "offload"] | None = Field(
        default=None,
        description="Recompute activations in the backward pass to save memory; `offload` (or `unsloth`) also keeps the saved activations in CPU memory.",
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        default=None, description="Options of gradient checkpointing, e.g. {use_reentrant: false}."
    )
    load_in_8bit: bool | None = Field(
        default=None, description="Load the base model in 8-bit (bitsandbytes)."
    )
    load_in_4bit: bool | None = Field(
        default=None, description="Load the base model in 4-bit (bitsandbytes)."
    )
    bnb_config_kwargs: dict[str, Any] | None = Field(
        default=None, description="Extra BitsAndBytesConfig options."
    )
