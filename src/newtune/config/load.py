"""Read a YAML config (local path or https URL), apply overrides and validate it.

Everything here is bounded: a config is at most 1 MiB, a download finishes within
`URL_TIMEOUT_S` in all, and the YAML may expand (aliases followed) to at most
`MAX_YAML_NODES` values nested at most `MAX_YAML_DEPTH` levels.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import ipaddress
import re
import threading
import time
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
from newtune.config.secrets import REDACTED, looks_secret, redact, scrub
from newtune.errors import ConfigError
from newtune.trust import code_refused

URL_TIMEOUT_S = 30.0  # the whole download of a remote config (connect, headers, body)
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # values after following aliases (`*name`): stops alias bombs
MAX_YAML_DEPTH = 100  # nesting levels after following aliases
DID_YOU_MEAN_CUTOFF = 0.75  # difflib ratio; lower values suggest unrelated keys
ALLOW_PLUGINS = "allow_plugins"  # a command-line flag beside the overrides, not a config key
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with where it came from and what was ignored."""

    config: NewtuneConfig
    source: str
    raw: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def is_url(source: str) -> bool:
    """True when a config source is an http(s) URL rather than a local path."""
    return source.startswith(("http://", "https://"))


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_allowed(url: str, loopback_http: bool) -> bool:
    """https, or http to a loopback host when `loopback_http` (the first URL was such)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "https":
        return True
    return parsed.scheme == "http" and loopback_http and _is_loopback(parsed.hostname)


class _SameRuleRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only when its target obeys the rule of the first URL."""

    def __init__(self, first: str, loopback_http: bool) -> None:
        super().__init__()
        self.first = first
        self.loopback_http = loopback_http

    def redirect_request(  # noqa: PLR0913 - urllib's signature
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        """Refuse a hop to plain http off loopback (or any http after https), or another scheme."""
        if not _url_allowed(newurl, self.loopback_http):
            allowed = (
                "https, or http to localhost/127.0.0.1/::1"
                if self.loopback_http
                else "https (the config URL is https)"
            )
            raise ConfigError(
                f"Refusing to download the config {self.first}: {req.full_url} redirects "
                f"(HTTP {code}) to {newurl}, and every redirect must be {allowed}. Use the final "
                "https URL, or download the file and pass its local path."
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, loopback_http: bool, deadline: float) -> bytes:
    """The body of `url` (at most MAX_CONFIG_BYTES + 1 bytes); TimeoutError past `deadline`."""
    opener = urllib.request.build_opener(_SameRuleRedirects(url, loopback_http))
    chunks: list[bytes] = []
    size = 0
    with opener.open(url, timeout=URL_TIMEOUT_S) as resp:
        while size <= MAX_CONFIG_BYTES:
            if time.monotonic() > deadline:
                raise TimeoutError("the download took too long")
            chunk = resp.read1(MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks)


def read_url(url: str) -> str:
    """Fetch a config over https (or http on loopback only): URL_TIMEOUT_S in all, <= 1 MiB."""
    parsed = urllib.parse.urlparse(url)
    loopback_http = parsed.scheme == "http" and _is_loopback(parsed.hostname)
    if not _url_allowed(url, loopback_http):
        raise ConfigError(
            f"Refusing to fetch the config over plain http from {parsed.hostname}: use an "
            "https:// URL (http is only allowed for localhost/127.0.0.1/::1)."
        )
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["body"] = _download(url, loopback_http, time.monotonic() + URL_TIMEOUT_S)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            outcome["error"] = exc

    # The whole download runs in a daemon thread so that no server (slow headers, one byte
    # every few seconds) can hold newtune longer than URL_TIMEOUT_S.
    worker = threading.Thread(target=work, name="newtune-config-download", daemon=True)
    worker.start()
    worker.join(URL_TIMEOUT_S)
    exc = outcome.get("error")
    if worker.is_alive() or isinstance(exc, TimeoutError):
        raise ConfigError(
            f"Could not download the config {url}: it did not arrive within {URL_TIMEOUT_S:g} s "
            "(the limit is on the whole download). Check the server, or download the file and "
            "pass its local path."
        )
    if isinstance(exc, urllib.error.HTTPError):
        raise ConfigError(
            f"Could not download the config {url}: the server answered HTTP {exc.code} "
            f"({exc.reason}). Check the URL."
        ) from exc
    if isinstance(exc, urllib.error.URLError | OSError):
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"Could not download the config {url}: {reason}. Check the URL and your network, "
            "or download the file and pass its local path."
        ) from exc
    if exc is not None:
        raise exc
    body: bytes = outcome["body"]
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
    if is_url(source):
        return read_url(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(
            f"Config file {source} does not exist. Pass the path of a YAML file "
            "(e.g. `newtune train examples/quickstart/config.yml`) or an https URL."
        )
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"Config file {source} is larger than 1 MiB; a config is a small YAML file. "
            "Pass the config, not a data file."
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"Config file {source} is not UTF-8 text (byte {exc.start}); save it as UTF-8."
        ) from exc


