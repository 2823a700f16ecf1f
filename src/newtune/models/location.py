"""Where a model lives: a local folder, a local .gguf file, or a hub id."""

from __future__ import annotations

import json
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
        f"Hugging Face hub failed ({type(exc).__name__}: {_first_line(exc)}). "
        "Check the id and your network (HF_HUB_OFFLINE, HF_TOKEN), or point it at a local copy."
    )


def load_error(key: str, value: str, loc: ModelLocation, exc: Exception) -> ModelError:
    """The error for a model or tokenizer that `from_pretrained` refused, by what went wrong."""
    if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
        return remote_code_error(key, value, loc)
    if not loc.is_local:
        return hub_error(key, value, exc)
    folder = Path(loc.name_or_path)
    for name in ("config.json", "tokenizer_config.json"):
        problem = json_problem(folder / name)
        if problem:
            return ModelError(f"`{key}: {value}`: {problem}")
    if not loc.gguf_file:
        problem = model_type_problem(folder / "config.json")
        if problem:
            return ModelError(f"`{key}: {value}`: {problem}")
    return ModelError(
        f"`{key}: {value}` could not be loaded from the local "
        f"{'file' if loc.gguf_file else 'folder'} ({type(exc).__name__}: {_first_line(exc)}). "
        "Check that it is a complete transformers model folder (config.json, tokenizer files, "
        "*.safetensors) or a .gguf file; copy it again if a download or copy was interrupted."
    )


def check_json_files(key: str, value: str, loc: ModelLocation) -> None:
    """Refuse a local model folder whose config.json or tokenizer_config.json is not a JSON object.

    transformers reports some of these (a JSON list) as a TypeError that names no file.
    """
    if not loc.is_local:
        return
    for name in ("config.json", "tokenizer_config.json"):
        problem = json_problem(Path(loc.name_or_path) / name)
        if problem:
            raise ModelError(f"`{key}: {value}`: {problem}")


def json_problem(path: Path) -> str | None:
    """Why the JSON file at `path` cannot be read (not UTF-8, not JSON, not an object), or None."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        return f"{path} is not UTF-8 text (byte {exc.start}); replace it with a good copy."
    except json.JSONDecodeError as exc:
        return (
            f"{path} is not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}); "
            "it may be truncated by an interrupted download or copy. Copy the model folder "
            "again, or fix the file."
        )
    if not isinstance(data, dict):
        return f"{path} holds a JSON {type(data).__name__}, not an object; replace it."
    return None


def model_type_problem(path: Path) -> str | None:
    """Why transformers cannot tell the model class from config.json at `path`, or None."""
    if not path.is_file() or json_problem(path):
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    model_type = data.get("model_type")
    if not model_type:
        return (
            f"{path} has no `model_type` key, so transformers cannot tell which model class "
            'to build. Add it (e.g. "model_type": "llama"), or copy the folder again.'
        )
    from transformers import CONFIG_MAPPING, __version__

    if model_type not in CONFIG_MAPPING and not data.get("auto_map"):
        return (
            f"{path} names `model_type: {model_type}`, which transformers {__version__} does "
            "not know. Check the value, or upgrade transformers if the model is newer."
        )
    return None


def remote_code_error(key: str, value: str, loc: ModelLocation) -> ModelError:
    """The error for a model or tokenizer that needs its own Python code to load."""
    modules: list[str] = []
    if loc.is_local:
        for name in ("config.json", "tokenizer_config.json"):
            modules += _auto_map_modules(Path(loc.name_or_path) / name)
    where = f" ({', '.join(sorted(set(modules)))})" if modules else ""
    source = "model folder" if loc.is_local else "hub repository"
    return ModelError(
        f"`{key}: {value}` needs Python code that ships with the {source}{where}, and "
        "`trust_remote_code` is off. Set `trust_remote_code: true` in the config only if you "
        f"trust that code: transformers then imports and runs it from {value} with your "
        "permissions. Or use a model that transformers supports without it."
    )


def _auto_map_modules(path: Path) -> list[str]:
    """The `.py` files an `auto_map` in the JSON file at `path` points at."""
    if not path.is_file() or json_problem(path):
        return []
    auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {}
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if r]
    return [f"{str(r).split('--')[-1].rsplit('.', 1)[0]}.py" for r in refs]


def _first_line(exc: Exception) -> str:
    """The first line of an exception's message."""
    return str(exc).splitlines()[0] if str(exc) else ""


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
