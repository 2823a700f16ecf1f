"""Axolotl keys of its plugins, kernels, trackers and parallelism (issue 16, part 2).

Each key is implemented on the library made for the job (cut-cross-entropy, transformers'
kernels / experts / tracker integrations, accelerate's ParallelismConfig, torch's save_on_cpu),
or refused by name with the reason (Axolotl's own kernels and patched modeling code).
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from newtune.config.schema.base import Section
from newtune.config.schema.compat import refused

AXOLOTL_OWN = "is Axolotl's own code (not in transformers, peft or a kernel package newtune runs)"
# transformers 5's ExpertsInterface names (integrations.moe) plus its built-in eager path
EXPERTS = ("eager", "batched_mm", "grouped_mm", "deepgemm", "sonicmoe")
SWANLAB_MODES = ("cloud", "local", "offline", "disabled")


def _swanlab_refused(key: str) -> Any:
    return refused(
        f"SwanLab {key.removeprefix('swanlab_').replace('_', ' ')} (Axolotl's SwanLab plugin).",
        f"`{key}` is read by Axolotl's own SwanLab plugin; transformers' SwanLabCallback, "
        "which newtune reports through, has no such setting",
    )


QUANT_DTYPES = Literal["int4", "int8", "float8_e4m3fn", "nvfp4", "mxfp4"]


class QATArgs(BaseModel):
    """Axolotl's `qat:` mapping (torchao fake quantization)."""

    model_config = ConfigDict(extra="forbid")

    activation_dtype: QUANT_DTYPES | None = Field(
        default=None, description="Fake-quantized activations (none: weights only)."
    )
    weight_dtype: QUANT_DTYPES = Field(default="int8", description="Fake-quantized weights.")
    quantize_embedding: bool | None = Field(default=False, description="Embeddings too.")
    group_size: int | None = Field(default=32, ge=1, description="Per-group weight scales.")
    fake_quant_after_n_steps: int | None = Field(
        default=None, ge=0, description="Train without fake quantization for the first N steps."
    )


