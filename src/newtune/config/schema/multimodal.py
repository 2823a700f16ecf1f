"""Vision-language keys (Axolotl's multimodal keys): processor, images, frozen vision modules.

A config is multimodal when it sets `processor_type` (Axolotl's multimodal configs all do):
a processor is loaded beside the tokenizer, the model class is `AutoModelForImageTextToText`
unless `model_type` names another, and chat rows may hold image parts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from newtune.config.schema.base import Section

RESIZE_ALGORITHMS = ("bilinear", "bicubic", "lanczos", "nearest", "box", "hamming")


class RoleBoundary(BaseModel):
    """One of Axolotl's `role_boundaries`: the text markers that open and close a role's turn."""

    model_config = ConfigDict(extra="forbid")

    role: str
    start: str
    end: str | None = None
    include_start: bool = False
    include_end: bool = True


class MultimodalSection(Section):
    """Vision-language models: the processor, image sizing and which modules train."""

    processor_type: str | None = Field(
        default=None,
        description="Processor class (AutoProcessor) loaded beside the tokenizer; setting it "
        "makes the config multimodal (images in chat messages, AutoModelForImageTextToText).",
    )
    skip_prepare_dataset: bool | None = Field(
        default=None,
        description="Multimodal: image rows are always tokenized and their pixels made in the "
        "collator; preprocess caches the rows (messages and image references). Without this "
        "key preprocess also opens every image once to check it; with it, a bad image is "
        "found when its batch is built.",
    )
    image_size: int | list[int] | None = Field(
        default=None,
        description="Resize every image to this size (one int: a square; [height, width]) "
        "before the processor sees it.",
    )
    image_resize_algorithm: Literal[RESIZE_ALGORITHMS] | None = Field(  # type: ignore[valid-type]
        default=None, description="Resampling filter for `image_size` (default bilinear)."
    )
    freeze_mm_modules: bool | None = Field(
        default=None,
        description="Keep the vision tower and projector frozen (default true). With false "
        "they train in a full fine-tune, and `lora_target_linear` adapts them too.",
    )
    role_boundaries: list[RoleBoundary] | None = Field(
        default=None,
        description="Axolotl's token markers of each role's turn ({role, start, end, "
        "include_start, include_end}; `end: eos_token` is the EOS token, no `end` runs to the "
        "end of the sequence). When set, trained spans are the tokens between the markers of "
        "`roles_to_train` roles instead of the chat template's render of each message; a row "
        "whose messages' role markers are not found is an error naming the row.",
    )

    @field_validator("image_size")
    @classmethod
    def _size(cls, value: Any) -> Any:
        """A positive int, or [height, width] of positive ints."""
        sizes = value if isinstance(value, list) else [value]
        if value is not None and (
            (isinstance(value, list) and len(value) != 2) or any(s <= 0 for s in sizes)
        ):
            raise ValueError("`image_size` is a positive int or [height, width]")
        return value


def is_multimodal(config: Any) -> bool:
    """True when the config trains a vision-language model (`processor_type` is set)."""
    return bool(getattr(config, "processor_type", None))


def multimodal_rules(cfg: Any) -> list[str]:
    """What a multimodal config cannot do (packing, preference methods), as error paragraphs."""
    if not is_multimodal(cfg):
        return []
    errors = []
    if cfg.sample_packing:
        errors.append(
            f"`sample_packing: true` with `processor_type: {cfg.processor_type}`: image rows "
            "cannot be packed (each row's image tokens and pixel tensors belong to that row, and "
            "neither newtune nor TRL packs them). Set `sample_packing: false` for this "
            "vision-language config"
        )
    if cfg.group_by_length:
        errors.append(
            "`group_by_length: true` with `processor_type`: image rows are tokenized in the "
            "collator, so their lengths are not known before training; remove `group_by_length`"
        )
    method = "reward_model: true" if getattr(cfg, "reward_model", None) else cfg.rl
    if method:
        errors.append(
            f"`{'rl: ' + method if cfg.rl else method}` with `processor_type: "
            f"{cfg.processor_type}`: preference training (DPO, ORPO, KTO, reward models) on "
            "image data is out of scope in newtune; train a vision-language model with SFT "
            "(remove `rl`/`reward_model`), or train preferences on a text-only model"
        )
    return errors
