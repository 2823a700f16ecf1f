"""Keys of the training loop."""

from typing import Any, Literal

from pydantic import Field

from newtune.config.schema.base import Section, ignored


class TrainingSection(Section):
    """Batching, schedule, optimizer, evaluation, saving and checkpoints."""

    output_dir: str = Field(default="./outputs", description="Where the trained model is written.")
    micro_batch_size: int = Field(default=1, gt=0, description="Samples per device per step.")
    gradient_accumulation_steps: int = Field(
        default=1, gt=0, description="Micro-batches accumulated per optimizer step."
    )
    batch_size: int | None = Field(
        default=None,
        gt=0,
        description="Samples per optimizer step per device (micro x accumulation).",
    )
    eval_batch_size: int | None = Field(
        default=None, gt=0, description="Eval samples per device (default micro_batch_size)."
    )
    num_epochs: float = Field(default=1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, gt=0, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: float = Field(default=2e-5, gt=0, description="Peak learning rate.")
    optimizer: str = Field(default="adamw_torch", description="A transformers optimizer name.")
    optim_args: str | dict[str, Any] | None = Field(
        default=None, description="Extra optimizer arguments (`k=v,...` or a mapping)."
    )
    optim_target_modules: list[str] | str | None = Field(
        default=None,
        description="Modules the GaLore/APOLLO optimizers project (names or regexes; "
        "`all-linear`).",
    )
    weight_decay: float | None = Field(default=None, ge=0, description="AdamW weight decay.")
    adam_beta1: float | None = Field(default=None, gt=0, lt=1, description="AdamW beta1.")
    adam_beta2: float | None = Field(default=None, gt=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float | None = Field(default=None, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(default=None, ge=0, description="Gradient clipping norm.")
    lr_scheduler: str = Field(
        default="cosine",
        description="A transformers scheduler name (cosine, linear, constant, "
        "constant_with_warmup, polynomial, ...) or `one_cycle` (torch OneCycleLR).",
    )
    lr_scheduler_kwargs: dict[str, Any] | None = Field(
        default=None, description="Extra scheduler arguments."
    )
    cosine_min_lr_ratio: float | None = Field(
        default=None, ge=0, le=1, description="Cosine decays to this ratio of the peak lr."
    )
    cosine_constant_lr_ratio: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Cosine reaches cosine_min_lr_ratio at this fraction of the steps, then "
        "stays constant (needs cosine_min_lr_ratio); 0 means unset, as in Axolotl.",
    )
    lr_quadratic_warmup: bool | None = Field(
        default=None, description="Cosine warmup rises quadratically instead of linearly."
    )
    lr_div_factor: float | None = Field(
        default=None, gt=0, description="one_cycle: initial lr = peak / factor (default 25)."
    )
    warmup_steps: int | float | None = Field(
        default=None,
        ge=0,
        description="Linear warmup steps; a fraction below 1 is a ratio of all steps (as "
        "transformers reads it; Axolotl refuses a fraction, newtune notes it).",
    )
    warmup_ratio: float | None = Field(
        default=None, gt=0, lt=1, description="Warmup as a fraction of all steps."
    )
    logging_steps: int | None = Field(default=None, gt=0, description="Log every N steps.")
    eval_steps: int | float | None = Field(
        default=None, gt=0, description="Evaluate every N steps (or a fraction of all steps)."
    )
    evals_per_epoch: int | None = Field(
        default=None, ge=0, description="Evaluations per epoch; 0: none during training."
    )
    save_strategy: Literal["no", "steps", "epoch", "best"] | None = Field(
        default=None, description="When to write checkpoints (default: only the final model)."
    )
    save_steps: int | float | None = Field(
        default=None, gt=0, description="Checkpoint every N steps (or a fraction of all steps)."
    )
    saves_per_epoch: int | None = Field(default=None, gt=0, description="Checkpoints per epoch.")
    save_total_limit: int | None = Field(default=None, gt=0, description="Checkpoints kept.")
    save_safetensors: bool | None = Field(
        default=None, description="Weights are always saved as safetensors; `false` is refused."
    )
    seed: int = Field(default=42, description="Seed for shuffling, splits and initialisation.")
    neftune_noise_alpha: float | None = Field(
        default=None, gt=0, description="NEFTune noise on the input embeddings."
    )
    early_stopping_patience: int | None = Field(
        default=None,
        gt=0,
        description="Stop after N evaluations without a lower eval loss; the best checkpoint is "
        "the final model (needs an eval split).",
    )
    loss_watchdog_threshold: float | None = Field(
        default=None,
        gt=0,
        description="Abort when the logged training loss stays above this (about 2x the "
        "starting loss); the last checkpoint is kept.",
    )
    loss_watchdog_patience: int | None = Field(
        default=None,
        gt=0,
        description="Logged losses in a row above loss_watchdog_threshold before the abort "
        "(default 3).",
    )
    torch_compile: bool | Literal["auto"] | None = Field(
        default=None,
        description="Compile the model with torch.compile; `auto`: on CUDA with triton.",
    )
    torch_compile_backend: str | None = Field(
        default=None, description="torch.compile backend (default inductor)."
    )
    resume_from_checkpoint: str | None = Field(
        default=None,
        description="A `checkpoint-N` folder to resume from: weights, optimizer, scheduler, "
        "RNG and data position.",
    )
    auto_resume_from_checkpoints: bool | None = Field(
        default=None, description="Resume from the newest `checkpoint-N` in output_dir, if any."
    )
    plugins: list[str] | None = Field(
        default=None,
        description="Axolotl plugins newtune has an equivalent for: LigerPlugin (the liger_* "
        "keys), CutCrossEntropyPlugin (cut_cross_entropy, on by default with it), KernelsPlugin "
        "(use_kernels, experts_implementation), SwanLabPlugin (use_swanlab), DiffusionPlugin "
        "(the `diffusion` block: masked-diffusion training); any other is "
        "refused by name.",
    )
    liger_rope: bool | None = Field(default=None, description="liger-kernel fused RoPE.")
    liger_rms_norm: bool | None = Field(default=None, description="liger-kernel RMSNorm.")
    liger_layer_norm: bool | None = Field(default=None, description="liger-kernel LayerNorm.")
    liger_glu_activation: bool | None = Field(
        default=None, description="liger-kernel SwiGLU/GeGLU MLP."
    )
    liger_cross_entropy: bool | None = Field(
        default=None, description="liger-kernel cross-entropy."
    )
    liger_fused_linear_cross_entropy: bool | None = Field(
        default=None,
        description="liger-kernel fused lm_head + cross-entropy (no full logits in memory).",
    )
    strict: bool | None = Field(
        default=None, description="Overrides may only change keys present in the YAML."
    )
    debug: bool | None = ignored("Axolotl's tokenization debug output; use `newtune preprocess`.")
