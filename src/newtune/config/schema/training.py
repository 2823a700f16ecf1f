"""Keys of the training loop."""

from pydantic import Field

from newtune.config.schema.base import Section


class TrainingSection(Section):
    """Batching, schedule, optimizer and logging."""

    output_dir: str = Field(default="./outputs", description="Where the trained model is written.")
    micro_batch_size: int = Field(default=1, gt=0, description="Samples per device per step.")
    gradient_accumulation_steps: int = Field(
        default=1, gt=0, description="Micro-batches accumulated per optimizer step."
    )
    num_epochs: float = Field(default=1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, gt=0, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: float = Field(default=2e-5, gt=0, description="Peak learning rate.")
    optimizer: str = Field(default="adamw_torch", description="A transformers optimizer name.")
    lr_scheduler: str = Field(default="cosine", description="A transformers scheduler name.")
    warmup_steps: int | None = Field(default=None, ge=0, description="Linear warmup steps.")
    logging_steps: int | None = Field(default=None, gt=0, description="Log every N steps.")
    seed: int = Field(default=42, description="Seed for shuffling, splits and initialisation.")