def _check_events(text: str, source: str) -> None:
    """Refuse YAML nested too deep or with too many values, before anything recursive reads it."""
    depth = values = 0
    try:
        for event in yaml.parse(text, Loader=_LOADER):
            if isinstance(event, yaml.NodeEvent):
                values += 1
                if values > MAX_YAML_NODES:
                    _too_many(source, event.start_mark.line + 1)
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    _too_deep(source, event.start_mark.line + 1)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError as exc:
        if "nesting depth" in str(exc):  # libyaml's own limit
            _too_deep(source, None)
        raise ConfigError(f"{source} is not valid YAML: {exc}. Fix the syntax there.") from None


def _too_deep(source: str, line: int | None) -> typing.NoReturn:
    where = f"{source}, line {line}" if line else source
    raise ConfigError(
        f"{where}: the YAML is nested more than {MAX_YAML_DEPTH} levels deep (counting what "
        "aliases insert); newtune refuses such input. A config needs a few levels: flatten it."
    )


def _too_many(source: str, line: int) -> typing.NoReturn:
    raise ConfigError(
        f"{source}, line {line}: the YAML has more than {MAX_YAML_NODES:,} values once its "
        f"aliases (`*name`) are followed; newtune refuses such input (a config may have at most "
        f"{MAX_YAML_NODES:,} values and 1 MiB). Write fewer values, or use fewer aliases."
    )


@dataclass
class _Measure:
    """One pass over the composed YAML graph: expanded size and depth, duplicate keys."""

    source: str
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (nodes, depth)
    open: set[int] = field(default_factory=set)

    def node(self, node: yaml.Node, path: str, level: int) -> tuple[int, int]:
        """(values, depth) of `node` with aliases followed; ConfigError past the limits."""
        if level > MAX_YAML_DEPTH:
            _too_deep(self.source, node.start_mark.line + 1)
        known = self.sizes.get(id(node))
        if known is not None:
            self._check(known, level, node)
            return known
        if id(node) in self.open:
            raise ConfigError(
                f"{self.source}, line {node.start_mark.line + 1}: an alias (`*name`) refers to "
                "a collection that contains it, so the YAML is recursive; a config cannot be."
            )
        self.open.add(id(node))
        children: list[tuple[yaml.Node, str]] = []
        if isinstance(node, yaml.MappingNode):
            self._duplicates(node, path)
            for key, value in node.value:
                sub = f"{path}.{key.value}" if path else str(key.value)
                children += [(key, sub), (value, sub)]
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        count, depth = 1, 1
        for child, sub in children:
            n, d = self.node(child, sub, level + 1)
            count, depth = count + n, max(depth, d + 1)
            self._check((count, depth), level, node)
        self.open.discard(id(node))
        self.sizes[id(node)] = (count, depth)
        return count, depth

    def _check(self, size: tuple[int, int], level: int, node: yaml.Node) -> None:
        if size[0] > MAX_YAML_NODES:
            _too_many(self.source, node.start_mark.line + 1)
        if level + size[1] - 1 > MAX_YAML_DEPTH:
            _too_deep(self.source, node.start_mark.line + 1)

    def _duplicates(self, node: yaml.MappingNode, path: str) -> None:
        """A key given twice in one mapping is an error naming both lines."""
        seen: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                continue
            line = key.start_mark.line + 1
            first = seen.get((key.tag, key.value))
            if first is not None:
                name = f"{path}.{key.value}" if path else str(key.value)
                raise ConfigError(
                    f"{self.source}: `{name}` is set twice in one mapping, on line {first} and "
                    f"line {line}; YAML would silently keep only the last. Keep one of them."
                )
            seen[(key.tag, key.value)] = line


def _compose(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """Parse YAML within the limits; return the data and its node graph (None when empty)."""
    _check_events(text, source)
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _Measure(source).node(node, "", 1)
        return loader.construct_document(node), node
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}. Fix the syntax there.") from None
    finally:
        loader.dispose()


def parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse YAML safely and within limits; return the mapping and the line of each key path."""
    data, node = _compose(text, source)
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


def parse_override_value(value: Any, key: str = "", flag: str = "") -> Any:
    """Interpret an override by the key's type: text for string keys, else as YAML/JSON would."""
    if _string_only(key) and value is not None and not isinstance(value, str | list | dict):
        return str(value)
    if isinstance(value, str) and not _string_only(key):
        if value == "":
            return None
        try:
            data, _ = _compose(value, f"--{flag or key}")
        except ConfigError as exc:
            if "is not valid YAML" in str(exc):
                return value
            raise
        return data
    return value


