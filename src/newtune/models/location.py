"""Where a model lives: a local folder, a local .gguf file, or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from newtune.errors import ConfigError, ModelError


@dataclass(frozen=True)
class ModelLocation:
    """Arguments for `from_pretrained`: the folder or hub id, and the GGUF file name if any."""

    name_or_path: str
    gguf_file: str | None = None
    is_local: bool = False

    def kwargs(self) -> dict[str, str]:
        """Extra keyword arguments for `from_pretrained`."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def locate(value: str, key: str = "base_model") -> ModelLocation:
    """Resolve a config value naming a model; raise ModelError for a missing local path."""
    path = Path(value).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelLocation(str(path.parent), path.name, is_local=True)
    if path.is_dir():
        return ModelLocation(str(path), is_local=True)
    looks_local = value.startswith((".", "/", "~")) or path.suffix == ".gguf" or path.is_file()
    if looks_local:
        what = "is not a .gguf file or a model folder" if path.exists() else "does not exist"
        raise ModelError(
            f"`{key}: {value}` {what} (looked from {Path.cwd()}). Point `{key}` at a model "
            "folder (with config.json), a .gguf file, or a Hugging Face hub id."
        )
    return ModelLocation(value)


def hub_error(key: str, value: str, exc: Exception) -> ModelError:
    """The error for a hub id that could not be loaded."""
    return ModelError(
        f"`{key}: {value}` is not a local folder or .gguf file, and loading it from the "
        f"Hugging Face hub failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
        "Check the id and your network (HF_HUB_OFFLINE, HF_TOKEN), or point it at a local copy."
    )


def transformers_class(key: str, name: str | None, default: Any, examples: str) -> Any:
    """The transformers class a config key names (`default` when unset); ConfigError if none."""
    if not name:
        return default
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ConfigError(
            f"`{key}: {name}` is not a transformers {key.split('_')[0]} class; use e.g. "
            f"{examples}, or remove the key."
        )
    return cls
