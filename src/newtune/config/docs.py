"""Generate docs/config.md from the schema: `python -m newtune.config.docs > docs/config.md`."""

from __future__ import annotations

from pydantic import BaseModel

from newtune.config.keys import LEGACY_KEYS
from newtune.config.schema import DatasetEntry, status_of
from newtune.config.schema.adapter import AdapterSection
from newtune.config.schema.compat import CompatSection
from newtune.config.schema.compat2 import Compat2Section
from newtune.config.schema.compat3 import Compat3Section, DiffusionArgs
from newtune.config.schema.data import DataSection
from newtune.config.schema.distributed import DistributedSection
from newtune.config.schema.logging import LoggingSection
from newtune.config.schema.model import ModelSection
from newtune.config.schema.multimodal import MultimodalSection
from newtune.config.schema.online import EBFTBlock, OnlineSection, TRLBlock, VllmBlock
from newtune.config.schema.preference import PreferenceSection
from newtune.config.schema.pretraining import PretrainingEntry, PretrainingSection
from newtune.config.schema.seed_training import SeedTrainingSection
from newtune.config.schema.training import TrainingSection
from newtune.config.schema.unsupported import UnsupportedSection

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("Model, tokenizer, precision", ModelSection),
    ("Data", DataSection),
    ("Dataset entries (`datasets:` / `test_datasets:` items)", DatasetEntry),
    ("Adapter", AdapterSection),
    ("Training", TrainingSection),
    ("Preference and reward training", PreferenceSection),
    ("Online RL (`rl: ebft`)", OnlineSection),
    ("`ebft:` block (energy-based fine-tuning)", EBFTBlock),
    ("`trl:` block (TRL's GRPOTrainer)", TRLBlock),
    ("`vllm:` block", VllmBlock),
    (
        "Streamed data (`pretraining_dataset`, `streaming`) and prepared-data keys",
        PretrainingSection,
    ),
    ("`pretraining_dataset:` items", PretrainingEntry),
    ("ReLoRA, LoRA+, LISA, generation metrics during eval", SeedTrainingSection),
    ("Vision-language models", MultimodalSection),
    ("Distributed", DistributedSection),
    ("Tracking and hub", LoggingSection),
    ("Axolotl keys read as Axolotl does, and its legacy keys", CompatSection),
    ("Axolotl plugins, kernels, trackers and parallelism", Compat2Section),
    ("Axolotl data order, re-init, kernel patches and quantization configs", Compat3Section),
    ("`diffusion:` block (DiffusionPlugin: masked-diffusion training)", DiffusionArgs),
    ("Not implemented", UnsupportedSection),
]


def _default(info) -> str:  # noqa: ANN001
    if info.is_required():
        return "required"
    return "" if info.default is None else f"`{info.default!r}`"


def _rows(model: type[BaseModel]) -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        if model is not DatasetEntry and name not in model.__annotations__:
            continue  # inherited from another section
        meta = status_of(info)
        status = meta["status"] + (
            f"; instead: {meta['alternative']}" if "alternative" in meta else ""
        )
        rows.append(f"| `{name}` | {status} | {_default(info)} | {info.description or ''} |")
    return rows


def render() -> str:
    """The config reference as markdown."""
    lines = [
        "# Config reference",
        "",
        "Generated from the schema by `python -m newtune.config.docs > docs/config.md`; do not",
        "edit by hand (a test fails when it is stale). Keys have Axolotl's names and meanings.",
        "",
        "Status: **implemented** keys work now. **not implemented** keys are accepted when off",
        "(null, false or empty) and are an error with any other value; the error names an",
        "alternative where there is one. **ignored** keys are internal to Axolotl. A key newtune",
        "does not know is an error with a did-you-mean. `newtune config-schema` prints the JSON",
        "schema.",
        "",
    ]
    for title, model in SECTIONS:
        lines += [f"## {title}", "", "| key | status | default | meaning |", "|---|---|---|---|"]
        lines += [*_rows(model), ""]
    lines += [
        "## Legacy spellings",
        "",
        "Read with a deprecation note; setting both spellings to different values is an error.",
        "",
        "| legacy key | read as |",
        "|---|---|",
        *[
            f"| `{old}: true` | `{new.canonical}: {new.value}` |"
            if new.value is not None
            else f"| `{old}: X` | `{new.canonical}: X` |"
            for old, new in LEGACY_KEYS.items()
        ],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
