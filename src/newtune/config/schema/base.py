"""Shared pydantic base for schema sections, and field helpers that record a key's status."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """A strict config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """`key:` with no value (null) means the key's default, as in Axolotl configs."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if not (v is None and k in fields and fields[k].default is not None)
        }


def unsupported(description: str, alternative: str | None = None) -> Any:
    """An Axolotl key newtune does not implement; off values are accepted."""
    extra = {"status": "not implemented"}
    if alternative:
        extra["alternative"] = alternative
    return Field(default=None, description=description, json_schema_extra=extra)


def ignored(description: str) -> Any:
    """An internal Axolotl key that means nothing to newtune: accepted and ignored."""
    return Field(default=None, description=description, json_schema_extra={"status": "ignored"})


def status_of(field_info: Any) -> dict[str, str]:
    """The status metadata of a field (`implemented` when none was recorded)."""
    extra = field_info.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {"status": "implemented"}
