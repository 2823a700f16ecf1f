"""Generate docs/config.md from the schema: `python -m newtune.config.docs > docs/config.md`."""

from __future__ import annotations

from pydantic import BaseModel

from newtune.config.keys import NOOP_KEYS, NOT_IMPLEMENTED_DATASET_KEYS, NOT_IMPLEMENTED_KEYS
from newtune.config.schema import DatasetEntry, NewtuneConfig


def _rows(model: type[BaseModel]) -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        default = "required" if info.is_required() else f"`{info.default!r}`"
        rows.append(f"| `{name}` | {default} | {info.description or ''} |")
    return rows


def render() -> str:
    """The config reference as markdown."""
    lines = [
        "# Config reference",
        "",
        "Generated from the schema by `python -m newtune.config.docs`; do not edit by hand.",
        "Keys have Axolotl's names and meanings. A key newtune does not know is an error with a",
        "did-you-mean; an Axolotl key newtune does not implement yet is accepted only when its",
        "value asks for nothing (null, false, empty).",
        "",
        "## Top-level keys (implemented)",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
        *_rows(NewtuneConfig),
        "",
        "## Dataset entry keys (`datasets:` items, implemented)",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
        *_rows(DatasetEntry),
        "",
        "## Accepted and ignored",
        "",
        *[f"- `{k}`: {why}" for k, why in sorted(NOOP_KEYS.items())],
        "",
        "## Axolotl keys not implemented yet (null/false/empty only)",
        "",
        ", ".join(f"`{k}`" for k in sorted(NOT_IMPLEMENTED_KEYS)),
        "",
        "Dataset entry keys: " + ", ".join(f"`{k}`" for k in sorted(NOT_IMPLEMENTED_DATASET_KEYS)),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
