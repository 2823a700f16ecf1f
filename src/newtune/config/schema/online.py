"""Online RL keys: the `trl:` block (TRL's GRPOTrainer), `vllm:` and `ebft:` (energy-based
fine-tuning), with Axolotl's names and defaults.

`rl: ebft` (arXiv 2603.12248) trains on (prompt, ground_truth) rows: structured mode samples
`trl.num_generations` completions per prompt with TRL's GRPOTrainer and rewards them by feature
matching against the ground truth; strided mode (`ebft.mode: strided`) generates short blocks
inside raw documents. The `trl:` block holds what TRL's GRPOConfig reads; the `vllm:` block
configures vLLM: TRL reads its in-process settings under `trl.vllm_mode: colocate`, and in
server mode `newtune vllm-serve cfg.yml` starts TRL's server with its server settings (as
`axolotl vllm-serve` does); keys TRL's server has no option for are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from newtune.config.keys import is_off
from newtune.config.schema.base import Section, ignored, status_of
from newtune.config.schema.compat import refused

ONLINE_RL = ("ebft", "grpo", "gdpo")  # `rl:` values trained online (generation in the loop)
STRIDED_ONLY = (
    "stride",
    "context_length",
    "generate_max_len",
    "n_samples_per_prompt",
    "temperature",
    "top_p",
    "rl_coef",
    "advantage_estimator",
    "min_completion_prefix",
)
STRUCTURED_ONLY = ("adaptive_max_tokens", "gt_length_multiplier")
# structured-mode spelling of each strided-only key
STRUCTURED_ALTERNATIVE = {
    "generate_max_len": "trl.max_completion_length",
    "n_samples_per_prompt": "trl.num_generations",
    "temperature": "trl.temperature",
    "top_p": "trl.top_p",
    "advantage_estimator": "trl.scale_rewards / trl.loss_type",
}
# `vllm:` keys TRL reads itself when it runs vLLM in the training process (colocate mode)
VLLM_COLOCATE = {
    "gpu_memory_utilization": "vllm_gpu_memory_utilization",
    "tensor_parallel_size": "vllm_tensor_parallel_size",
    "max_model_len": "vllm_max_model_length",
}
# `vllm:` key -> the `trl vllm-serve` option that does its job on the server
VLLM_SERVE_FLAGS = {
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "tensor_parallel_size": "--tensor-parallel-size",
    "data_parallel_size": "--data-parallel-size",
    "dtype": "--dtype",
    "max_model_len": "--max-model-len",
    "enable_prefix_caching": "--enable-prefix-caching",
    "enforce_eager": "--enforce-eager",
    "host": "--host",
    "port": "--port",
}


class _Block(Section):
    """A nested config block: unknown keys are errors, null means the default."""


def _refuse_on(block: BaseModel, where: str) -> None:
    """Raise naming every refused key of `block` (status "not implemented") set to an on value."""
    found = []
    for key, info in type(block).model_fields.items():
        meta = status_of(info)
        if meta["status"] == "not implemented" and not is_off(getattr(block, key)):
            found.append(f"`{where}.{key}: {getattr(block, key)!r}` {meta['reason']}")
    if found:
        raise ValueError("; ".join(found))


ASYNC = (
    "is Axolotl's asynchronous GRPO trainer (generation in a background thread, one step "
    "off-policy), which TRL's GRPOTrainer does not have; newtune generates in the training "
    "step. Remove the key (training is the same algorithm, on-policy)"
)
AXOLOTL_PRODUCER = (
    "Only read by Axolotl's data producer (`use_data_producer`), which newtune refuses; "
    "accepted and unused, as in Axolotl without it."
)


class TRLBlock(_Block):
    """Axolotl's `trl:` block: TRL GRPOConfig options of online RL (`rl: ebft|grpo|gdpo`)."""

    beta: float | None = Field(
        default=None, ge=0, description="KL coefficient against the reference (TRL 0.0: none)."
    )
    max_completion_length: int | None = Field(
        default=None, gt=0, description="Longest generated completion in tokens (TRL 512)."
    )
    num_generations: int | None = Field(
        default=None,
        ge=2,
        description="Completions sampled per prompt (TRL 8); micro_batch_size x "
        "gradient_accumulation_steps x world size must be a multiple of it.",
    )
    generation_batch_size: int | None = Field(
        default=None,
        gt=0,
        description="Completions generated at once (default: the effective batch size).",
    )
    temperature: float | None = Field(
        default=None, gt=0, description="Sampling temperature (TRL 1.0)."
    )
    top_p: float | None = Field(
        default=None, gt=0, le=1, description="Nucleus sampling threshold (TRL 1.0)."
    )
    top_k: int | None = Field(default=None, ge=0, description="Top-k sampling (0: off).")
    min_p: float | None = Field(default=None, ge=0, le=1, description="Min-p sampling.")
    repetition_penalty: float | None = Field(
        default=None, gt=0, description="Repetition penalty of generation (1.0: none)."
    )
    generation_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="More generation options: transformers GenerationConfig keys, or vLLM "
        "SamplingParams keys (e.g. stop_token_ids) with use_vllm.",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="Keyword arguments of apply_chat_template when prompts are rendered "
        "(e.g. {enable_thinking: false}).",
    )
    use_vllm: bool = Field(
        default=False,
        description="Generate with vLLM instead of the policy's transformers generate (needs "
        "vllm installed; server mode needs a running `trl vllm-serve`).",
    )
    vllm_mode: Literal["server", "colocate"] | None = Field(
        default=None,
        description="server (default with use_vllm, as Axolotl): a `trl vllm-serve` process at "
        "vllm_server_host:vllm_server_port; colocate: vLLM inside the training process.",
    )
    vllm_server_host: str | None = Field(
        default="0.0.0.0",  # noqa: S104 - a server address to connect to, Axolotl's default
        description="Host of the vLLM server (server mode).",
    )
    vllm_server_port: int | None = Field(
        default=8000, gt=0, lt=65536, description="Port of the vLLM server (server mode)."
    )
    vllm_server_timeout: int | None = Field(
        default=None, gt=0, description="Seconds to wait for the vLLM server (TRL 240)."
    )
    vllm_guided_decoding_regex: str | None = Field(
        default=None, description="Regex of vLLM structured outputs (TRL's structured regex)."
    )
    vllm_enable_sleep_mode: bool | None = Field(
        default=None, description="Colocate mode: vLLM sleeps during the optimizer step."
    )
    reward_funcs: list[str] | None = Field(
        default=None,
        description="`rl: grpo`/`gdpo`: reward functions as `module.function` (module beside "
        "the config or on the Python path; f(prompts, completions, **columns) -> floats), or "
        "reward model paths. `rl: ebft` computes its own "
        "feature-matching reward, so it must not be set there.",
    )
    reward_weights: list[float] | None = Field(
        default=None, description="One weight per reward function."
    )
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] | None = Field(
        default=None, description="How several rewards combine (TRL sum_then_normalize)."
    )
    scale_rewards: bool | Literal["group", "batch", "none"] = Field(
        default=True,
        description="Divide advantages by the reward std of the group (true/group), the batch, "
        "or not (false/none).",
    )
    loss_type: (
        Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] | None
    ) = Field(default=None, description="TRL's policy loss aggregation (TRL dapo).")
    epsilon: float | None = Field(default=None, gt=0, description="Clipping epsilon (0.2).")
    epsilon_high: float | None = Field(
        default=None, gt=0, description="Upper clipping epsilon (default: epsilon)."
    )
    num_iterations: int | None = Field(
        default=None, ge=1, description="Policy updates per generated batch (TRL 1)."
    )
    importance_sampling_level: Literal["token", "sequence"] | None = Field(
        default=None, description="Importance ratios per token (TRL) or per sequence (GSPO)."
    )
    mask_truncated_completions: bool = Field(
        default=False, description="Leave completions cut at max_completion_length out of the loss."
    )
    log_completions: bool = Field(
        default=False, description="Print sampled completions with their rewards at each log."
    )
    num_completions_to_print: int | None = Field(
        default=None, gt=0, description="How many completions log_completions prints."
    )
    sync_ref_model: bool = Field(
        default=False, description="Mix the policy into the reference every ref_model_sync_steps."
    )
    ref_model_mixup_alpha: float = Field(
        default=0.9, ge=0, le=1, description="Mix ratio of sync_ref_model (Axolotl 0.9)."
    )
    ref_model_sync_steps: int = Field(
        default=64, gt=0, description="Steps between reference syncs (Axolotl 64)."
    )
    vllm_importance_sampling_correction: bool | None = Field(
        default=None, description="Correct for the vLLM / policy sampling mismatch."
    )
    vllm_importance_sampling_mode: (
        Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] | None
    ) = Field(default=None, description="How that correction clips or masks ratios.")
    vllm_importance_sampling_cap: float | None = Field(
        default=None, gt=0, description="Cap of the correction's ratios."
    )
    off_policy_mask_threshold: float | None = Field(
        default=None, gt=0, description="KL threshold of off-policy sequence masking."
    )
    use_bias_correction_kl: bool | None = Field(
        default=None, description="Importance-correct the KL term."
    )
    use_liger_loss: bool | None = refused(
        "Liger's fused GRPO loss.",
        "is Liger's fused GRPO loss, which TRL 1.16 deprecates; newtune runs TRL's own loss. "
        "Remove the key (the loss is the same)",
    )
    rollout_func: str | None = refused(
        "A custom rollout function replacing generation.",
        "is a custom rollout function that replaces generation; newtune's online methods "
        "generate with TRL. Remove the key",
    )
    use_data_producer: bool | None = refused("Axolotl's GRPO data producer.", ASYNC)
    async_prefetch: bool | None = refused("Axolotl's background generation.", ASYNC)
    prefetch_depth: int | None = refused("Axolotl's async prefetch depth.", ASYNC)
    vllm_sync_interval: int | None = refused("Axolotl's async weight-sync interval.", ASYNC)
    streaming_partial_batch: bool | None = refused("Axolotl's incremental scoring.", ASYNC)
    streaming_min_groups: int | None = refused("Axolotl's incremental scoring chunk.", ASYNC)
    vllm_lora_sync: bool | None = refused(
        "Axolotl's filesystem LoRA sync to its own vLLM serve module.",
        "syncs LoRA weights to Axolotl's own vLLM serve module "
        "(`axolotl.scripts.vllm_serve_lora`); TRL's GRPOTrainer syncs merged weights to "
        "`trl vllm-serve` itself. Remove the key",
    )
    replay_buffer_size: int | None = ignored(AXOLOTL_PRODUCER)
    replay_recompute_logps: bool | None = ignored(AXOLOTL_PRODUCER)
    reroll_start_fraction: float | None = ignored(AXOLOTL_PRODUCER)
    reroll_max_groups: int | None = ignored(AXOLOTL_PRODUCER)
    skip_zero_advantage_batches: bool | None = ignored(AXOLOTL_PRODUCER)
    reward_num_workers: int | None = ignored(AXOLOTL_PRODUCER)

    @model_validator(mode="after")
    def _refused(self) -> TRLBlock:
        """Axolotl-only trainer features, refused by name when on."""
        _refuse_on(self, "trl")
        weights, funcs = self.reward_weights, self.reward_funcs
        if weights is not None and funcs is not None and len(weights) != len(funcs):
            raise ValueError(
                f"`trl.reward_weights` has {len(self.reward_weights)} weights for "
                f"{len(self.reward_funcs)} `trl.reward_funcs`; give one weight per function"
            )
        return self


