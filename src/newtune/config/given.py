"""A config in any form the Python API takes (path, URL, dict, loaded config, config object).

It lives below both `newtune.api` and `newtune.train.stepwise`, which both need it, so neither
imports the other. Imports no torch.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from newtune.config import load as config_load
from newtune.config.load import LoadedConfig
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError

ConfigLike = str | os.PathLike | dict | LoadedConfig | NewtuneConfig
DICT_SOURCE = "config dict"
OBJECT_SOURCE = "config object"

log = logging.getLogger("newtune")


def _plain(value: Any, where: str) -> Any:
    """`value` as plain YAML data: Paths become strings, tuples lists; others are refused."""
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise ConfigError(
        f"{DICT_SOURCE}: `{where}` has type {type(value).__name__}; a config holds only strings, "
        "numbers, booleans, lists and mappings (as YAML does). Convert the value first."
    )


def from_data(data: dict[str, Any], source: str, overrides: dict[str, Any]) -> LoadedConfig:
    """Validate config data as `config.load.load_config` validates a YAML file's mapping."""
    return config_load.validate_data(_plain(data, ""), source, None, overrides)


def load_given(config: ConfigLike, **overrides: Any) -> LoadedConfig:
    """The validated config (`.config`) with its source; a dict is checked like a YAML file."""
    if isinstance(config, LoadedConfig):
        if not overrides:
            return config
        loaded = from_data(config.raw, config.source, overrides)
    elif isinstance(config, NewtuneConfig):
        data = config.model_dump(mode="json", exclude_unset=True)
        loaded = from_data(data, OBJECT_SOURCE, overrides)
    elif isinstance(config, dict):
        loaded = from_data(config, DICT_SOURCE, overrides)
    elif isinstance(config, str | os.PathLike):
        loaded = config_load.load_config(os.fspath(config), overrides)
    else:
        raise ConfigError(
            "A config is a YAML path, an https URL, a dict or a loaded config; got "
            f"{type(config).__name__}. Pass one of those to newtune.load_config."
        )
    for note in loaded.notes:
        (log.warning if note.startswith("warning:") else log.info)(note)
    return loaded
