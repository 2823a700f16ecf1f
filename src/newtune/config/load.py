"""Read a YAML config (local path or https URL), apply overrides and validate it."""

from __future__ import annotations

import difflib
import ipaddress
import typing
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from newtune.config.keys import LEGACY_KEYS, is_off
from newtune.config.rules import check_rules, check_unimplemented, ignored_keys
from newtune.config.schema import DatasetEntry, NewtuneConfig
from newtune.errors import ConfigError

URL_TIMEOUT_S = 30
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with where it came from and what was ignored."""

    config: NewtuneConfig
    source: str
    raw: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_url(url: str) -> str:
    """Fetch a config over https (or http on loopback only): 30 s timeout, at most 1 MiB."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "http" and not _is_loopback(parsed.hostname):
        raise ConfigError(
            f"Refusing to fetch the config over plain http from {parsed.hostname}: use an "
            "https:// URL (http is only allowed for localhost/127.0.0.1/::1)."
        )
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as resp:
            body = resp.read(MAX_CONFIG_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise ConfigError(
            f"Could not download the config {url}: the server answered HTTP {exc.code} "
            f"({exc.reason}). Check the URL."
        ) from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"Could not download the config {url}: {reason}. Check the URL and your network, "
            "or download the file and pass its local path."
        ) from exc
    if len(body) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"The config at {url} is larger than 1 MiB; a config is a small YAML file."
        )
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"The config at {url} is not UTF-8 text.") from exc


def read_text(source: str) -> str:
    """Return the text of a config given as a local path or an http(s) URL."""
    if source.startswith(("http://", "https://")):
        return read_url(source)
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


def _string_only(key: str) -> bool:
    """True when the top-level field `key` accepts only strings (so `--key=123` stays text)."""
    info = NewtuneConfig.model_fields.get(key)
    if info is None:
        return False
    args = typing.get_args(info.annotation) or (info.annotation,)
    return all(a is str or a is type(None) for a in args)


def parse_override_value(value: Any, key: str = "") -> Any:
    """Interpret an override by the key's type: text for string keys, else as YAML/JSON would."""
    if _string_only(key) and value is not None and not isinstance(value, str | list | dict):
        return str(value)
    if isinstance(value, str) and not _string_only(key):
        try:
            return yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `data` with `key=value` / `a.b=value` / `datasets.0.path=value` set.

    With `strict: true` (in the YAML or an override) only keys present in the YAML may change.
    """
    out = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    strict = parse_override_value(overrides.get("strict", data.get("strict")))
    for dotted, value in overrides.items():
        parts = dotted.replace("-", "_").split(".")
        if strict is True and parts[0] not in data and parts[0] != "strict":
            raise ConfigError(
                f"Override --{dotted}: `strict: true` allows overrides only of keys present in "
                f"the YAML, and `{parts[0]}` is not there. Add it to the YAML or drop `strict`."
            )
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
        target[last] = parse_override_value(value, parts[0] if len(parts) == 1 else "")
    return out


def _did_you_mean(key: str, known: list[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _where(source: str, lines: dict[str, int], path: str) -> str:
    line = lines.get(path)
    return f"{source}, line {line}" if line else source


def map_legacy(data: dict[str, Any], source: str, lines: dict[str, int]) -> tuple[dict, dict, list]:
    """Map legacy spellings onto canonical keys; return data, canonical->spelled names, notes."""
    out = dict(data)
    spelled: dict[str, str] = {}
    notes: list[str] = []
    for old, legacy in LEGACY_KEYS.items():
        if old not in out:
            continue
        value = out.pop(old)
        if is_off(value):
            continue
        new_value = value if legacy.value is None else legacy.value
        current = out.get(legacy.canonical)
        if current is not None and current != new_value:
            raise ConfigError(
                f"`{old}: {value!r}` ({_where(source, lines, old)}) means "
                f"`{legacy.canonical}: {new_value!r}`, but `{legacy.canonical}: {current!r}` is "
                f"also set. Keep only `{legacy.canonical}`."
            )
        out[legacy.canonical] = new_value
        spelled[legacy.canonical] = old
        notes.append(
            f"`{old}` is deprecated; read as `{legacy.canonical}: {new_value}` (write that instead)."
        )
    return out, spelled, notes


def check_keys(data: dict[str, Any], source: str, lines: dict[str, int]) -> None:
    """Raise one error listing every unknown key (top level and datasets) with a did-you-mean."""
    known = sorted(set(NewtuneConfig.model_fields) | set(LEGACY_KEYS))
    problems = [
        f"unknown key `{key}` ({_where(source, lines, str(key))}){_did_you_mean(str(key), known)}"
        for key in data
        if key not in NewtuneConfig.model_fields
    ]
    entry_known = sorted(DatasetEntry.model_fields)
    for list_key in ("datasets", "test_datasets"):
        entries = data.get(list_key)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            for key in entry if isinstance(entry, dict) else []:
                if key not in DatasetEntry.model_fields:
                    path = f"{list_key}[{i}].{key}"
                    problems.append(
                        f"unknown key `{path}` ({_where(source, lines, path)})"
                        f"{_did_you_mean(str(key), entry_known)}"
                    )
    if problems:
        raise ConfigError(
            f"{source} has {len(problems)} unknown key(s): " + "; ".join(problems) + ". "
            "Fix or remove these keys (docs/config.md lists every key newtune knows)."
        )


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


def validate_data(
    data: dict[str, Any],
    source: str,
    lines: dict[str, int] | None = None,
    overrides: dict[str, Any] | None = None,
) -> LoadedConfig:
    """Override, key-check, validate and rule-check config data (a YAML file's or a dict)."""
    lines = lines or {}
    data = apply_overrides(data, overrides or {})
    data, spelled, notes = map_legacy(data, source, lines)
    check_keys(data, source, lines)
    try:
        config = NewtuneConfig.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, source, lines) from None
    findings = check_rules(config, lambda key: spelled.get(key, key))
    problems = findings.errors + check_unimplemented(config)
    if problems:
        raise ConfigError(f"{source} asks for what newtune cannot do: " + "; ".join(problems) + ".")
    notes += [f"warning: {w}." for w in findings.warnings] + ignored_keys(config)
    return LoadedConfig(config=config, source=source, raw=data, notes=notes)


def load_config(source: str, overrides: dict[str, Any] | None = None) -> LoadedConfig:
    """Read, override, key-check, validate and rule-check a config; raise ConfigError."""
    text = read_text(str(source))
    data, lines = parse_yaml(text, str(source))
    return validate_data(data, str(source), lines, overrides)
