"""Training methods: each owns its row schema, collator, loss and metrics (SFT, DPO, ORPO, KTO, reward)."""

from __future__ import annotations

from typing import Any


def method_for(config: Any) -> Any:
    """The training method the config asks for (`rl`, `reward_model`), as a Method object."""
    from newtune.config.compat2 import diffusion_enabled
    from newtune.config.schema.preference import training_method

    if diffusion_enabled(config):  # DiffusionPlugin: masked-diffusion loss on SFT rows
        from newtune.train.methods.diffusion import DiffusionMethod

        return DiffusionMethod(config)
    if getattr(config, "rl", None) in ("grpo", "gdpo"):  # online: TRL's GRPOTrainer
        from newtune.train.methods.grpo import GRPOMethod

        return GRPOMethod(config)
    if getattr(config, "rl", None) == "ebft":  # online: TRL's GRPOTrainer, or strided blocks
        from newtune.config.schema.online import ebft_mode

        if ebft_mode(config) == "strided":
            from newtune.train.methods.ebft_strided import StridedEBFTMethod

            return StridedEBFTMethod(config)
        from newtune.train.methods.ebft import StructuredEBFTMethod

        return StructuredEBFTMethod(config)
    name = training_method(config)
    if name == "dpo":
        from newtune.train.methods.dpo import DPOMethod

        return DPOMethod(config)
    if name == "orpo":
        from newtune.train.methods.orpo import ORPOMethod

        return ORPOMethod(config)
    if name == "kto":
        from newtune.train.methods.kto import KTOMethod

        return KTOMethod(config)
    if name == "reward":
        from newtune.train.methods.reward import RewardMethod

        return RewardMethod(config)
    if name == "prm":  # process_reward_model: a token classifier on step labels
        from newtune.train.methods.prm import PRMMethod

        return PRMMethod(config)
    from newtune.train.methods.sft import SFTMethod

    return SFTMethod(config)
