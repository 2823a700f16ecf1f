"""The newtune config schema: one strict pydantic model built from per-concern sections."""

from newtune.config.schema.adapter import AdapterSection
from newtune.config.schema.data import DataSection, DatasetEntry
from newtune.config.schema.model import ModelSection
from newtune.config.schema.training import TrainingSection


class NewtuneConfig(TrainingSection, AdapterSection, DataSection, ModelSection):
    """Every key newtune honours, with Axolotl's names and meanings."""


__all__ = ["DatasetEntry", "NewtuneConfig"]