class Compat2Section(Section):
    """Axolotl plugin, kernel, tracker and parallelism keys: implemented, or refused by name."""

    # -- cut cross entropy / kernels -------------------------------------------------------
    cut_cross_entropy: bool | None = Field(
        default=None,
        description="Apple's Cut Cross Entropy (the cut-cross-entropy package): the loss is "
        "computed from the hidden states and the output head's weight without materialising "
        "the logits. Default true when `plugins` lists CutCrossEntropyPlugin. Needs bf16/fp16, "
        "a CUDA GPU and `pip install cut-cross-entropy`.",
    )
    use_kernels: bool | None = Field(
        default=None,
        description="transformers' hub-kernels integration (`model.set_use_kernels(True)`, as "
        "`from_pretrained(use_kernels=True)`): layers with a registered kernel are replaced. "
        "Needs `pip install kernels` and the kernels downloaded from the hub.",
    )
    experts_implementation: str | None = Field(
        default=None,
        description="MoE experts kernel through transformers' ExpertsInterface "
        f"(`model.set_experts_implementation`): {', '.join(EXPERTS)}, or `scattermoe` (the "
        "Triton kernel kernels-community/scattermoe from the hub, registered in the "
        "ExpertsInterface at load; needs CUDA and `pip install kernels`).",
    )
    use_scattermoe: bool | None = Field(
        default=None,
        description="Axolotl's ScatterMoE switch: `true` means `experts_implementation: "
        "scattermoe` (the hub kernel kernels-community/scattermoe; needs CUDA and `pip install "
        "kernels`).",
    )
    use_sonicmoe: bool | None = Field(
        default=None,
        description="Axolotl's SonicMoE switch: `true` means `experts_implementation: sonicmoe` "
        "(transformers' sonic-moe hub kernel; needs a Hopper or newer GPU and `pip install "
        "kernels`).",
    )
    use_dsv4_kernels: Any = refused(
        "Axolotl's DeepSeek-V4 kernels.", f"`use_dsv4_kernels` {AXOLOTL_OWN}"
    )
    use_glm_dsa_kernels: Any = refused(
        "Axolotl's GLM DSA attention kernels.", f"`use_glm_dsa_kernels` {AXOLOTL_OWN}"
    )
    dsv4_fp4_grouped_mode: Any = refused(
        "Axolotl's DeepSeek-V4 fp4 experts path.", f"`dsv4_fp4_grouped_mode` {AXOLOTL_OWN}"
    )
    nvfp4_merge_aware: Any = refused(
        "Axolotl's merge-aware NVFP4 LoRA (sonicmoe experts).",
        f"`nvfp4_merge_aware` {AXOLOTL_OWN}",
    )
    nvfp4_merge_aware_start_step: Any = refused(
        "Start step of nvfp4_merge_aware.", f"`nvfp4_merge_aware_start_step` {AXOLOTL_OWN}"
    )
    quantize_moe_experts: bool | None = Field(
        default=None,
        description="Also quantize the MoE experts stored as 3-D parameters (names containing "
        "`expert`, e.g. `mlp.experts.gate_up_proj`), which `load_in_4bit`/`load_in_8bit` leave "
        "alone (bitsandbytes quantizes nn.Linear only): right after loading, with bitsandbytes "
        "(4-bit NF4 blocks, bnb_config_kwargs' quant type / double quant; or 8-bit rows), "
        "dequantized on access through torch parametrizations. The loaded model must fit "
        "before the experts shrink (Axolotl quantizes during loading). Needs `adapter: "
        "lora`/`qlora` and load_in_4bit or load_in_8bit; LoRA reaches the experts through "
        "`lora_target_parameters`.",
    )
    llama4_linearized_experts: bool | None = Field(
        default=None,
        description="Llama 4 with linearized experts: while loading, transformers' fused "
        "Llama4TextExperts is replaced by one nn.Linear per expert and projection "
        "(`feed_forward.experts.gate_projs.N` / `up_projs.N` / `down_projs.N`, the layout of "
        "Axolotl's linearized checkpoints such as axolotl-quants/*-Linearized-*), so "
        "load_in_4bit and lora_target_modules reach them. Every load (train, merge, inference) "
        "reads that layout; a checkpoint with fused experts is refused.",
    )
    # -- training ----------------------------------------------------------------------------
    unfrozen_parameters: list[str] | None = Field(
        default=None,
        description="Train only these parameters: regexes matched at the start of each "
        "parameter name (Axolotl's re.match; `.` is a literal dot unless followed by `+`, "
        "`name[a:b]` trains rows a..b); every other parameter gets requires_grad False. With "
        "an adapter the names are peft's (`base_model.model.`...), as in Axolotl, and only "
        "adapter weights may train (peft saves nothing else).",
    )
    lora_target_parameters: str | list[str] | None = Field(
        default=None,
        description="peft's LoraConfig.target_parameters: LoRA on parameters (e.g. MoE experts' "
        "`mlp.experts.gate_up_proj`) rather than modules; needs lora_dropout 0.",
    )
    activation_offloading: bool | Literal["legacy", "disk", "hidden_states"] | None = Field(
        default=None,
        description="With gradient_checkpointing: keep the activations saved for backward in "
        "CPU memory (torch's save_on_cpu, as `gradient_checkpointing: offload`); `true` and "
        "`legacy` only (`disk` / `hidden_states` are refused).",
    )
    qat: QATArgs | None = Field(
        default=None,
        description="Quantization-aware training with torchao (full fine-tunes): every linear "
        "layer (and with quantize_embedding the embeddings) trains through fake quantization "
        "of its weights (and activations), converted back to plain layers before the final "
        "save. int4/int8 layouts run anywhere; float8/nvfp4/mxfp4 need CUDA. Needs `pip "
        "install torchao`.",
    )
    fp8: Any = refused(
        "FP8 training (torchao / accelerate).",
        "`fp8` needs fp8 matmuls (Hopper/Ada GPUs and torchao's Float8Linear), which newtune "
        "does not wire",
        "`bf16: true`",
    )
    fp8_enable_fsdp_float8_all_gather: Any = refused(
        "FP8 all-gather under FSDP.", "`fp8_enable_fsdp_float8_all_gather` goes with `fp8`"
    )
    # -- trackers ----------------------------------------------------------------------------
    use_swanlab: bool | None = Field(
        default=None,
        description="Report to SwanLab (transformers' SwanLabCallback); needs swanlab_project.",
    )
    swanlab_project: str | None = Field(default=None, description="SwanLab project.")
    swanlab_experiment_name: str | None = Field(
        default=None, description="SwanLab experiment name (TrainingArguments.run_name)."
    )
    swanlab_mode: str | None = Field(
        default=None, description=f"SWANLAB_MODE: {', '.join(SWANLAB_MODES)}."
    )
    swanlab_log_model: bool | None = Field(
        default=None, description="SWANLAB_LOG_MODEL (false: no model upload)."
    )
    swanlab_api_key: str | None = Field(default=None, description="SWANLAB_API_KEY.")
    swanlab_web_host: str | None = Field(default=None, description="SWANLAB_WEB_HOST.")
    swanlab_api_host: str | None = Field(default=None, description="SWANLAB_API_HOST.")
    swanlab_description: str | None = Field(
        default=None, description="SwanLab experiment description (passed to swanlab.init)."
    )
    swanlab_workspace: str | None = Field(
        default=None, description="SwanLab workspace (organisation) of the project."
    )
    swanlab_lark_webhook_url: Any = _swanlab_refused("swanlab_lark_webhook_url")
    swanlab_lark_secret: Any = _swanlab_refused("swanlab_lark_secret")
    swanlab_log_completions: bool | None = Field(
        default=None,
        description="Log the preference rows trained on (prompt, chosen/rejected or KTO's "
        "completion, per-row rewards and log-probs) to SwanLab as the table `rlhf_completions` "
        "(rl: dpo, ipo, simpo, orpo, kto; rank 0's rows). Unset: on for those methods with "
        "`use_swanlab`, as in Axolotl's plugin.",
    )
    swanlab_completion_log_interval: int | None = Field(
        default=None,
        ge=1,
        description="Steps between completion tables (default 100); the rest at the end.",
    )
    swanlab_completion_max_buffer: int | None = Field(
        default=None,
        ge=1,
        description="Rows kept for the next completion table (default 128): the newest.",
    )
    trackio_project_name: str | None = Field(
        default=None,
        description="Report to trackio (transformers' TrackioCallback) in this project "
        "(TrainingArguments.project).",
    )
    trackio_run_name: str | None = Field(
        default=None, description="trackio run name (TrainingArguments.run_name)."
    )
    trackio_space_id: str | None = Field(
        default=None,
        description="Hugging Face Space the trackio dashboard syncs to "
        "(TrainingArguments.trackio_space_id); unset: local only.",
    )
    use_otel_metrics: bool | None = Field(
        default=None,
        description="Export the training metrics through OpenTelemetry (SDK MeterProvider with "
        "the Prometheus reader) on an HTTP endpoint for Prometheus to scrape, "
        "http://otel_metrics_host:otel_metrics_port/metrics, from the main process, under "
        "Axolotl's metric names (axolotl_train_loss, axolotl_eval_loss, "
        "axolotl_learning_rate, axolotl_epoch, axolotl_gradient_norm, "
        "axolotl_global_steps_total, axolotl_eval_*). Needs `pip install "
        "opentelemetry-sdk opentelemetry-exporter-prometheus`.",
    )
    otel_metrics_host: str | None = Field(
        default=None, description="Address the metrics endpoint binds (default localhost)."
    )
    otel_metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="Port of the metrics endpoint (default 8000)."
    )
    # -- parallelism (accelerate's ParallelismConfig) ----------------------------------------
    dp_shard_size: int | None = Field(
        default=None, ge=1, description="FSDP shard group size (ParallelismConfig.dp_shard_size)."
    )
    dp_replicate_size: int | None = Field(
        default=None, ge=1, description="DDP replica groups (ParallelismConfig.dp_replicate_size)."
    )
    tensor_parallel_size: int | None = Field(
        default=None, ge=1, description="Tensor parallel size (ParallelismConfig.tp_size)."
    )
    context_parallel_size: int | None = Field(
        default=None, ge=1, description="Context parallel size (ParallelismConfig.cp_size)."
    )
    expert_parallel_size: int | None = Field(
        default=None,
        ge=1,
        description="Expert parallelism (Axolotl's ExpertParallelPlugin; listing the plugin is "
        "optional): each MoE layer's experts are split over this many ranks and the routed "
        "tokens travel to them by all-to-all, the other weights are FSDP2-sharded over the "
        "data-parallel ranks, all by transformers at load time "
        "(`from_pretrained(distributed_config=DistributedConfig(ep_size, fsdp_size))`, "
        "train.expert_parallel). Launch `expert_parallel_size` x `dp_shard_size` processes (a "
        "multiple with `dp_replicate_size`); the model needs an expert-parallel plan in "
        "transformers (3-D experts, e.g. Qwen3-MoE) with a number of experts it divides. "
        "1 = off.",
    )
    expert_parallel_num_nvl_bytes: Any = refused(
        "DeepEP buffer.",
        "sizes the NVLink buffer of Axolotl's own DeepEP dispatch; newtune's expert "
        "parallelism dispatches with transformers' all-to-all, which has no such buffer",
    )
    expert_parallel_token_capacity: Any = refused(
        "DeepEP capacity.",
        "caps the tokens per expert in Axolotl's own DeepEP dispatch (token dropping); "
        "transformers' all-to-all dispatch drops no tokens",
    )
    # -- Ray Train launch (train.ray_launch) -------------------------------------------------
    use_ray: bool | None = Field(
        default=None,
        description="`newtune train` starts the run through Ray Train: a TorchTrainer runs "
        "`ray_num_workers` workers, each one rank of the usual DDP/DeepSpeed/FSDP training "
        "(Ray sets up torch.distributed: gloo on CPU, nccl on GPU). Connects to the cluster "
        "in RAY_ADDRESS, else starts a local one. Needs `pip install 'newtune[ray]'`; not "
        "under `accelerate launch`/torchrun/`--launcher`.",
    )
    ray_num_workers: int | None = Field(
        default=None, ge=1, description="Ray Train workers (ranks) with `use_ray`; default 1."
    )
    resources_per_worker: dict[str, float] | None = Field(
        default=None,
        description="Ray resources each worker reserves, e.g. `{GPU: 1}` or `{CPU: 4}` "
        "(ScalingConfig.resources_per_worker). `GPU` > 0 trains on GPUs, `GPU: 0` on CPUs; "
        "without `GPU`, workers use GPUs when the Ray cluster has any.",
    )
    ray_run_name: str | None = Field(
        default=None,
        description="Name of the Ray Train run (RunConfig.name); Ray keeps its own run state "
        "in `output_dir/<ray_run_name>` (default: a name Ray picks).",
    )
    # -- tokenizer ---------------------------------------------------------------------------
    tokenizer_use_mistral_common: bool | None = Field(
        default=None,
        description="Load the tokenizer with mistral-common (transformers' MistralCommonBackend, "
        "from the model's tekken.json / tokenizer.model.v*); needs `pip install mistral-common`.",
    )

    @field_validator("experts_implementation")
    @classmethod
    def _experts(cls, value: str | None) -> str | None:
        """transformers' experts implementations; Axolotl's scattermoe is refused by name."""
        if value is None or value in (*EXPERTS, "scattermoe"):
            return value
        raise ValueError(f"`{value}` is not one of {', '.join(EXPERTS)}, scattermoe")

    @model_validator(mode="before")
    @classmethod
    def _moe_switches(cls, data: Any) -> Any:
        """Axolotl's `use_scattermoe` / `use_sonicmoe: true` set `experts_implementation`."""
        if not isinstance(data, dict):
            return data
        on = [k for k in ("use_scattermoe", "use_sonicmoe") if data.get(k) is True]
        if len(on) > 1:
            raise ValueError(
                "`use_scattermoe` and `use_sonicmoe` both choose the experts kernel; keep one "
                "(Axolotl refuses both too)"
            )
        if on:
            impl = on[0].removeprefix("use_")
            given = data.get("experts_implementation")
            if given not in (None, impl):
                raise ValueError(
                    f"`{on[0]}: true` means `experts_implementation: {impl}`, and "
                    f"`experts_implementation` is `{given}`; keep one of them"
                )
            data = {**data, "experts_implementation": impl}
        return data

    @field_validator("swanlab_mode")
    @classmethod
    def _swanlab_mode(cls, value: str | None) -> str | None:
        """SwanLab's modes."""
        if value is None or value in SWANLAB_MODES:
            return value
        raise ValueError(f"`{value}` is not one of {', '.join(SWANLAB_MODES)}")