def _server(description: str) -> Any:
    """A `vllm:` key of Axolotl's own server script, which TRL's server has no option for."""
    return refused(
        description + " A setting of Axolotl's vLLM server script.",
        "has no option in TRL's vLLM server, which `newtune vllm-serve` starts",
        "the options `newtune vllm-serve` passes (vllm.tensor_parallel_size, "
        "data_parallel_size, gpu_memory_utilization, dtype, max_model_len, "
        "enable_prefix_caching, enforce_eager, host, port)",
    )


SERVE = "read by `newtune vllm-serve`, which starts TRL's server"


class VllmBlock(_Block):
    """Axolotl's `vllm:` block: the vLLM server `newtune vllm-serve` starts (TRL's), or
    in-process vLLM under `trl.vllm_mode: colocate`."""

    device: str | None = _server("vLLM device.")
    tensor_parallel_size: int | None = Field(
        default=None,
        gt=0,
        description="Tensor parallel size of in-process vLLM (`trl.vllm_mode: colocate`); a "
        "server takes `trl vllm-serve --tensor-parallel-size`.",
    )
    data_parallel_size: int | None = Field(
        default=None, gt=0, description=f"Data parallel size of the vLLM server ({SERVE})."
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="GPU memory share of in-process vLLM (colocate); a server takes "
        "`trl vllm-serve --gpu-memory-utilization`.",
    )
    dtype: str | None = Field(default=None, description=f"The vLLM server's dtype ({SERVE}).")
    max_model_len: int | None = Field(
        default=None,
        gt=0,
        description="Context length of in-process vLLM (colocate); a server takes "
        "`trl vllm-serve --max-model-len`.",
    )
    enable_prefix_caching: bool | None = Field(
        default=None, description=f"Prefix caching in the vLLM server ({SERVE})."
    )
    host: str | None = Field(
        default=None,
        description=f"Address the vLLM server listens on ({SERVE}; default "
        "trl.vllm_server_host, else 0.0.0.0).",
    )
    port: int | None = Field(
        default=None,
        gt=0,
        description=f"Port the vLLM server listens on ({SERVE}; default trl.vllm_server_port, "
        "else 8000); must be the port the trainer connects to.",
    )
    enable_reasoning: bool | None = _server("Reasoning outputs.")
    reasoning_parser: str | None = _server("Reasoning parser.")
    enforce_eager: bool | None = Field(
        default=None, description=f"No CUDA graphs in the vLLM server ({SERVE})."
    )
    serve_module: str | None = Field(
        default=None,
        description="Module `newtune vllm-serve` runs (`python -m <module>` with TRL's server "
        "options); default trl.scripts.vllm_serve, TRL's server, which Axolotl's "
        "axolotl.scripts.vllm_serve(_lora) are read as (TRL's trainer syncs merged LoRA "
        "weights to it).",
    )
    worker_extension_cls: str | None = _server("vLLM worker extension class.")


