"""Axolotl keys newtune does not implement, with the alternative where there is one."""


from newtune.config.schema.base import Section, ignored, unsupported


def _liger(key: str) -> str:
    return f"`{key}: true` (liger-kernel: `pip install 'newtune[liger]'`)"


class UnsupportedSection(Section):
    """Accepted when off (null/false/empty); any other value is an error naming the alternative."""

    s2_attention: bool | None = unsupported("Shifted sparse attention (LongLoRA).")
    xformers_attention: bool | None = unsupported(
        "xformers attention.", "`attn_implementation: sdpa`"
    )
    flash_optimum: bool | None = unsupported("BetterTransformer.", "`attn_implementation: sdpa`")
    flash_attn_cross_entropy: bool | None = unsupported(
        "Fused cross-entropy.", _liger("liger_cross_entropy")
    )
    flash_attn_rms_norm: bool | None = unsupported("Fused RMSNorm.", _liger("liger_rms_norm"))
    flash_attn_fuse_qkv: bool | None = unsupported("Fused QKV projection.")
    flash_attn_fuse_mlp: bool | None = unsupported("Fused MLP.", _liger("liger_glu_activation"))
    torchdistx_path: str | None = unsupported("torchdistx deferred init.")
    is_llama_derived_model: bool | None = ignored("newtune reads the model type from its config.")
    is_falcon_derived_model: bool | None = ignored("newtune reads the model type from its config.")
    is_mistral_derived_model: bool | None = ignored("newtune reads the model type from its config.")
    is_qwen_derived_model: bool | None = ignored("newtune reads the model type from its config.")
