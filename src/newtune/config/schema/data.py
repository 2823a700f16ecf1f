"""Keys that say where the data is and how rows become tokens."""

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from newtune.chat_templates import NAMED_TEMPLATES, template_problem
from newtune.config.schema.base import Section

TrainOnEos = Literal["all", "turn", "last", "none"]


class DatasetEntry(Section):
    """One entry of `datasets:`."""

    path: str = Field(description="Hub id, local file or local folder of the data.")
    type: str | dict[str, Any] | None = Field(
        default=None,
        description="Prompt format: alpaca, completion, chat_template, ... Each format reads "
        "only some of the keys below (others are errors). Text columns may hold numbers "
        "(read as their decimal text); booleans, lists and mappings there are errors.",
    )
    ds_type: Literal["json", "jsonl", "csv", "parquet", "arrow", "text"] | None = Field(
        default=None, description="File format when the extension does not say it."
    )
    data_files: str | list[str] | None = Field(default=None, description="Files inside `path`.")
    split: str = Field(default="train", description="Split of the source to read.")
    name: str | list[str] | None = Field(
        default=None, description="Hub dataset configuration name(s); a list is concatenated."
    )
    train_on_split: str | None = Field(
        default=None, description="Split to train on; overrides `split`."
    )
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) of the dataset."
    )
    shards: int | None = Field(
        default=None, ge=1, description="Split the dataset into this many shards; use the first."
    )
    field: str | None = Field(default=None, description="completion: the column holding the text.")
    conversation: str | None = Field(
        default=None,
        description="alpaca_chat: prompt style (chat, instruct, chatml, phi); sharegpt: chat "
        "template name (deprecated).",
    )
    field_human: str | None = Field(
        default=None, description="sharegpt: the `from` value of human turns (default human)."
    )
    field_model: str | None = Field(
        default=None, description="sharegpt: the `from` value of model turns (default gpt)."
    )
    field_messages: str | None = Field(
        default=None, description="chat_template: the column holding the messages list."
    )
    field_chosen: str | None = Field(
        default=None, description="DPO chat_template.*: the chosen column (default chosen)."
    )
    field_rejected: str | None = Field(
        default=None, description="DPO chat_template.*: the rejected column (default rejected)."
    )
    message_property_mappings: dict[str, str] | None = Field(
        default=None, description="chat_template: message keys, e.g. {role: from, content: value}."
    )
    message_field_role: str | None = Field(
        default=None, description="chat_template: legacy role key name."
    )
    message_field_content: str | None = Field(
        default=None, description="chat_template: legacy content key name."
    )
    message_field_training: str | None = Field(
        default=None, description="chat_template: message key with a per-message train flag."
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
    drop_system_message: bool | None = Field(
        default=None, description="chat_template: drop a leading system turn."
    )
    field_tools: str | None = Field(
        default=None, description="chat_template: column of tool definitions (default tools)."
    )
    field_thinking: str | None = Field(
        default=None,
        description="chat_template: message key holding the reasoning trace (default "
        "reasoning_content); handed to the template under template_thinking_key and trained "
        "with the message's content.",
    )
    template_thinking_key: str | None = Field(
        default=None,
        description="chat_template: the message key the chat template reads the reasoning "
        "trace from (default reasoning_content; e.g. gpt-oss's `thinking`).",
    )
    chat_template: str | None = Field(
        default=None,
        description="Chat template for this dataset (a name as `chat_template`, jinja or a "
        ".jinja file).",
    )
    chat_template_jinja: str | None = Field(
        default=None, description="Jinja chat template for this dataset only."
    )
    step_separator: str | None = Field(
        default=None,
        description="stepwise_supervised: text appended to every step; the step's label sits "
        "on its last token (default a newline).",
    )
    max_completion_length: int | None = Field(
        default=None,
        gt=0,
        description="stepwise_supervised: keep the first this many tokens of the steps.",
    )
    train_on_last_step_only: bool | None = Field(
        default=None,
        description="stepwise_supervised: only the last step's label is trained (and scored).",
    )

    @model_validator(mode="after")
    def _renderable_template(self) -> "DatasetEntry":
        """`chat_template` is one newtune can render (chat_template_jinja, when set, wins)."""
        if self.chat_template is not None and not self.chat_template_jinja:
            problem = template_problem(self.chat_template)
            if problem:
                raise ValueError(problem)
        return self

    system_prompt: str | None = Field(
        default=None, description="user_defined: system text when the row has none."
    )
    system_format: str | None = Field(
        default=None, description="user_defined: layout of the system text ({system})."
    )
    field_system: str | None = Field(
        default=None, description="user_defined: the system column (default system)."
    )
    field_instruction: str | None = Field(
        default=None, description="user_defined: the instruction column (default instruction)."
    )
    field_input: str | None = Field(
        default=None, description="user_defined: the input column (default input)."
    )
    field_output: str | None = Field(
        default=None, description="user_defined: the output column (default output)."
    )
    format: str | None = Field(
        default=None, description="user_defined: prompt with input ({instruction}, {input})."
    )
    no_input_format: str | None = Field(
        default=None, description="user_defined: prompt without input ({instruction})."
    )


class DataSection(Section):
    """Datasets, templates, caching, splits and packing."""

    datasets: list[DatasetEntry] = Field(
        default=[],
        min_length=1,
        description="Training data sources (required unless `pretraining_dataset` is set).",
    )
    test_datasets: list[DatasetEntry] | None = Field(
        default=None, description="Evaluation data sources (instead of val_set_size)."
    )
    chat_template: str | None = Field(
        default=None,
        description=f"Chat template: tokenizer_default, a name ({', '.join(NAMED_TEMPLATES)}), "
        "a jinja string or a .jinja file; other names are refused.",
    )

    @field_validator("chat_template")
    @classmethod
    def _renderable_template(cls, value: str | None) -> str | None:
        """A name newtune has, `tokenizer_default`, a jinja string or a .jinja file."""
        problem = None if value is None else template_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    eot_tokens: list[str] | None = Field(
        default=None, description="End-of-turn tokens of the chat template (default: EOS)."
    )
    dataset_prepared_path: str = Field(
        default="last_run_prepared", description="Folder of the tokenized-dataset cache."
    )
    dataset_processes: int | None = Field(
        default=None, gt=0, description="Processes used to tokenize (default: CPU count)."
    )
    shuffle_merged_datasets: bool | None = Field(
        default=None, description="Shuffle the rows after merging the datasets."
    )
    dataset_shard_num: int | None = Field(
        default=None, gt=0, description="Split the merged data into this many shards..."
    )
    dataset_shard_idx: int | None = Field(
        default=None, ge=0, description="...and train on this one (default 0)."
    )
    val_set_size: float = Field(
        default=0.0,
        ge=0,
        description="Eval split: a fraction of the rows (0 < x < 1), or a whole number of rows "
        "(1, 2, ...); 0 means none.",
    )
    sequence_len: int = Field(default=2048, gt=1, description="Maximum tokens per sample.")
    excess_length_strategy: Literal["drop", "truncate", "raise"] | None = Field(
        default=None,
        description="Rows longer than sequence_len: drop (default), truncate, raise. Process "
        "reward rows (stepwise_supervised) are truncated by default, as Axolotl and TRL do.",
    )
    min_sample_len: int = Field(default=2, ge=1, description="Rows shorter than this are dropped.")
    train_on_inputs: bool = Field(
        default=False, description="Also train on prompt tokens instead of masking them."
    )
    sample_packing: bool | None = Field(
        default=None,
        description="Pack several samples into each row (multipack; samples stay isolated).",
    )
    eval_sample_packing: bool | None = Field(
        default=None, description="Pack the eval split too (default: as sample_packing)."
    )
    sample_packing_eff_est: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Expected packing efficiency; newtune measures it and logs both.",
    )
    total_num_tokens: int | None = Field(
        default=None, gt=0, description="Training tokens; newtune counts them and logs both."
    )
    pad_to_sequence_len: bool | None = Field(
        default=None, description="Pad every batch to sequence_len (fixed shapes)."
    )
    group_by_length: bool | None = Field(
        default=None, description="Batch samples of similar length together (unpacked runs)."
    )

    @field_validator("val_set_size")
    @classmethod
    def _fraction_or_count(cls, value: float) -> float:
        """Below 1 a fraction of the rows; from 1 on a whole number of rows (1.5 is an error)."""
        if value > 1 and not float(value).is_integer():
            raise ValueError(
                f"{value} is neither a fraction below 1 (e.g. 0.05: 5% of the rows) nor a "
                f"whole number of rows (e.g. {int(value)})"
            )
        return value