class EBFTBlock(_Block):
    """Axolotl's `ebft:` block (energy-based fine-tuning), with Axolotl's defaults."""

    mode: Literal["structured", "strided"] = Field(
        default="structured",
        description="structured: (prompt, ground_truth) rows, completions sampled with TRL's "
        "GRPOTrainer; strided: raw documents, short blocks generated at strided anchors.",
    )
    feature_layers: list[float] = Field(
        default=[0.25, 0.5, 0.75],
        min_length=1,
        description="Depths (fractions of the layer count, 0 = embeddings, 1 = last layer) "
        "whose hidden states the frozen feature network concatenates.",
    )
    embed_method: Literal["last_token", "mean_pooling", "completion_mean", "concat"] = Field(
        default="last_token",
        description="Pooling of a sequence's features: last token, mean over tokens, mean over "
        "completion tokens, or the tokens at 1/4, 1/2 and 3/4 concatenated.",
    )
    use_whitening: bool = Field(
        default=False,
        description="SVD-whiten each prompt's generated features (ground truth transformed alike).",
    )
    alignment_coef: float = Field(
        default=1.0, description="Weight of the alignment reward 2 cos(generated, ground truth)."
    )
    diversity_coef: float = Field(
        default=1.0,
        description="Weight of the diversity penalty 2 x mean dot product with the other "
        "samples of the same prompt.",
    )
    ce_coef: float = Field(
        default=0.0,
        ge=0,
        description="Weight of the cross-entropy on the ground-truth completion tokens, added "
        "to the policy loss (0: pure feature matching).",
    )
    adaptive_max_tokens: bool = Field(
        default=True,
        description="Structured: cap each generation batch at gt_length_multiplier x its "
        "longest ground truth in tokens (at least 64, at most max_completion_length).",
    )
    gt_length_multiplier: float = Field(
        default=1.5, ge=0.1, description="Structured: the multiplier of adaptive_max_tokens."
    )
    stride: int = Field(default=8, ge=1, description="Strided: tokens between anchors.")
    context_length: int = Field(
        default=8, ge=1, description="Strided: context tokens of each block."
    )
    generate_max_len: int = Field(
        default=8, ge=1, description="Strided: tokens generated per block."
    )
    n_samples_per_prompt: int = Field(
        default=4, ge=1, description="Strided: rollouts per document."
    )
    temperature: float = Field(default=0.6, ge=0, description="Strided: sampling temperature.")
    top_p: float = Field(default=1.0, ge=0, le=1, description="Strided: nucleus threshold.")
    rl_coef: float = Field(default=1.0, description="Strided: weight of the policy-gradient loss.")
    advantage_estimator: Literal["rloo", "group_norm", "reinforce"] = Field(
        default="rloo",
        description="Strided: leave-one-out baseline, group-normalised, or raw rewards.",
    )
    min_completion_prefix: int = Field(
        default=0, ge=0, description="Strided: completion tokens before the first anchor."
    )


