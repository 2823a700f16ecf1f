"""Human-readable views of prepared data: the report table and decoded examples."""

from __future__ import annotations

from typing import Any

from newtune.data.tokenize import IGNORE_INDEX

GREEN, RESET = "\033[32m", "\033[0m"


def report_table(stats: dict[str, Any]) -> str:
    """The data report as an aligned two-column table."""
    rows: list[tuple[str, str]] = [("fingerprint", str(stats.get("fingerprint", "")))]
    rows += [(f"rows ({split})", f"{n:,}") for split, n in stats["rows"].items()]
    rows += [(d["path"], f"{d['rows']:,} rows ({d['type']})") for d in stats["datasets"]]
    if stats.get("multimodal"):  # image rows are tokenized in the collator
        checked = "checked" if stats.get("images_checked") else "not checked (skip_prepare_dataset)"
        return _aligned([*rows, ("images", f"{stats.get('images', 0):,} ({checked})")])
    for key in (
        "total_tokens",
        "supervised_tokens",
        "dropped_too_long",
        "dropped_too_short",
        "dropped_no_supervision",
        "dropped_empty",
        "truncated",
    ):
        rows.append((key, f"{stats.get(key, 0):,}"))
    p = stats["length_percentiles"]
    rows.append(("length p50/p90/p99/max", f"{p['p50']}/{p['p90']}/{p['p99']}/{p['max']}"))
    packing = stats.get("packing")
    if packing:
        rows.append(
            (
                "packed rows (efficiency)",
                f"{packing['packed_rows']:,} of {packing['row_capacity']:,} tokens "
                f"({100 * packing['efficiency']:.2f}%)",
            )
        )
    return _aligned(rows)


def _aligned(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def mark_trained(tokenizer: Any, input_ids: list[int], labels: list[int], color: bool) -> str:
    """Decode a row, marking trained spans (green on a terminal, `[[...]]` otherwise)."""
    parts: list[str] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        boundary = i == len(input_ids) or (labels[i] == IGNORE_INDEX) != (
            labels[start] == IGNORE_INDEX
        )
        if not boundary:
            continue
        text = tokenizer.decode(input_ids[start:i])
        if labels[start] != IGNORE_INDEX:
            text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
        parts.append(text)
        start = i
    return "".join(parts)
