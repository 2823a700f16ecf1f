"""Census of Axolotl's example configs: how many does newtune validate, and why not the rest.

Run from the repository root with the venv active, on an Axolotl checkout (not copied here):

    python benchmarks/axolotl_census.py PATH [--json] [--verbose] [--drop-unknown]

Finds every training config under PATH/examples, validates each in-process exactly as
`newtune validate` does (`load_config`, then `resolve` with a fixed GPU probe, so the result does
not depend on this machine), with every network connection refused, and prints the total, how
many validate, and the refusal reasons grouped and sorted by count. A crash (any exception that
is not a NewtuneError) is its own category, named by the exception type.

--drop-unknown adds a second table: what refuses each config once the keys newtune does not know
are removed from it (the reasons that the unknown-key error hides), over all configs, and a
greedy fix order: which reason to lift first to make the most configs validate. A refusal at one
stage (unknown keys, then types, then cross-key rules) hides the next, so these are lower bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from newtune.config.keys import LEGACY_KEYS
from newtune.config.load import (
    apply_overrides,
    load_config,
    map_legacy,
    parse_yaml,
    read_text,
    validate_data,
)
from newtune.config.resolve import resolve
from newtune.config.rules import check_rules, check_unimplemented
from newtune.config.schema import DatasetEntry, NewtuneConfig
from newtune.errors import ConfigError, NewtuneError

RULE = (
    "a training config is a *.yml/*.yaml file under PATH/examples whose top level is a YAML "
    "mapping with a `base_model` key (accelerate, deepspeed, cloud and other launcher files "
    "have none); a file that does not parse as YAML counts when a line starts with `base_model:`"
)
NOT_IMPLEMENTED = re.compile(r"^`([^`:]+):.*` is not implemented by newtune")
REFUSED_KEY = re.compile(r"^`([^`:]+): .*`: `([^`:]+)` ")  # schema/compat.py's refused(...) keys
GPU_PROBE: Callable[[], tuple[str, bool]] = lambda: ("cuda", True)  # noqa: E731


class NetworkAttempt(AssertionError):
    """Raised when validation tries to open a network connection."""


@dataclass
class Outcome:
    """One config's result: valid, refused (NewtuneError) or crash, with grouped reasons."""

    path: str
    status: str
    reasons: list[str] = field(default_factory=list)
    message: str = ""
    hidden: list[str] = field(default_factory=list)


@contextmanager
def no_network(attempts: list[str]) -> Iterator[None]:
    """Refuse every connection and name lookup (as tests/test_examples.py does); record them."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        target = args[1] if len(args) > 1 else (args[0] if args else kwargs)
        attempts.append(repr(target))
        raise NetworkAttempt(f"validation tried to open a connection: {target!r}")

    saved = (socket.socket.connect, socket.create_connection, socket.getaddrinfo)
    offline = os.environ.pop("HF_HUB_OFFLINE", None)  # an offline flag must not hide a call
    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
    socket.getaddrinfo = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.socket.connect, socket.create_connection, socket.getaddrinfo = saved  # type: ignore[method-assign,assignment]
        if offline is not None:
            os.environ["HF_HUB_OFFLINE"] = offline


def is_training_config(path: Path) -> bool:
    """Apply RULE to one file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return re.search(r"(?m)^base_model:", text) is not None
    return isinstance(data, dict) and "base_model" in data


def find_configs(root: Path) -> list[Path]:
    """Every training config under root/examples, sorted."""
    files = [p for ext in ("*.yml", "*.yaml") for p in (root / "examples").rglob(ext)]
    return sorted(p for p in files if p.is_file() and is_training_config(p))


def _norm_path(path: str) -> str:
    """`datasets[3].type` -> `datasets[].type`, so one reason counts once per key."""
    return re.sub(r"\[\d+\]", "[]", path)


def _first_clause(text: str) -> str:
    """Text up to the first `.`, `;` or `:` followed by a space, outside backticks."""
    quoted = False
    for i, ch in enumerate(text):
        if ch == "`":
            quoted = not quoted
        elif not quoted and ch in ".;:" and text[i + 1 : i + 2] in (" ", "\n"):
            return text[:i]
    return text.rstrip(".;:")


def first_sentence(message: str, source: str) -> str:
    """The first clause of a message, with the file name and line numbers taken out."""
    text = message.replace(source, "<file>")
    text = re.sub(r" \(<file>(, line \d+)?\)", "", text)
    text = re.sub(r"<file>(, line \d+)?", "<file>", text)
    return _first_clause(_norm_path(text))


