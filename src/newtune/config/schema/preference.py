"""Preference and reward training keys (`rl:`, `reward_model:`), with Axolotl's names.

`training_method(config)` names the training method a config asks for; the train side picks
its row schema, collator and loss from it, and the data side the dataset formats and columns.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from newtune.config.schema.base import Section, ignored, unsupported
from newtune.config.schema.compat import refused

# Every `loss_type` TRL 1.16's DPOTrainer accepts; the one list, which the torch-free schema
# and the train side (train.methods.preference imports it) both use.
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
DpoLossType = Literal[DPO_LOSS_TYPES]  # type: ignore[valid-type]
RL_METHODS = ("dpo", "ipo", "simpo", "orpo", "kto", "ebft", "grpo", "gdpo")
METHODS = ("sft", "dpo", "orpo", "kto", "reward", "prm")
PREFERENCE_METHODS = ("dpo", "orpo", "kto", "reward", "prm")
REFUSED_RL = {
    "kto_pair": "TRL removed DPO's `kto_pair` loss (the seed's legacy name); newtune has no "
    "such loss. Use `rl: kto` (TRL's KTOTrainer: paired rows are split into a desirable and an "
    "undesirable row), or `rl: dpo` for a paired loss",
}


def method_of(rl: str | None, reward_model: bool | None, prm: bool | None = None) -> str:
    """The training method of an `rl` value and the `reward_model`/`process_reward_model` flags."""
    if reward_model:
        return "reward"
    if prm:
        return "prm"
    if rl in ("dpo", "ipo", "simpo"):
        return "dpo"
    if rl in ("orpo", "kto"):
        return rl
    return "sft"


def training_method(config: Any) -> str:
    """One of "sft", "dpo" (dpo, ipo, simpo), "orpo", "kto", "reward", "prm", from the config."""
    return method_of(
        getattr(config, "rl", None),
        getattr(config, "reward_model", None),
        getattr(config, "process_reward_model", None),
    )


class PreferenceSection(Section):
    """Preference training (DPO, IPO, SimPO, ORPO, KTO) and reward models."""

    rl: str | None = Field(
        default=None,
        description="Preference training method: dpo, ipo (dpo with `dpo_loss_type: [ipo]`), "
        "simpo, orpo or kto; online RL (schema.online, `trl:` block): ebft (energy-based "
        "fine-tuning, `ebft:`), grpo or gdpo (TRL's GRPOTrainer with `trl.reward_funcs`; gdpo "
        "normalises each reward before summing). `kto_pair` is refused by name.",
    )
    rl_beta: float | None = Field(
        default=None, gt=0, description="Beta of the preference loss (TRL default 0.1)."
    )
    dpo_loss_type: list[DpoLossType] | None = Field(  # type: ignore[valid-type]
        default=None,
        min_length=1,
        description=f"DPO loss types, summed (default [sigmoid]): {', '.join(DPO_LOSS_TYPES)}.",
    )
    dpo_loss_weights: list[float] | None = Field(
        default=None, min_length=1, description="One weight per `dpo_loss_type` entry."
    )
    dpo_label_smoothing: float | None = Field(
        default=None, ge=0, le=0.5, description="Label smoothing of the DPO/SimPO loss."
    )
    dpo_use_weighting: bool | None = Field(
        default=None, description="WPO weighting of the DPO loss."
    )
    dpo_use_liger_kernel: Any = refused(
        "Liger's fused DPO loss.",
        "newtune computes the DPO loss from per-sequence log-probs (padded or packed) in plain "
        "torch, and its output head already runs only at trained positions (the loss is the "
        "same without the key)",
    )
    precompute_ref_log_probs: bool | None = Field(
        default=None,
        description="Compute the reference model's log-probs once, stored with the prepared "
        "data, so training holds one model.",
    )
    dpo_padding_free: bool | None = Field(
        default=None, description="Pack preference sequences (the same path as sample_packing)."
    )
    cpo_alpha: float | None = Field(
        default=None, ge=0, description="SimPO (CPO): weight of the NLL term on chosen."
    )
    simpo_gamma: float | None = Field(
        default=None, description="SimPO: target reward margin (TRL default 0.5)."
    )
    orpo_alpha: float | None = Field(
        default=None, gt=0, description="ORPO: weight of the odds-ratio term (TRL's beta)."
    )
    kto_desirable_weight: float | None = Field(
        default=None, gt=0, description="KTO: weight of desirable (label true) rows."
    )
    kto_undesirable_weight: float | None = Field(
        default=None, gt=0, description="KTO: weight of undesirable (label false) rows."
    )
    reward_model: bool | None = Field(
        default=None,
        description="Train a reward model (sequence classification, Bradley-Terry loss).",
    )
    num_labels: int | None = Field(
        default=None,
        description="Classifier outputs: 1 for a reward model (a scalar reward), 2 for a "
        "process reward model (each step scored wrong/right); the default in both cases.",
    )
    center_rewards_coefficient: float | None = Field(
        default=None, ge=0, description="Reward model: pull rewards toward zero mean (0.01)."
    )
    max_prompt_len: int | None = Field(
        default=None,
        gt=0,
        description="Preference training: longest prompt in tokens; longer prompts are "
        "handled by `excess_length_strategy` (drop, truncate: keep the end, raise).",
    )
    remove_unused_columns: bool | None = ignored(
        "newtune keeps only the columns a training method reads."
    )
    process_reward_model: bool | None = Field(
        default=None,
        description="Train a process reward model (PRM): a token classifier "
        "(AutoModelForTokenClassification, `num_labels: 2`) that labels each reasoning step "
        "right or wrong at the step's separator token, on `type: stepwise_supervised` rows "
        "(prompt, completions: steps, labels: one bool per step), as TRL's PRMTrainer.",
    )
    dpo_beta: float | None = unsupported("Deprecated DPO beta.", "`rl_beta`")
    rpo_alpha: float | None = unsupported(
        "RPO's NLL weight.", "`dpo_loss_type: [sigmoid, sft]` with `dpo_loss_weights`"
    )
    dpo_norm_loss: bool | None = unsupported(
        "Length-normalised DPO loss.", "`dpo_loss_type: [sigmoid_norm]`"
    )

    @field_validator("rl")
    @classmethod
    def _known_method(cls, value: str | None) -> str | None:
        """One of RL_METHODS; refused names say why and what to use."""
        if value is None or value in RL_METHODS:
            return value
        if value in REFUSED_RL:
            raise ValueError(f"`rl: {value}` is refused: {REFUSED_RL[value]}")
        raise ValueError(f"`rl: {value}` is not one of {', '.join(RL_METHODS)}")
