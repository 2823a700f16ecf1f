"""Read a YAML config (local path or https URL), apply overrides and validate it."""

from __future__ import annotations

import difflib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from newtune.config.keys import (
    FALSE_IS_A_CHOICE,
    NOOP_KEYS,
    NOT_IMPLEMENTED_DATASET_KEYS,
    NOT_IMPLEMENTED_KEYS,
    is_off,
)
from newtune.config.schema import DatasetEntry, NewtuneConfig
from newtune.errors import ConfigError

URL_TIMEOUT_S = 30


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with where it came from and what was ignored."""

    config: NewtuneConfig
    source: str
    raw: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def read_text(source: str) -> str:
    """Return the text of a config given as a local path or an http(s) URL."""
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=URL_TIMEOUT_S) as resp:
                return resp.read().decode("utf-8")
        except (urllib.error.URLError, TimeoutError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"Could not download the config {source}: {exc}. Check the URL, or download "
                "the file and pass its local path."
            ) from exc
    path = Path(source)
    if not path.is_file():
        raise ConfigError(
            f"Config file {source} does not exist. Pass the path of a YAML file "
            "(e.g. `newtune train examples/quickstart/config.yml`) or an https URL."
        )
    return path.read_text(encoding="utf-8")


def parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse YAML with safe_load; return the mapping and the line of each key path."""
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}. Fix the syntax there.") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source} must be a YAML mapping of keys to values (`base_model: ...`), "
            f"but its top level is a {type(data).__name__}."
        )
    lines: dict[str, int] = {}
    _collect_lines(node, "", lines)
    return data, lines


def _collect_lines(node: yaml.Node | None, prefix: str, lines: dict[str, int]) -> None:
    """Record the 1-based line of every mapping key, keyed like `datasets[0].type`."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[path] = key_node.start_mark.line + 1
            _collect_lines(value_node, path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            lines[path] = item.start_mark.line + 1
            _collect_lines(item, path, lines)


def parse_override_value(value: Any) -> Any:
    """Interpret an override the way YAML would (`true`, `1e-4`, `[a, b]`)."""
    if isinstance(value, str):
        try:
            return yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `data` with `key=value` / `a.b=value` / `datasets.0.path=value` set."""
    out = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for dotted, value in overrides.items():
        parts = dotted.replace("-", "_").split(".")
        target: Any = out
        for i, part in enumerate(parts[:-1]):
            key: Any = int(part) if isinstance(target, list) else part
            try:
                target = target[key]
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                path = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"Override --{dotted}: `{path}` does not exist in the config, so "
                    f"`{dotted}` cannot be set. Add it to the YAML first."
                ) from exc
        last: Any = parts[-1]
        if isinstance(target, list):
            if not last.isdigit() or int(last) >= len(target):
                raise ConfigError(f"Override --{dotted}: index {last} is not in the list.")
            last = int(last)
        elif not isinstance(target, dict):
            raise ConfigError(f"Override --{dotted}: its parent is not a mapping.")
        target[last] = parse_override_value(value)
    return out


def _did_you_mean(key: str, known: list[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _where(source: str, lines: dict[str, int], path: str) -> str:
    line = lines.get(path)
    return f"{source}, line {line}" if line else source


def check_keys(data: dict[str, Any], source: str, lines: dict[str, int]) -> tuple[dict, list]:
    """Drop no-op and off-valued unimplemented keys; raise on unknown or unhonoured ones."""
    known = sorted(set(NewtuneConfig.model_fields) | NOT_IMPLEMENTED_KEYS | set(NOOP_KEYS))
    problems: list[str] = []
    notes: list[str] = []
    clean: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        where = _where(source, lines, key)
        if key in NewtuneConfig.model_fields:
            clean[key] = value
        elif key in NOOP_KEYS:
            notes.append(f"`{key}` is ignored: {NOOP_KEYS[key]}.")
        elif key in NOT_IMPLEMENTED_KEYS:
            if is_off(value) and not (value is False and key in FALSE_IS_A_CHOICE):
                continue
            problems.append(
                f"`{key}: {value!r}` ({where}) is an Axolotl key newtune does not implement "
                "yet; remove it or set it to null."
            )
        else:
            problems.append(f"unknown key `{key}` ({where}){_did_you_mean(key, known)}")
    entries = clean.get("datasets")
    if isinstance(entries, list):
        clean["datasets"] = [
            _check_entry(e, i, source, lines, problems) for i, e in enumerate(entries)
        ]
    if problems:
        raise ConfigError(
            f"{source} has {len(problems)} problem(s): " + "; ".join(problems) + ". "
            "Fix or remove these keys (see docs/config.md for every key newtune knows)."
        )
    return clean, notes


def _check_entry(entry: Any, i: int, source: str, lines: dict[str, int], problems: list) -> Any:
    """Check the keys of one `datasets:` entry the same way as top-level keys."""
    if not isinstance(entry, dict):
        return entry
    known = sorted(set(DatasetEntry.model_fields) | NOT_IMPLEMENTED_DATASET_KEYS)
    clean = {}
    for key, value in entry.items():
        path = f"datasets[{i}].{key}"
        where = _where(source, lines, path)
        if key in DatasetEntry.model_fields:
            clean[key] = value
        elif key in NOT_IMPLEMENTED_DATASET_KEYS:
            if not is_off(value):
                problems.append(
                    f"`{path}: {value!r}` ({where}) is an Axolotl dataset key newtune does "
                    "not implement yet; remove it or set it to null"
                )
        else:
            problems.append(f"unknown key `{path}` ({where}){_did_you_mean(str(key), known)}")
    return clean


def format_validation_error(
    exc: ValidationError, source: str, lines: dict[str, int]
) -> ConfigError:
    """Rewrite pydantic's errors so that each names the YAML key path and its line."""
    parts = []
    for err in exc.errors():
        path = ""
        for loc in err["loc"]:
            path += f"[{loc}]" if isinstance(loc, int) else (f".{loc}" if path else str(loc))
        where = _where(source, lines, path)
        got = f" (got {err['input']!r})" if err["type"] != "missing" else ""
        if err["type"] == "missing":
            parts.append(f"`{path}` is required but missing ({source})")
        else:
            parts.append(f"`{path}` ({where}): {err['msg']}{got}")
    return ConfigError(
        f"{source} is not a valid newtune config: " + "; ".join(parts) + ". "
        "Fix these values and run `newtune validate` again."
    )


def load_config(source: str, overrides: dict[str, Any] | None = None) -> LoadedConfig:
    """Read, override, key-check and validate a config; raise ConfigError on any problem."""
    text = read_text(str(source))
    data, lines = parse_yaml(text, str(source))
    data = apply_overrides(data, overrides or {})
    clean, notes = check_keys(data, str(source), lines)
    try:
        config = NewtuneConfig.model_validate(clean)
    except ValidationError as exc:
        raise format_validation_error(exc, str(source), lines) from None
    return LoadedConfig(config=config, source=str(source), raw=data, notes=notes)
