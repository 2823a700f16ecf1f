"""Config: YAML loading, the pydantic schema and the resolved run plan."""

from newtune.config.load import load_config
from newtune.config.resolve import RunPlan, resolve
from newtune.config.schema import DatasetEntry, NewtuneConfig

__all__ = ["DatasetEntry", "NewtuneConfig", "RunPlan", "load_config", "resolve"]
