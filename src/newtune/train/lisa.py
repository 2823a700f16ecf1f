"""LISA (arXiv 2403.17919): layer-wise importance sampling. Every `lisa_step_interval` steps all
layers of `lisa_layers_attribute` are frozen and `lisa_n_layers` of them, drawn at random, train.

Axolotl's `utils/callbacks/lisa.py` defines the behaviour. The draw comes from a generator seeded
with `seed` and the step, so a run (and a resumed run) draws the same layers. The optimizer is
built before the first draw, when every parameter trains, so it covers all of them; frozen
parameters get no gradient and the optimizer skips them.
"""

from __future__ import annotations

import logging
from functools import reduce
from typing import Any

import torch
from transformers import TrainerCallback

from newtune.errors import ConfigError

log = logging.getLogger(__name__)


def layers_of(model: Any, attribute: str) -> Any:
    """The module list at the dotted `attribute` path of the model."""
    try:
        layers = reduce(getattr, attribute.split("."), model)
    except AttributeError as exc:
        raise ConfigError(
            f"`lisa_layers_attribute: {attribute}`: the model ({type(model).__name__}) has no "
            f"such attribute ({exc}); give the dotted path of its list of decoder layers, e.g. "
            "model.layers (llama, qwen, mistral) or transformer.h (gpt2)"
        ) from exc
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(
            f"`lisa_layers_attribute: {attribute}` is a {type(layers).__name__}, not the "
            "model's list of layers (a ModuleList)"
        )
    return layers


def draw_layers(count: int, total: int, seed: int, step: int) -> list[int]:
    """`count` distinct layer indices in [0, total), drawn from (seed, step)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return sorted(torch.randperm(total, generator=generator)[:count].tolist())


class LISACallback(TrainerCallback):
    """Freeze every layer and unfreeze `n_layers` random ones every `interval` steps."""

    def __init__(self, model: Any, n_layers: int, interval: int, attribute: str, seed: int):
        self.model, self.attribute = model, attribute
        self.n_layers, self.interval, self.seed = n_layers, interval, seed
        total = len(layers_of(model, attribute))
        if n_layers > total:
            raise ConfigError(
                f"`lisa_n_layers: {n_layers}` is more than the {total} layers at "
                f"`lisa_layers_attribute: {attribute}`; choose at most {total}"
            )
        self.total = total
        self.active: list[int] = []
        log.info(
            "LISA: %d of %d layers train, drawn again every %d steps", n_layers, total, interval
        )

    def switch(self, step: int) -> list[int]:
        """Freeze all layers, unfreeze this step's draw; return the active indices."""
        layers = layers_of(self.model, self.attribute)
        self.active = draw_layers(self.n_layers, self.total, self.seed, step)
        for index, layer in enumerate(layers):
            for param in layer.parameters():
                param.requires_grad_(index in self.active)
        log.info("LISA: step %d trains layers %s", step, self.active)
        return self.active

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Draw at step 0 (or the resumed step) and every `interval` steps."""
        if state.global_step % self.interval == 0 or not self.active:
            self.switch(state.global_step - state.global_step % self.interval)
        return control