class OnlineSection(Section):
    """Online RL: TRL's GRPO options (`trl:`), vLLM (`vllm:`) and EBFT (`ebft:`)."""

    trl: TRLBlock | None = Field(
        default=None,
        description="TRL trainer options of online RL (`rl: ebft`, `grpo`, `gdpo`): generation, "
        "vLLM connection, GRPO loss.",
    )
    vllm: VllmBlock | None = Field(
        default=None,
        description="vLLM settings; read only with `trl.vllm_mode: colocate` "
        "(gpu_memory_utilization, tensor_parallel_size, max_model_len). Server settings "
        "belong on the `trl vllm-serve` command line.",
    )
    ebft: EBFTBlock | None = Field(
        default=None, description="Energy-based fine-tuning options (`rl: ebft`)."
    )


def online_rules(cfg: Any) -> list[str]:
    """Cross-key errors: the blocks only with an online method, mode-specific keys by mode."""
    rl = getattr(cfg, "rl", None)
    if rl not in ONLINE_RL:
        given = [k for k in ("trl", "vllm", "ebft") if getattr(cfg, k, None) is not None]
        if not given:
            return []
        blocks = ", ".join(f"`{k}:`" for k in given)
        method = f"`rl: {rl}`" if rl else "SFT"
        return [
            f"{blocks} configure online RL (`rl: ebft`, `grpo`, `gdpo`), but the config trains "
            f"{method}; remove {blocks} or set `rl:` to one of them"
        ]
    if rl in ("grpo", "gdpo"):
        return _grpo_rules(cfg)  # TRL checks the global batch (GPU count known at train)
    ebft = ebft_block(cfg)
    if ebft.mode == "structured":
        return _structured_rules(ebft, cfg.trl, cfg.vllm) + group_rule(cfg)
    errors = _strided_rules(ebft, cfg.trl, cfg.vllm)
    if getattr(cfg, "relora", None):
        errors.append(
            "`relora: true` with `rl: ebft` (strided): the feature network is the base model "
            "with the adapter switched off, and ReLoRA merges the adapter into that base at "
            "every restart, so the features the rewards compare against would drift away from "
            "the starting model; remove `relora` (or train a full fine-tune, whose feature "
            "network is a frozen copy)"
        )
    return errors


