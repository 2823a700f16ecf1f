"""Axolotl keys newtune does not implement, with the alternative where there is one."""


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
    flash_attn_fuse_mlp: bool | None = refused(
        "Axolotl's fused Llama MLP (xformers' packed SwiGLU).",
        "`flash_attn_fuse_mlp` swaps Llama's MLP for Axolotl's own FusedMLP (gate and up "
        "weights packed into one matrix for xformers' swiglu_packedw op; Axolotl skips it "
        "silently where xformers lacks that op, and refuses it with LoRA); no library newtune "
        "runs provides that module",
        _liger("liger_glu_activation") + ", liger-kernel's fused SwiGLU",
    )
    torchdistx_path: str | None = unsupported("torchdistx deferred init.")
    is_llama_derived_model: bool | None = ignored("newtune reads the model type from its config.")
    is_falcon_derived_model: bool | None = ignored("newtune reads the model type from its config.")
    is_mistral_derived_model: bool | None = ignored("newtune reads the model type from its config.")
    is_qwen_derived_model: bool | None = ignored("newtune reads the model type from its config.")
