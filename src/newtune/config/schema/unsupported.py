"""Axolotl keys newtune does not implement, with the alternative where there is one."""

from pydantic import Field

from newtune.config.schema.base import Section, ignored, unsupported
from newtune.config.schema.compat import refused


def _liger(key: str) -> str:
    return f"`{key}: true` (liger-kernel: `pip install 'newtune[liger]'`)"


class UnsupportedSection(Section):
    """Accepted when off (null/false/empty); any other value is an error naming the alternative."""

    s2_attention: bool | None = unsupported("Shifted sparse attention (LongLoRA).")
    xformers_attention: bool | None = unsupported(
        "xformers attention.", "`attn_implementation: sdpa`"
    )
    flash_optimum: bool | None = refused(
        "optimum's BetterTransformer.",
        "`flash_optimum` converts the model with optimum's BetterTransformer, which optimum "
        "deprecated and which does not convert transformers 5 models; transformers' own sdpa "
        "attention runs the same fused kernels",
        "`attn_implementation: sdpa`",
    )
    flash_attn_cross_entropy: bool | None = unsupported(
        "Fused cross-entropy.", _liger("liger_cross_entropy")
    )
    flash_attn_rms_norm: bool | None = refused(
        "flash-attn's fused RMSNorm (removed from Axolotl).",
        "`flash_attn_rms_norm` was removed from Axolotl (its schema raises 'no longer "
        "supported' when it is true)",
        _liger("liger_rms_norm"),
    )
    flash_attn_fuse_qkv: bool | None = unsupported("Fused QKV projection.")
    flash_attn_fuse_mlp: bool | None = Field(
        default=None,
        description="Fuse each gated MLP's gate and up projections into one packed GEMM "
        "(Axolotl's fused MLP, there xformers' packed SwiGLU): the model's gate_proj/up_proj "
        "weights are stacked into one `gate_up_proj` matrix, then `act(gate) * up` "
        "(liger-kernel's fused SiLU-mul on CUDA when installed, torch otherwise) and "
        "down_proj; exact to the unfused MLP. Checkpoints and the final model keep the "
        "model's own gate_proj/up_proj keys. Full fine-tunes only (refused with "
        "`adapter: lora/qlora`, as in Axolotl: the adapter targets gate_proj/up_proj, which "
        "the fused module no longer has), not with ZeRO-3/FSDP or `liger_glu_activation`; "
        "dense gated-MLP model types only (Llama, Mistral, Qwen2/3, Gemma 1-3, OLMo, "
        "Granite, Cohere, StableLM, ...), others refused when the model loads.",
    )
    torchdistx_path: str | None = unsupported("torchdistx deferred init.")
    is_llama_derived_model: bool | None = ignored("newtune reads the model type from its config.")
    is_falcon_derived_model: bool | None = ignored("newtune reads the model type from its config.")
    is_mistral_derived_model: bool | None = ignored("newtune reads the model type from its config.")
    is_qwen_derived_model: bool | None = ignored("newtune reads the model type from its config.")
