"""Keys of experiment tracking and the hub."""

from typing import Literal

from pydantic import Field

from newtune.config.schema.base import MODELS, Section, planned


class LoggingSection(Section):
    """Trackers (wandb, mlflow) and hub uploads."""

    wandb_project: str | None = planned(MODELS, "Weights & Biases project.")
    wandb_entity: str | None = planned(MODELS, "Weights & Biases entity.")
    wandb_watch: str | None = planned(MODELS, "wandb.watch mode.")
    wandb_name: str | None = planned(MODELS, "Weights & Biases run name.")
    wandb_run_id: str | None = planned(MODELS, "Weights & Biases run id.")
    wandb_log_model: str | None = planned(MODELS, "Upload checkpoints to Weights & Biases.")
    wandb_mode: str | None = planned(MODELS, "online, offline or disabled.")
    mlflow_tracking_uri: str | None = planned(MODELS, "MLflow tracking server.")
    mlflow_experiment_name: str | None = planned(MODELS, "MLflow experiment.")
    hf_mlflow_log_artifacts: bool | None = planned(MODELS, "Log checkpoints to MLflow.")
    hub_model_id: str | None = planned(MODELS, "Hub repo to push the trained model to.")
    hub_strategy: Literal["end", "every_save", "checkpoint", "all_checkpoints"] | None = planned(
        MODELS, "When to push to the hub."
    )
    hf_use_auth_token: bool | None = Field(
        default=None,
        description="Use the HF token from the environment (HF_TOKEN) for hub access; a bool, "
        "never the token itself.",
    )
