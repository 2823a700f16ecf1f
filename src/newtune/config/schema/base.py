"""Shared pydantic base for schema sections."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A strict config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