def _grpo_rules(cfg: Any) -> list[str]:
    """GRPO/GDPO: reward functions required, no `ebft:` block, GDPO's aggregation."""
    rl, trl = cfg.rl, cfg.trl
    errors = []
    if cfg.ebft is not None:
        errors.append(f"`ebft:` configures `rl: ebft`, but the config trains `rl: {rl}`; remove it")
    if trl is None or not trl.reward_funcs:
        errors.append(
            f"`rl: {rl}` rewards completions with `trl.reward_funcs` (a list of "
            "`module.function` paths), which is not set; add it"
        )
    if rl == "gdpo" and trl is not None and trl.multi_objective_aggregation == "sum_then_normalize":
        errors.append(
            "`rl: gdpo` normalises each reward within its group before summing "
            "(`trl.multi_objective_aggregation: normalize_then_sum`); `sum_then_normalize` is "
            "`rl: grpo`: use that, or remove the key"
        )
    return errors + _vllm_rules(trl, cfg.vllm)


def group_rule(cfg: Any) -> list[str]:
    """Each GPU's generation round (micro_batch_size x gradient_accumulation_steps completions)
    holds whole groups of trl.num_generations (TRL 8 when unset)."""
    trl = cfg.trl or TRLBlock()
    if trl.generation_batch_size is not None or not cfg.micro_batch_size:
        return []  # split over the GPUs: checked when the run knows their count
    accumulation = cfg.gradient_accumulation_steps or (
        (cfg.batch_size or cfg.micro_batch_size) // cfg.micro_batch_size
    )
    per_gpu = cfg.micro_batch_size * max(1, accumulation)
    n = trl.num_generations or 8
    if per_gpu % n == 0:
        return []
    return [
        f"`rl: {cfg.rl}` samples trl.num_generations = {n}"
        + (" (TRL's default)" if trl.num_generations is None else "")
        + f" completions per prompt, but each GPU generates micro_batch_size x "
        f"gradient_accumulation_steps = {per_gpu} per round, not a multiple of {n}; change one "
        "of them"
    ]