def classify_problem(problem: str, source: str) -> list[str]:
    """One rule/not-implemented problem -> its group(s)."""
    found = NOT_IMPLEMENTED.match(problem)
    if found:
        return [f"not implemented key `{_norm_path(found.group(1))}`"]
    found = REFUSED_KEY.match(problem)
    if found and found.group(1) == found.group(2):
        return [f"refused key `{_norm_path(found.group(1))}` (reason given)"]
    plugins = re.match(r"^`plugins`: (.*) are Axolotl plugins newtune does not run", problem)
    if plugins:
        names = [p.strip().rsplit(".", 1)[-1] for p in plugins.group(1).split(",")]
        return [f"plugin `{n}` is an Axolotl plugin newtune does not run" for n in names]
    text = first_sentence(problem, source)
    text = re.sub(r"(`liger_\w+`, )*`liger_\w+`", "`liger_*` keys", text)
    return [re.sub(r"`([\w.\[\]]+): -?[\d.e+-]+`", r"`\1: <number>`", text)]


def rule_problems(data: dict[str, Any], source: str, lines: dict[str, int]) -> list[str]:
    """Re-run the rule stage of validate_data to get its problems one by one."""
    data, spelled, _ = map_legacy(apply_overrides(data, {}), source, lines)
    config = NewtuneConfig.model_validate(data)
    findings = check_rules(config, lambda key: spelled.get(key, key))
    return findings.errors + check_unimplemented(config)


def explain(exc: ConfigError, source: str, data: dict[str, Any] | None = None) -> list[str]:
    """Split a refusal of `data` (default: the file's) into reasons, one per key or rule."""
    message = str(exc)
    if "unknown key(s): " in message:
        keys = re.findall(r"unknown key `([^`]+)`", message)
        return [f"unknown key `{_norm_path(k)}`" for k in keys]
    context = exc.__context__
    if isinstance(context, ValidationError):
        out = []
        for err in context.errors():
            path = _norm_path(
                "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
            )
            if err["type"] == "missing" and "`pretraining_dataset` (" in message:
                out.append("`pretraining_dataset` (instead of `datasets`) is not implemented")
            elif err["type"] == "missing":
                out.append(f"`{path}` is required")
            else:
                out.append(f"invalid `{path}`: {err['msg']}")
        return out
    if "asks for what newtune cannot do: " in message:
        try:
            parsed, lines = parse_yaml(read_text(source), source)
            problems = rule_problems(parsed if data is None else data, source, lines)
            return [r for p in problems for r in classify_problem(p, source)]
        except Exception:  # noqa: BLE001 - fall back to the message itself
            pass
    return [first_sentence(message, source)]


def drop_unknown(data: dict[str, Any]) -> dict[str, Any]:
    """The config without the keys newtune does not know (top level and dataset entries)."""
    known = set(NewtuneConfig.model_fields) | set(LEGACY_KEYS)
    out = {k: v for k, v in data.items() if k in known}
    for list_key in ("datasets", "test_datasets"):
        entries = out.get(list_key)
        if isinstance(entries, list):
            out[list_key] = [
                {k: v for k, v in e.items() if k in DatasetEntry.model_fields}
                if isinstance(e, dict)
                else e
                for e in entries
            ]
    return out


def hidden_reasons(source: str) -> list[str]:
    """What refuses the config once its unknown keys are removed ([] when it then validates)."""
    data, lines = parse_yaml(read_text(source), source)
    cleaned = drop_unknown(data)
    try:
        loaded = validate_data(cleaned, source, lines)
        resolve(loaded.config, env={}, probe=GPU_PROBE)
    except ConfigError as exc:
        return explain(exc, source, cleaned)
    except NewtuneError as exc:
        return [f"{type(exc).__name__}: {first_sentence(str(exc), source)}"]
    except Exception as exc:  # noqa: BLE001
        return [f"crash: {type(exc).__name__}"]
    return []


def census_one(path: Path, with_hidden: bool) -> Outcome:
    """Validate one config as `newtune validate` does; never raise."""
    source = str(path)
    attempts: list[str] = []
    with no_network(attempts):
        try:
            loaded = load_config(source)
            resolve(loaded.config, env={}, probe=GPU_PROBE)
            outcome = Outcome(source, "valid")
        except ConfigError as exc:
            outcome = Outcome(source, "refused", explain(exc, source), str(exc))
        except NewtuneError as exc:
            reason = f"{type(exc).__name__}: {first_sentence(str(exc), source)}"
            outcome = Outcome(source, "refused", [reason], str(exc))
        except Exception as exc:  # noqa: BLE001 - a crash is a finding, not the end of the census
            outcome = Outcome(source, "crash", [f"crash: {type(exc).__name__}"], repr(exc))
        if with_hidden and outcome.reasons and outcome.reasons[0].startswith("unknown key"):
            outcome.hidden = hidden_reasons(source)
        elif with_hidden:
            outcome.hidden = list(outcome.reasons)
    if attempts:
        outcome.reasons.append(f"network attempt during validation ({len(attempts)} calls)")
        if outcome.status == "valid":
            outcome.status = "refused"
    return outcome


