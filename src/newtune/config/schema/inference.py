"""Keys of `newtune inference` generation (flags of the same names override them)."""

from pydantic import Field

from newtune.config.schema.base import Section


class InferenceSection(Section):
    """Sampling options for `newtune inference`."""

    max_new_tokens: int | None = Field(
        default=None, gt=0, description="inference: tokens to generate per answer (default 128)."
    )
    do_sample: bool | None = Field(
        default=None, description="inference: sample instead of greedy decoding (default false)."
    )
    temperature: float | None = Field(
        default=None, gt=0, description="inference: sampling temperature (with do_sample)."
    )
    top_p: float | None = Field(
        default=None, gt=0, le=1, description="inference: nucleus sampling mass (with do_sample)."
    )
    top_k: int | None = Field(
        default=None, ge=0, description="inference: sample from the k likeliest tokens."
    )
    repetition_penalty: float | None = Field(
        default=None, gt=0, description="inference: penalty for repeated tokens (1.0: none)."
    )