def _structured_rules(ebft: EBFTBlock, trl: TRLBlock | None, vllm: VllmBlock | None) -> list[str]:
    """Structured EBFT: no strided keys, no reward functions, vLLM keys TRL reads."""
    errors = []
    strided = [k for k in STRIDED_ONLY if k in ebft.model_fields_set]
    if strided:
        names = ", ".join(
            f"`ebft.{k}`"
            + (f" (use `{STRUCTURED_ALTERNATIVE[k]}`)" if k in STRUCTURED_ALTERNATIVE else "")
            for k in strided
        )
        errors.append(
            f"{names} only apply to `ebft.mode: strided`; this config trains structured EBFT "
            "(TRL's GRPOTrainer samples whole completions), so remove them or set "
            "`ebft.mode: strided`"
        )
    if trl is not None and trl.reward_funcs:
        errors.append(
            "`trl.reward_funcs` is set, but `rl: ebft` rewards completions by feature matching "
            "against the `ground_truth` column; remove `trl.reward_funcs` (and reward_weights)"
        )
    return errors + _vllm_rules(trl, vllm)


def _strided_rules(ebft: EBFTBlock, trl: TRLBlock | None, vllm: VllmBlock | None) -> list[str]:
    """Strided EBFT generates itself: no `trl:`/`vllm:` blocks, no structured-only keys."""
    errors = []
    structured = [k for k in STRUCTURED_ONLY if k in ebft.model_fields_set]
    if structured:
        errors.append(
            f"{', '.join(f'`ebft.{k}`' for k in structured)} only apply to structured EBFT "
            "(they cap TRL's completion length); strided mode generates "
            "`ebft.generate_max_len` tokens per block. Remove them"
        )
    for name, block in (("trl", trl), ("vllm", vllm)):
        if block is not None and block.model_fields_set:
            errors.append(
                f"`{name}:` configures TRL's generation, which `ebft.mode: strided` does not "
                "use (it generates blocks itself with ebft.n_samples_per_prompt, "
                f"ebft.generate_max_len, ebft.temperature and ebft.top_p); remove `{name}:`"
            )
    return errors


