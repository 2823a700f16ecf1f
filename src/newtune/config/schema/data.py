"""Keys that say where the data is and how rows become tokens."""

from typing import Literal

from pydantic import Field

from newtune.config.schema.base import Section

TrainOnEos = Literal["all", "turn", "last", "none"]


class DatasetEntry(Section):
    """One entry of `datasets:`."""

    path: str = Field(description="Hub id, local file or local folder of the data.")
    type: str | None = Field(
        default=None, description="Prompt format: alpaca, completion, chat_template, ..."
    )
    ds_type: Literal["json", "jsonl"] | None = Field(
        default=None, description="File format when the extension does not say it."
    )
    data_files: str | list[str] | None = Field(default=None, description="Files inside `path`.")
    split: str = Field(default="train", description="Split of the source to read.")
    field: str | None = Field(default=None, description="completion: the column holding the text.")
    field_messages: str | None = Field(
        default=None, description="chat_template: the column holding the messages list."
    )
    message_property_mappings: dict[str, str] | None = Field(
        default=None, description="chat_template: message keys, e.g. {role: from, content: value}."
    )
    roles: dict[str, list[str]] | None = Field(
        default=None, description="chat_template: template role -> the names used in the data."
    )
    roles_to_train: list[str] | None = Field(
        default=None,
        description="chat_template: roles whose content is trained (default assistant).",
    )
    train_on_eos: TrainOnEos | None = Field(
        default=None,
        description="chat_template: which end-of-turn tokens are trained (default turn).",
    )


class DataSection(Section):
    """Datasets, templates, caching and splits."""

    datasets: list[DatasetEntry] = Field(min_length=1, description="Training data sources.")
    chat_template: str | None = Field(
        default=None, description="Template name (chatml, tokenizer_default) or a jinja string."
    )
    dataset_prepared_path: str = Field(
        default="last_run_prepared", description="Folder of the tokenized-dataset cache."
    )
    val_set_size: float = Field(
        default=0.0, ge=0, description="Eval split: a fraction (< 1) or a row count (>= 1)."
    )
    sequence_len: int = Field(default=2048, gt=1, description="Maximum tokens per sample.")
    train_on_inputs: bool = Field(
        default=False, description="Also train on prompt tokens instead of masking them."
    )
