"""Wire ReLoRA, jagged lr restarts, LoRA+, LISA and generation metrics into a built Trainer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from newtune.train.relora import Jagged

log = logging.getLogger(__name__)

DEFAULT_LORAPLUS_LR_EMBEDDING = 1e-6  # peft's and Axolotl's default


@dataclass(frozen=True)
class LoraPlus:
    """LoRA+ learning rates: lora_B at lr x ratio, LoRA embedding adapters at `embedding_lr`."""

    ratio: float
    embedding_lr: float = DEFAULT_LORAPLUS_LR_EMBEDDING


def loraplus_optimizer(trainer: Any, plus: LoraPlus) -> Any:
    """The Trainer's optimizer class and arguments, with peft's LoRA+ parameter groups."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", trainer.args.learning_rate)
    optimizer = create_loraplus_optimizer(
        trainer.model,
        optimizer_cls,
        lr=lr,
        loraplus_lr_ratio=plus.ratio,
        loraplus_lr_embedding=plus.embedding_lr,
        loraplus_weight_decay=trainer.args.weight_decay,
        **kwargs,
    )
    log.info(
        "LoRA+: lora_B at lr %g x %g, LoRA embeddings at lr %g", lr, plus.ratio, plus.embedding_lr
    )
    return optimizer


def attach(trainer: Any, config: Any, tokenizer: Any) -> Any:
    """Give the Trainer what the config's ReLoRA / jagged / LoRA+ / LISA / eval keys ask for."""
    trainer.jagged = Jagged.from_config(config)
    if config.loraplus_lr_ratio is not None:
        trainer.loraplus = LoraPlus(
            config.loraplus_lr_ratio,
            config.loraplus_lr_embedding or DEFAULT_LORAPLUS_LR_EMBEDDING,
        )
    if config.relora:
        from newtune.train.relora import ReLoRACallback

        relora = ReLoRACallback(trainer, config)  # first: its on_log entry reaches the trackers
        trainer.callback_handler.callbacks.insert(0, relora)
    if config.lisa_n_layers and config.lisa_step_interval:
        from newtune.train.lisa import LISACallback

        trainer.add_callback(
            LISACallback(
                trainer.model,
                config.lisa_n_layers,
                config.lisa_step_interval,
                config.lisa_layers_attribute,
                config.seed,
            )
        )
    if config.do_causal_lm_eval or config.eval_table_size:
        from newtune.train.generation_eval import GenerationEvalCallback

        trainer.add_callback(GenerationEvalCallback(trainer, config, tokenizer))
    from newtune.config.compat2 import diffusion_enabled

    if diffusion_enabled(config):  # DiffusionPlugin: diffusion loss, eval and samples
        from newtune.train.methods.diffusion import DiffusionMethod

        DiffusionMethod(config).install(trainer, tokenizer)
    from newtune.train.swanlab_completions import attach_completions

    attach_completions(trainer, config, tokenizer)  # swanlab_log_completions (preference)
    return trainer
