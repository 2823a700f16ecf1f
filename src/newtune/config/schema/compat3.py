"""Axolotl keys of issue 16, part 3: data order and deduplication, weight re-init, kernel and
attention patches, transformers quantization configs.

Each key is implemented on the library that does the job, or refused by name with the reason
(Axolotl's own patched modeling code); a refused key is accepted when off (null/false).
"""

from typing import Any, Literal

from pydantic import Field, model_validator

from newtune.config.schema.base import Section
from newtune.config.schema.compat import refused

# transformers quantization configs Axolotl's model_quantization_config names
QUANT_CLASSES = ("Mxfp4Config", "FineGrainedFP8Config")
OWN = "is Axolotl's own patched modeling code (no transformers, peft or kernel-package equivalent)"


# keys Axolotl's diffusion trainer validates but never reads: accepted, and documented so
UNREAD = {"status": "ignored"}


class DiffusionArgs(Section):
    """Axolotl's `diffusion:` block (DiffusionPlugin), with Axolotl's defaults (null: default)."""

    noise_schedule: Literal["linear", "cosine"] = Field(
        default="linear",
        json_schema_extra=UNREAD,
        description="Accepted for Axolotl compatibility; Axolotl's trainer does not read it "
        "(t is drawn uniformly and p = (1 - eps) t + eps), and neither does newtune.",
    )
    min_mask_ratio: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        json_schema_extra=UNREAD,
        description="Accepted for Axolotl compatibility (must be <= max_mask_ratio); like "
        "Axolotl's trainer, newtune's mask probability does not read it.",
    )
    max_mask_ratio: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        json_schema_extra=UNREAD,
        description="Accepted for Axolotl compatibility; unread by the training objective.",
    )
    num_diffusion_steps: int = Field(
        default=128,
        ge=1,
        description="Denoising steps of `newtune inference` (max_new_tokens mask tokens "
        "appended to the prompt and filled, as Axolotl's inference completion mode); training "
        "samples use `generation_steps`.",
    )
    eps: float = Field(
        default=1e-3,
        ge=0.0,
        le=1.0,
        description="Smallest mask probability: p = (1 - eps) t + eps with t ~ U(0, 1).",
    )
    importance_weighting: bool = Field(
        default=True,
        description="Divide each masked token's cross-entropy by its mask probability p (1/t "
        "weighting of the LLaDA objective).",
    )
    mask_token_id: int | None = Field(
        default=None,
        ge=0,
        description="Token id that replaces masked tokens (e.g. 128002, a reserved special "
        "token of Llama 3); must be below the tokenizer's vocab size. Unset: mask_token_str.",
    )
    mask_token_str: str | None = Field(
        default=None,
        description="Mask token used when mask_token_id is unset: an existing special token "
        "of that text, else added as a special token (the embeddings grow); default "
        "`<|diffusion_mask|>`.",
    )
    generate_samples: bool = Field(
        default=True,
        description="Every generation_interval steps, mask sequences of the eval (else train) "
        "data and denoise them; the original, masked and generated texts are logged.",
    )
    generation_interval: int = Field(
        default=100, ge=1, description="Optimizer steps between sample generations."
    )
    num_generation_samples: int = Field(
        default=3, ge=1, description="Sequences denoised at each generation."
    )
    generation_steps: int = Field(
        default=128,
        ge=1,
        description="Denoising steps per sample: each unmasks the most confident predictions.",
    )
    generation_temperature: float = Field(
        default=0.0,
        ge=0.0,
        description="Sampling temperature of the denoising steps (0: greedy).",
    )
    generation_max_length: int = Field(
        default=100, ge=1, description="Longest sequence (tokens) taken as a sample."
    )

    @model_validator(mode="after")
    def _ratios(self) -> "DiffusionArgs":
        """min_mask_ratio must not exceed max_mask_ratio (as Axolotl checks)."""
        if self.min_mask_ratio > self.max_mask_ratio:
            raise ValueError(
                f"min_mask_ratio ({self.min_mask_ratio}) must be <= max_mask_ratio "
                f"({self.max_mask_ratio})"
            )
        return self