def _flag_path(dotted: str) -> str:
    """The key path (`datasets[0].path`) that an override `datasets.0.path` sets."""
    path = ""
    for part in dotted.replace("-", "_").split("."):
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `data` with `key=value` / `a.b=value` / `datasets.0.path=value` set.

    With `strict: true` (in the YAML or an override) only keys present in the YAML may change.
    """
    out = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    strict = parse_override_value(overrides.get("strict", data.get("strict")), "strict")
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
        target[last] = parse_override_value(value, parts[0] if len(parts) == 1 else "", dotted)
    return out


def _did_you_mean(key: str, known: list[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=DID_YOU_MEAN_CUTOFF)
    return f" (did you mean `{match[0]}`?)" if match else ""


_PARENT_RE = re.compile(r"(\.[^.]*|\[\d+\])$")  # `.key` (or `.list[str]`) or `[0]`


@dataclass(frozen=True)
class _Places:
    """Where a key path was given: a command-line flag, else a YAML line, else the source."""

    source: str
    lines: dict[str, int]
    flags: dict[str, str]  # key path an override set -> `--flag`

    def __call__(self, path: str) -> str:
        """`--flag` when an override set the path (or a parent of it); else `source, line N`."""
        step = path
        while step:
            if step in self.flags:
                return self.flags[step]
            parent = _PARENT_RE.sub("", step)
            step = "" if parent == step else parent
        line = self.lines.get(path)
        return f"{self.source}, line {line}" if line else self.source


def map_legacy(
    data: dict[str, Any], source: str, lines: dict[str, int], where: _Places | None = None
) -> tuple[dict, dict, list]:
    """Map legacy spellings onto canonical keys; return data, canonical->spelled names, notes."""
    where = where or _Places(source, lines, {})
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
                f"`{old}: {_shown(value, old)}` ({where(old)}) means "
                f"`{legacy.canonical}: {_shown(new_value, old)}`, but "
                f"`{legacy.canonical}: {_shown(current, legacy.canonical)}` is also set. "
                f"Keep only `{legacy.canonical}`."
            )
        out[legacy.canonical] = new_value
        spelled[legacy.canonical] = old
        notes.append(
            f"`{old}` is deprecated; read as `{legacy.canonical}: {new_value}` (write that instead)."
        )
    return out, spelled, notes


def check_keys(
    data: dict[str, Any], source: str, lines: dict[str, int], where: _Places | None = None
) -> None:
    """Raise one error listing every unknown key (top level and datasets) with a did-you-mean."""
    where = where or _Places(source, lines, {})
    known = sorted(set(NewtuneConfig.model_fields) | set(LEGACY_KEYS))
    problems = [
        f"unknown key `{key}` ({where(str(key))}){_did_you_mean(str(key), known)}"
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
                        f"unknown key `{path}` ({where(path)})"
                        f"{_did_you_mean(str(key), entry_known)}"
                    )
    if problems:
        raise ConfigError(
            f"{source} has {len(problems)} unknown key(s): " + "; ".join(problems) + ". "
            "Fix or remove these keys (docs/config.md lists every key newtune knows)."
        )


def _shown(value: Any, key: str, limit: int = 200) -> str:
    """How an error shows a value: its repr, or only its type when it may be a secret."""
    if looks_secret(value, key):
        return f"a {type(value).__name__}, not shown because it looks like a token or key"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def format_validation_error(
    exc: ValidationError, source: str, lines: dict[str, int], where: _Places | None = None
) -> ConfigError:
    """Rewrite pydantic's errors so that each names the key path and its line (or flag).

    Values that may be secrets are not echoed: the error shows their key and type.
    """
    where = where or _Places(source, lines, {})
    parts = []
    for err in exc.errors():
        path = ""
        for loc in err["loc"]:
            path += f"[{loc}]" if isinstance(loc, int) else (f".{loc}" if path else str(loc))
        if err["type"] == "missing":
            parts.append(f"`{path}` is required but missing ({source})")
            continue
        value = err.get("input")
        msg = scrub(err["msg"])
        if isinstance(value, str) and value and looks_secret(value, path):
            msg = msg.replace(value, REDACTED)
        parts.append(f"`{path}` ({where(path)}): {msg} (got {_shown(value, path)})")
    return ConfigError(
        f"{source} is not a valid newtune config: " + "; ".join(parts) + ". "
        "Fix these values and run `newtune validate` again."
    )


def _allow_flag(overrides: dict[str, Any], allow_plugins: bool) -> bool:
    """The `--allow_plugins` flag (taken out of `overrides`) or the argument."""
    flag = overrides.pop(ALLOW_PLUGINS, None)
    if flag is None:
        return allow_plugins
    if not isinstance(flag, bool):
        raise ConfigError(
            f"--{ALLOW_PLUGINS} is a flag and takes no value (got {_shown(flag, '')}); "
            f"write `--{ALLOW_PLUGINS}` to let a config from a URL import code."
        )
    return flag or allow_plugins


def _refusal(source: str, allow_plugins: bool) -> str | None:
    """Why code may not be imported for this config (None: it may)."""
    if allow_plugins or not is_url(source):
        return None
    return (
        f"this config came from a URL ({source}), and a config from a URL may not make newtune "
        f"import or run code unless you allow it: pass --{ALLOW_PLUGINS} on the command line "
        f"(`{ALLOW_PLUGINS}=True` in Python) if you trust it, or use a local copy"
    )


def validate_data(
    data: dict[str, Any],
    source: str,
    lines: dict[str, int] | None = None,
    overrides: dict[str, Any] | None = None,
    allow_plugins: bool = False,
) -> LoadedConfig:
    """Override, key-check, validate and rule-check config data (a YAML file's or a dict).

    A config from a URL may not import code (plugin formats, remote model code) unless
    `allow_plugins` (or the `--allow_plugins` flag among `overrides`) says so.
    """
    overrides = dict(overrides or {})
    refusal = _refusal(source, _allow_flag(overrides, allow_plugins))
    where = _Places(source, lines or {}, {_flag_path(k): f"--{k}" for k in overrides})
    try:
        with code_refused(refusal):
            return _validate(data, source, where, overrides, refusal)
    except ConfigError as exc:
        clean = scrub(str(exc))
        if clean != str(exc):
            raise ConfigError(clean) from None
        raise


def _code_problems(config: NewtuneConfig, where: _Places, refusal: str) -> list[str]:
    """One problem naming the keys that would import or run code (refused: config from a URL)."""
    from newtune.config.schema.formats import is_plugin

    found = []
    for key in ("datasets", "test_datasets"):
        for i, entry in enumerate(getattr(config, key) or []):
            path = f"{key}[{i}].type"
            if isinstance(entry.type, str) and is_plugin(entry.type):
                found.append(
                    f"`{path}: {entry.type}` ({where(path)}) names a plugin format, whose code "
                    "would be imported and run"
                )
    if config.trust_remote_code:
        found.append(
            f"`trust_remote_code: true` ({where('trust_remote_code')}) would run code from the "
            "model's repository"
        )
    return [f"{', and '.join(found)}; but {refusal}"] if found else []


def _validate(
    data: dict[str, Any],
    source: str,
    where: _Places,
    overrides: dict[str, Any],
    refusal: str | None,
) -> LoadedConfig:
    data = apply_overrides(data, overrides)
    data, spelled, notes = map_legacy(data, source, where.lines, where)
    check_keys(data, source, where.lines, where)
    try:
        config = NewtuneConfig.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, source, where.lines, where) from None
    findings = check_rules(config, lambda key: spelled.get(key, key))
    problems = findings.errors + check_unimplemented(config)
    if refusal is not None:
        problems = _code_problems(config, where, refusal) + problems
    if problems:
        raise ConfigError(f"{source} asks for what newtune cannot do: " + "; ".join(problems) + ".")
    notes += [f"warning: {w}." for w in findings.warnings] + ignored_keys(config)
    return LoadedConfig(config=config, source=source, raw=data, notes=notes)


def load_config(
    source: str, overrides: dict[str, Any] | None = None, allow_plugins: bool = False
) -> LoadedConfig:
    """Read, override, key-check, validate and rule-check a config; raise ConfigError.

    `allow_plugins` (also `overrides["allow_plugins"]`, the CLI's `--allow_plugins`) lets a
    config from a URL import code; a local config may always.
    """
    text = read_text(str(source))
    data, lines = parse_yaml(text, str(source))
    return validate_data(data, str(source), lines, overrides, allow_plugins)


def dump_config(config: NewtuneConfig) -> str:
    """The YAML saved as `output_dir/newtune_config.yml`: the keys the run set, secrets redacted.

    It validates and reproduces the run: `load_config` on it gives the same config.
    """
    data = redact(config.model_dump(mode="json", exclude_unset=True))
    try:
        version = importlib.metadata.version("newtune")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return (
        f"# The config of this run (newtune {version}); keys not listed take their defaults.\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
