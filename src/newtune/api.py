"""The Python API: load a config, prepare its data and train, from a notebook or a script.

Every function takes the config as a YAML path, an https URL, a dict (validated exactly as
a YAML file is), or an already loaded config, plus `key=value` overrides. Heavy libraries
(torch, transformers) are imported only when data is prepared or a model is trained.
None of them changes the config object it is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from newtune.config.given import DICT_SOURCE, OBJECT_SOURCE, ConfigLike, from_data, load_given
from newtune.config.load import LoadedConfig

if TYPE_CHECKING:
    from newtune.data.prepare import PreparedData
    from newtune.train.stepwise import StepTrainer

__all__ = [
    "DICT_SOURCE",
    "OBJECT_SOURCE",
    "ConfigLike",
    "from_data",
    "load_config",
    "preprocess",
    "stepwise",
    "train",
]


def load_config(config: ConfigLike, **overrides: Any) -> LoadedConfig:
    """The validated config (`.config`) with its source; a dict is checked like a YAML file."""
    return load_given(config, **overrides)


def preprocess(config: ConfigLike, force: bool = False, **overrides: Any) -> PreparedData:
    """Tokenize the config's datasets (or reuse the cache); `.data['train']` holds the rows."""
    from newtune.data.prepare import prepare_data

    return prepare_data(load_config(config, **overrides), force=force)[1]


def train(config: ConfigLike, **overrides: Any) -> Path:
    """Train as the config says (as `newtune train` does); return the output folder."""
    from newtune.train.run import train as run_train

    loaded = load_config(config, **overrides)
    if loaded.config.use_ray:  # Ray Train workers run the same `run_train` (train.ray_launch)
        from newtune.train.ray_launch import train_with_ray

        return train_with_ray(loaded)
    return run_train(loaded)


def stepwise(
    config: ConfigLike, truncation_mode: str = "keep_end", **overrides: Any
) -> StepTrainer:
    """A StepTrainer for this config: one optimizer step per `.step(...)` call."""
    from newtune.train.stepwise import StepTrainer

    return StepTrainer(config, truncation_mode=truncation_mode, **overrides)