# `vllm:` keys `newtune vllm-serve` reads (cli/vllm_serve.py)
VLLM_SERVER_KEYS = (*VLLM_SERVE_FLAGS, "serve_module")


def _vllm_rules(trl: TRLBlock | None, vllm: VllmBlock | None) -> list[str]:
    """`vllm:` keys: TRL reads some in colocate mode; in server mode `newtune vllm-serve`
    reads the server's; without vLLM none is read."""
    if vllm is None:
        return []
    given = sorted(k for k in vllm.model_fields_set if not is_off(getattr(vllm, k)))
    if not given:
        return []
    named = ", ".join(f"`vllm.{k}`" for k in given)
    if trl is None or not trl.use_vllm:
        return [
            f"{named} configure vLLM, and the config generates without it (`trl.use_vllm` is "
            "not true); set `trl.use_vllm: true` or remove the `vllm:` block"
        ]
    if trl.vllm_mode == "colocate":
        unread = [k for k in given if k not in VLLM_COLOCATE]
        if not unread:
            return []
        return [
            f"{', '.join(f'`vllm.{k}`' for k in unread)} configure a vLLM server, and "
            f"`trl.vllm_mode: colocate` runs vLLM inside the training process, where TRL reads "
            f"only vllm.{', vllm.'.join(VLLM_COLOCATE)}; remove them, or use server mode "
            "(`newtune vllm-serve cfg.yml` starts the server)"
        ]
    errors = []
    unread = [k for k in given if k not in VLLM_SERVER_KEYS]
    if unread:
        errors.append(
            f"{', '.join(f'`vllm.{k}`' for k in unread)} have no option in TRL's vLLM server, "
            "which `newtune vllm-serve` starts (it takes vllm.{}); remove them".format(
                ", vllm.".join(VLLM_SERVER_KEYS)
            )
        )
    if vllm.port is not None and trl.vllm_server_port not in (None, vllm.port):
        errors.append(
            f"`vllm.port: {vllm.port}` (where `newtune vllm-serve` listens) and "
            f"`trl.vllm_server_port: {trl.vllm_server_port}` (where training connects) differ; "
            "make them the same port"
        )
    return errors


def online_entry_problems(entry: Any, where: str) -> list[str]:
    """Online RL datasets: `type` names a user transform `module.function` (Axolotl's RL
    transform convention); the module is imported when the data is read, from the Python path
    or the config's folder."""
    kind = entry.type
    if isinstance(kind, str) and "." in kind and all(p.isidentifier() for p in kind.split(".")):
        return []
    return [
        f"`{where}.type: {kind}`: online RL (`rl: ebft`, `grpo`, `gdpo`) reads rows from a "
        "transform function named "
        "`module.function` (a Python file `module.py` beside the config or on the Python path, "
        "whose function returns a row function: a `prompt`, plus `ground_truth` for structured "
        "EBFT or the columns the reward functions read); set `type` to one"
    ]


def ebft_block(config: Any) -> EBFTBlock:
    """The config's `ebft:` block, Axolotl's defaults when absent."""
    return getattr(config, "ebft", None) or EBFTBlock()


def trl_block(config: Any) -> TRLBlock:
    """The config's `trl:` block, defaults when absent."""
    return getattr(config, "trl", None) or TRLBlock()


def ebft_mode(config: Any) -> str:
    """`structured` or `strided` for `rl: ebft` configs."""
    return ebft_block(config).mode
