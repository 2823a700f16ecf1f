"""Prepared rows of a multimodal config: messages with image references, not tokens.

Image rows are tokenized, and their pixels made, in the collator (`data.vision.VisionCollator`)
whether or not `skip_prepare_dataset` is set: the processor's image expansion is part of
tokenizing, so doing it once per batch is the one exact place. Preprocess caches each row's
messages (image parts carry their reference: a path, URL, or the image itself as a base64
data URI), its per-message train flags, its origin (`data.jsonl row 3`), the folder
relative image paths are read from, and its dataset entry's `roles_to_train`/`train_on_eos`
(the collator masks each row by its own entry's keys); it checks every image opens unless
`skip_prepare_dataset: true`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import datasets

from newtune.config.schema import DatasetEntry, NewtuneConfig
from newtune.data.images import load_image
from newtune.data.sources import load_rows, local_files
from newtune.data.strategies.chat_template import ChatTemplate
from newtune.data.vision import BASE_DIR_KEY, IMAGE_KEYS, MASK_KEY, ORIGIN_KEY, attach_images
from newtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGES_COLUMN = "images"  # TRL's vision format: images that fill `{type: image}` parts
COLUMNS = ("messages", "train", "origin", "base_dir", "mask")


def _json_ref(ref: Any) -> Any:
    """An image reference that JSON can hold: strings as they are, images as data URIs."""
    if isinstance(ref, str):
        return ref
    if isinstance(ref, dict) and not ref.get("bytes") and ref.get("path"):
        return str(ref["path"])
    data = ref.get("bytes") if isinstance(ref, dict) else ref
    if isinstance(data, bytes | bytearray):
        payload = bytes(data)
    elif hasattr(data, "save"):  # a PIL image (a decoded datasets.Image value)
        buf = io.BytesIO()
        data.save(buf, format="PNG")
        payload = buf.getvalue()
    else:
        return ref  # load_image names what is wrong with it
    return "data:image/png;base64," + base64.b64encode(payload).decode()


def _image_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        p
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") in ("image", "image_url")
    ]


def vision_rows(
    where: str,
    entry: DatasetEntry,
    index: int,
    key: str,
    strategy: Any,
    config: NewtuneConfig,
) -> tuple[datasets.Dataset, int]:
    """The cached rows of one dataset entry, and how many images they hold."""
    if not isinstance(strategy, ChatTemplate):
        raise ConfigError(
            f"`{where}.type: {entry.type}` with `processor_type: {config.processor_type}`: a "
            "vision-language config reads chat rows (`type: chat_template` or `messages`: "
            "message contents that are text or lists of text/image parts, or TRL's `messages` "
            "+ `images` columns). Convert the data to messages"
        )
    strategy.parts = True
    rows = load_rows(entry, index, key)
    files = local_files(entry, index, key)
    base_dir = str(Path(files[0]).parent) if files else ""
    name = Path(files[0]).name if files and len(files) == 1 else entry.path
    check = not config.skip_prepare_dataset
    out: dict[str, list[str]] = {c: [] for c in COLUMNS}
    images = 0
    # each row keeps its own entry's masking keys (the collator applies them per row)
    mask = json.dumps(
        {
            "roles_to_train": list(entry.roles_to_train or ("assistant",)),
            "train_on_eos": entry.train_on_eos or "turn",
        }
    )
    for n, row in enumerate(rows):
        origin = f"{where} ({name}) row {n + 1}"
        try:
            sample = strategy.sample(row)
            messages = attach_images(list(sample.messages), row.get(IMAGES_COLUMN) or ())
        except DataError as exc:
            raise DataError(f"{origin}: {exc}") from exc
        for part in _image_parts(messages):
            for k in IMAGE_KEYS:
                if part.get(k) is not None:
                    part[k] = _json_ref(part[k])
                    if check:
                        load_image(part[k], origin, Path(base_dir) if base_dir else None)
            images += 1
        out["messages"].append(json.dumps(messages))
        out["train"].append(json.dumps(list(sample.train)))
        out["origin"].append(origin)
        out["base_dir"].append(base_dir)
        out["mask"].append(mask)
    return datasets.Dataset.from_dict(out), images


def load_vision(
    entries: list[DatasetEntry], key: str, config: NewtuneConfig, strategies: list[Any]
) -> tuple[datasets.Dataset, list[dict[str, Any]]]:
    """Every entry's cached rows, merged, and a per-entry report."""
    parts, report = [], []
    for i, (entry, strategy) in enumerate(zip(entries, strategies, strict=True)):
        where = f"{key}[{i}]"
        if strategy is None:
            raise ConfigError(
                f"`{where}.type` is missing for {entry.path}; a vision-language config needs "
                "`type: chat_template` (messages whose contents hold image parts)"
            )
        part, images = vision_rows(where, entry, i, key, strategy, config)
        report.append({"path": entry.path, "type": entry.type, "rows": len(part), "images": images})
        parts.append(part)
    merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return merged, report


def build_vision(
    config: NewtuneConfig, strategies: list[Any], test_strats: list[Any], split: Any
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """The splits and stats of a multimodal config (`split`: prepare's train/test splitter)."""
    merged, report = load_vision(config.datasets, "datasets", config, strategies)
    if config.shuffle_merged_datasets:
        merged = merged.shuffle(seed=config.seed)
    if config.dataset_shard_num:
        merged = merged.shard(
            num_shards=config.dataset_shard_num, index=config.dataset_shard_idx or 0
        )
    if len(merged) == 0:
        raise DataError("the datasets have no rows")
    splits = split(merged, config)
    if config.test_datasets:
        splits["test"], test_report = load_vision(
            config.test_datasets, "test_datasets", config, test_strats
        )
        report += test_report
    stats = {
        "multimodal": True,
        "datasets": report,
        "rows": {name: len(ds) for name, ds in splits.items()},
        "images": sum(r["images"] for r in report),
        "images_checked": not config.skip_prepare_dataset,
        "note": "image rows are tokenized in the collator; token counts are not known here",
    }
    return splits, stats


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A cached row as `VisionCollator` reads it (messages, train flags, origin, base dir,
    its dataset entry's masking keys)."""
    return {
        "messages": json.loads(row["messages"]),
        "train": json.loads(row["train"]) if row.get("train") else [],
        ORIGIN_KEY: row.get("origin"),
        BASE_DIR_KEY: row.get("base_dir") or None,
        MASK_KEY: json.loads(row["mask"]) if row.get("mask") else None,
    }
