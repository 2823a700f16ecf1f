"""Keys of experiment tracking and the hub."""

from typing import Literal

from pydantic import Field

from newtune.config.schema.base import Section


class LoggingSection(Section):
    """Trackers (wandb, mlflow, tensorboard) and hub uploads; nothing is reported by default."""

    wandb_project: str | None = Field(
        default=None, description="Weights & Biases project: report to wandb (`pip install wandb`)."
    )
    wandb_entity: str | None = Field(default=None, description="Weights & Biases entity (team).")
    wandb_watch: str | None = Field(default=None, description="wandb.watch mode (WANDB_WATCH).")
    wandb_name: str | None = Field(default=None, description="Weights & Biases run name.")
    wandb_run_id: str | None = Field(default=None, description="Weights & Biases run id.")
    wandb_log_model: str | None = Field(
        default=None, description="Upload checkpoints (`checkpoint`) or the final model (`end`)."
    )
    wandb_mode: str | None = Field(
        default=None, description="online, offline (local files only) or disabled."
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (server or `file:` folder): report to mlflow.",
    )
    mlflow_experiment_name: str | None = Field(
        default=None, description="MLflow experiment: report to mlflow."
    )
    hf_mlflow_log_artifacts: bool | None = Field(
        default=None, description="Also copy each saved checkpoint to MLflow's artifact store."
    )
    use_tensorboard: bool | None = Field(
        default=None, description="Write TensorBoard event files under output_dir/runs."
    )
    hub_model_id: str | None = Field(
        default=None,
        description="Hub repo the model is pushed to (token from HF_TOKEN / `hf auth login`).",
    )
    hub_strategy: Literal["end", "every_save", "checkpoint", "all_checkpoints"] | None = Field(
        default=None,
        description="When to push to hub_model_id (transformers' hub_strategy; default every_save).",
    )
    hf_use_auth_token: bool | None = Field(
        default=None,
        description="Use the HF token from the environment (HF_TOKEN) for hub access; a bool, "
        "never the token itself.",
    )
