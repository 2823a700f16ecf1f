"""newtune: fine-tune causal language models from one YAML file.

The Python API (each takes a YAML path, an https URL, a dict or a loaded config, plus
`key=value` overrides): `load_config`, `preprocess`, `train`, and `StepTrainer` for
iterative SFT. Names are imported on first use, so `import newtune` stays light (no torch).
"""

from __future__ import annotations

import importlib
import types
from pathlib import Path
from typing import Any

from newtune import train as _train_package  # the subpackage: only a docstring, no imports
from newtune.errors import ConfigError, DataError, ModelError, NewtuneError

__version__ = "0.1.0"

_LAZY = {
    "load_config": "newtune.api",
    "preprocess": "newtune.api",
    "stepwise": "newtune.api",
    "StepTrainer": "newtune.train.stepwise",
}

__all__ = [
    "ConfigError",
    "DataError",
    "ModelError",
    "NewtuneError",
    "StepTrainer",
    "load_config",
    "preprocess",
    "stepwise",
    "train",
]


def __getattr__(name: str) -> Any:
    """Import the API's functions and classes when first used."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'newtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _CallableTrainPackage(types.ModuleType):
    """`newtune.train` is the training subpackage and also `newtune.train(config)`."""

    def __call__(self, config: Any, **overrides: Any) -> Path:
        """Train as the config says (as `newtune train` does); return the output folder."""
        from newtune.api import train

        return train(config, **overrides)


# `import newtune.train.run` binds `newtune.train` to the subpackage, so a function of that
# name could not live beside it: the subpackage itself is made callable instead.
_train_package.__class__ = _CallableTrainPackage
