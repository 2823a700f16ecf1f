"""Keys of the training loop."""

from typing import Any, Literal

from pydantic import Field

from newtune.config.schema.base import MODELS, Section, ignored, planned


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
    optim_target_modules: list[str] | str | None = planned(
        MODELS, "Modules for GaLore-style optimizers."
    )
    weight_decay: float | None = Field(default=None, ge=0, description="AdamW weight decay.")
    adam_beta1: float | None = Field(default=None, gt=0, lt=1, description="AdamW beta1.")
    adam_beta2: float | None = Field(default=None, gt=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float | None = Field(default=None, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(default=None, ge=0, description="Gradient clipping norm.")
    lr_scheduler: str = Field(default="cosine", description="A transformers scheduler name.")
    lr_scheduler_kwargs: dict[str, Any] | None = Field(
        default=None, description="Extra scheduler arguments."
    )
    cosine_min_lr_ratio: float | None = planned(MODELS, "Cosine decays to this ratio of the peak.")
    cosine_constant_lr_ratio: float | None = planned(MODELS, "Cosine with a constant tail.")
    lr_quadratic_warmup: bool | None = planned(MODELS, "Quadratic instead of linear warmup.")
    lr_div_factor: float | None = planned(MODELS, "one_cycle: initial lr = peak / factor.")
    warmup_steps: int | None = Field(default=None, ge=0, description="Linear warmup steps.")
    warmup_ratio: float | None = Field(
        default=None, gt=0, lt=1, description="Warmup as a fraction of all steps."
    )
    logging_steps: int | None = Field(default=None, gt=0, description="Log every N steps.")
    eval_steps: int | float | None = Field(
        default=None, gt=0, description="Evaluate every N steps (or a fraction of all steps)."
    )
    evals_per_epoch: int | None = Field(default=None, gt=0, description="Evaluations per epoch.")
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
    early_stopping_patience: int | None = planned(MODELS, "Stop after N evals without improvement.")
    loss_watchdog_threshold: float | None = planned(MODELS, "Abort when the loss exceeds this.")
    loss_watchdog_patience: int | None = planned(MODELS, "Steps above the threshold before abort.")
    torch_compile: bool | Literal["auto"] | None = planned(MODELS, "Compile the model.")
    torch_compile_backend: str | None = planned(MODELS, "torch.compile backend.")
    resume_from_checkpoint: str | None = planned(MODELS, "Checkpoint folder to resume from.")
    auto_resume_from_checkpoints: bool | None = planned(
        MODELS, "Resume from the newest checkpoint in output_dir."
    )
    strict: bool | None = Field(
        default=None, description="Overrides may only change keys present in the YAML."
    )
    debug: bool | None = ignored("Axolotl's tokenization debug output; use `newtune preprocess`.")