class Compat3Section(Section):
    """Axolotl data-order, re-init, kernel and quantization keys: implemented, or refused."""

    dataset_exact_deduplication: bool | None = Field(
        default=None,
        description="Drop rows whose tokenized content (input_ids and labels) repeats an "
        "earlier row, in the training data and separately in test_datasets, as Axolotl does "
        "after tokenizing; counted in stats.json (`dropped_duplicates`).",
    )
    reinit_weights: bool | None = Field(
        default=None,
        description="Build the model from its config with freshly initialised weights "
        "(transformers' `from_config`, the model's `_init_weights`) instead of loading the "
        "pretrained weights: training from scratch on the base model's architecture.",
    )
    curriculum_sampling: bool | None = Field(
        default=None,
        description="Train on the rows in dataset order (no shuffle): transformers' "
        "`train_sampling_strategy: sequential`, or packed bins in order with sample_packing.",
    )
    sample_packing_sequentially: bool | None = Field(
        default=None,
        description="With sample_packing: next-fit packing that keeps the sampler's order "
        "(a bin is closed when the next row does not fit) instead of best-fit-decreasing; "
        "with curriculum_sampling the whole epoch is in dataset order.",
    )
    pretrain_multipack_attn: bool | None = Field(
        default=None,
        description="Packed streamed pretraining rows attend only within their own sample. "
        "newtune always isolates packed samples (position_ids restart per sample), so `true` "
        "is what it does and `false` (attention across samples) is refused.",
    )
    liger_rms_norm_gated: bool | None = Field(
        default=None,
        description="liger-kernel's gated RMSNorm (Qwen3-Next / Qwen3.5 linear-attention "
        "layers), passed as `rms_norm_gated` to liger's function for the model type; train "
        "refuses it when that function has no such switch.",
    )
    tiled_mlp: bool | None = Field(
        default=None,
        description="ALST tiled MLP for long sequences: each decoder layer's dense MLP runs "
        "over shards of the sequence and is recomputed shard by shard in backward, so only "
        "one shard's intermediate activations are alive (exact: same outputs and gradients). "
        "Under `deepspeed` DeepSpeed's TiledMLP runs it (needs deepspeed); single process, "
        "DDP and FSDP2 use torch.utils.checkpoint per shard. Mixture-of-experts blocks are not "
        "tiled.",
    )
    tiled_mlp_num_shards: int | None = Field(
        default=None,
        ge=1,
        description="Shards of `tiled_mlp`; unset: one per 32768 tokens of the sequence "
        "(under DeepSpeed the ranks agree on the largest count).",
    )
    tiled_mlp_use_original_mlp: bool | None = Field(
        default=True,
        description="`tiled_mlp` tiles the model's own MLP forward (true, the default); false "
        "tiles Llama's gated forward `down(act(gate(x)) * up(x))` on the module's own "
        "projections (models with gate_proj/up_proj/down_proj only; Axolotl also "
        "torch.compiles it, newtune does not).",
    )
    fused_attn_kernel: bool | None = Field(
        default=None,
        description="Fuse the attention's per-head q_norm/k_norm RMSNorm and rotary embedding "
        "(and Gemma 4's v_norm) into one kernel, as Axolotl's Triton kernel does: newtune "
        "compiles exactly that region with torch.compile (one Inductor kernel for q and k, "
        "Triton on a GPU, a C++ loop on a CPU; the same math as the unfused model). "
        "Model types qwen3, qwen3_moe, qwen3_vl(_text), qwen3_5(_text), qwen3_5_moe(_text), "
        "gemma4(_text), gemma4_unified(_text); others are refused (at validate when the "
        "model's config.json is local or cached, else when it loads). Works with LoRA, "
        "packing, gradient checkpointing and `torch_compile: true` (the whole-model compile "
        "then traces the rewritten attention and fuses the region in its graph). Training "
        "only; liger's RoPE is not used by the fused attention.",
    )
    gemma4_hybrid_attn_impl: bool | None = Field(
        default=None,
        description="Gemma 4 hybrid attention: the sliding-window layers run "
        "`attn_implementation` (flash_attention_2, the default with this key; another value "
        "is refused) and the full-attention layers, whose head_dim 512 flash-attention "
        "cannot run, run sdpa: each gets a config copy with `_attn_implementation: sdpa` and "
        "the mask transformers' create_causal_mask builds for sdpa (block-diagonal over packed "
        "rows). Gemma 4 models only (model_type gemma4 / gemma4_unified); refused for others "
        "when the model loads.",
    )

    @model_validator(mode="before")
    @classmethod
    def _hybrid_attention(cls, data: Any) -> Any:
        """`gemma4_hybrid_attn_impl: true` without attn_implementation means flash_attention_2
        (as Axolotl); another attn_implementation is refused by the rules (config/compat3)."""
        if not isinstance(data, dict) or data.get("gemma4_hybrid_attn_impl") is not True:
            return data
        if data.get("attn_implementation") is None:
            return {**data, "attn_implementation": "flash_attention_2"}
        return data

    model_quantization_config: Literal["Mxfp4Config", "FineGrainedFP8Config"] | None = Field(
        default=None,
        description="A transformers quantization config class (Mxfp4Config, "
        "FineGrainedFP8Config) built with model_quantization_config_kwargs and passed to "
        "from_pretrained as `quantization_config` (e.g. Mxfp4Config(dequantize=True) loads "
        "gpt-oss's MXFP4 experts as bf16). Not with load_in_4bit/8bit.",
    )
    model_quantization_config_kwargs: dict[str, Any] | None = Field(
        default=None, description="Keyword arguments of model_quantization_config's class."
    )
    cls_model_config: str | None = Field(
        default=None,
        description="A transformers config class (e.g. Gemma3TextConfig) that reads the base "
        "model's config instead of AutoConfig, e.g. to train the text model of a multimodal "
        "checkpoint; the model class follows from it.",
    )
    use_onebitllms: bool | None = Field(
        default=None,
        description="1.58-bit (BitNet) fine-tuning of a pre-quantized checkpoint (e.g. "
        "tiiuae/Falcon-E-*-prequantized): after loading, onebitllms' "
        "`replace_linear_with_bitnet_linear` swaps every linear layer but lm_head for its "
        "BitNetLinear. The saved weights keep the bf16 layout; onebitllms' `quantize_to_1bit` "
        "makes the 1-bit checkpoint. Full fine-tunes only; needs `pip install onebitllms` and a "
        "CUDA GPU (Triton kernels).",
    )
    use_eaft: bool | None = Field(
        default=None,
        description="EAFT, entropy-aware focal training (SFT only): each trained token's "
        "cross-entropy is weighted by H^eaft_alpha, H the entropy of the softmax over the "
        "model's eaft_k largest logits there (no gradient through the weight), summed and "
        "divided by the step's trained tokens. The logged eval_loss stays the plain token "
        "cross-entropy. Not with fused heads (liger_fused_linear_cross_entropy, "
        "cut_cross_entropy), which never materialise the logits.",
    )
    eaft_alpha: float | None = Field(
        default=None, ge=0, description="EAFT's entropy exponent (default 1.0; 0 = plain CE)."
    )
    eaft_k: int | None = Field(
        default=None, gt=0, description="EAFT: top-k logits the entropy is taken over (default 20)."
    )
    diffusion: DiffusionArgs | None = Field(
        default=None,
        description="Masked-diffusion language-model training (LLaDA-style), read when "
        "`plugins` lists axolotl.integrations.diffusion.DiffusionPlugin (the plugin alone "
        "trains with these defaults): each row gets a mask ratio t ~ U(0, 1), its trainable "
        "tokens are replaced by the mask token with probability p = (1 - eps) t + eps, the "
        "model attends bidirectionally (packed samples stay isolated) and learns to predict "
        "the masked tokens (newtune.train.methods.diffusion).",
    )
    llmcompressor: Any = refused(
        "Axolotl's LLMCompressorPlugin recipe (sparse fine-tuning).",
        "`llmcompressor` is read by Axolotl's LLMCompressorPlugin, which newtune does not run",
        "a dense fine-tune (remove the key and the plugin)",
    )
    context_parapllel_size: Any = refused(
        "A misspelling in an Axolotl example.",
        "`context_parapllel_size` is not an Axolotl key (Axolotl drops it unread, so it does "
        "nothing there)",
        "`context_parallel_size` if context parallelism is meant",
    )
