"""The newtune config schema: one strict pydantic model built from per-concern sections."""

from newtune.config.schema.adapter import AdapterSection
from newtune.config.schema.base import status_of
from newtune.config.schema.compat import CompatSection
from newtune.config.schema.compat2 import Compat2Section
from newtune.config.schema.compat3 import Compat3Section
from newtune.config.schema.data import DataSection, DatasetEntry
from newtune.config.schema.distributed import DistributedSection
from newtune.config.schema.inference import InferenceSection
from newtune.config.schema.logging import LoggingSection
from newtune.config.schema.model import ModelSection
from newtune.config.schema.multimodal import MultimodalSection
from newtune.config.schema.online import OnlineSection
from newtune.config.schema.preference import PreferenceSection
from newtune.config.schema.pretraining import PretrainingSection
from newtune.config.schema.seed_training import SeedTrainingSection
from newtune.config.schema.training import TrainingSection
from newtune.config.schema.unsupported import UnsupportedSection


class NewtuneConfig(
    UnsupportedSection,
    CompatSection,
    Compat2Section,
    Compat3Section,
    SeedTrainingSection,
    MultimodalSection,
    OnlineSection,
    PreferenceSection,
    PretrainingSection,
    InferenceSection,
    LoggingSection,
    DistributedSection,
    TrainingSection,
    AdapterSection,
    DataSection,
    ModelSection,
):
    """Every key of Axolotl's config reference, with Axolotl's names and meanings."""


__all__ = ["DatasetEntry", "NewtuneConfig", "status_of"]