def tally(outcomes: list[Outcome], attr: str) -> list[tuple[str, int]]:
    """Reason -> number of configs it appears in (each config counts once per reason)."""
    counts: Counter[str] = Counter()
    for o in outcomes:
        counts.update(set(getattr(o, attr)))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def fix_order(outcomes: list[Outcome]) -> list[tuple[str, int, int]]:
    """Greedy order of blockers: (reason, configs carrying it, configs valid once it and all above go).

    A config's blockers are its unknown keys plus what refuses it once they are removed; each
    step takes the reason that makes the most configs valid (ties: the most carried).
    """
    left = [{r for r in o.reasons if r.startswith("unknown key")} | set(o.hidden) for o in outcomes]
    order = []
    while any(left):
        carried = Counter(r for blockers in left for r in blockers)
        best = max(carried, key=lambda r: (sum(1 for b in left if b and b <= {r}), carried[r], r))
        for blockers in left:
            blockers.discard(best)
        order.append((best, carried[best], sum(not b for b in left)))
    return order


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the census, print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="root of an Axolotl checkout (holds examples/)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--verbose", action="store_true", help="list every file and its outcome")
    parser.add_argument(
        "--drop-unknown", action="store_true", help="also tally what refuses once unknown keys go"
    )
    args = parser.parse_args(argv)
    if not (args.path / "examples").is_dir():
        print(
            f"{args.path}/examples is not a directory; pass an Axolotl checkout.", file=sys.stderr
        )
        return 2
    start = time.perf_counter()
    configs = find_configs(args.path)
    outcomes = [census_one(p, args.drop_unknown) for p in configs]
    seconds = time.perf_counter() - start
    for o in outcomes:
        o.path = str(Path(o.path).relative_to(args.path))
    valid = sum(o.status == "valid" for o in outcomes)
    crashes = sum(o.status == "crash" for o in outcomes)
    reasons = tally(outcomes, "reasons")
    unknown = sorted({r for o in outcomes for r in o.reasons if r.startswith("unknown key")})
    report: dict[str, Any] = {
        "rule": RULE,
        "total": len(outcomes),
        "valid": valid,
        "refused": len(outcomes) - valid - crashes,
        "crashed": crashes,
        "distinct_unknown_keys": len(unknown),
        "configs_with_unknown_keys": sum(
            any(r.startswith("unknown key") for r in o.reasons) for o in outcomes
        ),
        "seconds": round(seconds, 2),
        "reasons": [{"reason": r, "configs": n} for r, n in reasons],
    }
    if args.drop_unknown:
        report["hidden_reasons"] = [
            {"reason": r, "configs": n} for r, n in tally(outcomes, "hidden")
        ]
        report["valid_once_unknown_keys_go"] = sum(not o.hidden for o in outcomes)
        report["fix_order"] = [
            {"reason": r, "configs": n, "valid_after": v} for r, n, v in fix_order(outcomes)
        ]
    if args.verbose or args.json:
        report["files"] = [
            {"path": o.path, "status": o.status, "reasons": o.reasons}
            | ({"hidden": o.hidden} if args.drop_unknown else {})
            for o in outcomes
        ]
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    print(f"rule: {RULE}")
    print(
        f"{report['total']} training configs: {valid} validate, {report['refused']} refused, "
        f"{crashes} crashed ({seconds:.1f} s)"
    )
    print(
        f"{report['configs_with_unknown_keys']} configs carry unknown keys "
        f"({report['distinct_unknown_keys']} distinct)"
    )
    print("\nconfigs  refusal reason")
    for reason, n in reasons:
        print(f"{n:7d}  {reason}")
    if args.drop_unknown:
        print(
            "\nonce the unknown keys go (each config revalidated without the keys newtune does not "
            f"know; {report['valid_once_unknown_keys_go']} would then validate):"
        )
        for row in report["hidden_reasons"]:
            print(f"{row['configs']:7d}  {row['reason']}")
        print(
            "\nfix order (greedy; `valid after` counts configs with no blocker left once this "
            "reason and those above are gone)\nconfigs  valid after  reason"
        )
        for row in report["fix_order"]:
            print(f"{row['configs']:7d}  {row['valid_after']:11d}  {row['reason']}")
    if args.verbose:
        print("\nfiles")
        for o in outcomes:
            print(f"{o.status:8s} {o.path}")
            for r in o.reasons:
                print(f"           - {r}")
            for r in o.hidden:
                if r not in o.reasons:
                    print(f"           + behind: {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
