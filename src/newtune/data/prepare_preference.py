"""Preference and reward rows for data.prepare: tokenizing batches, lengths, columns.

Saved columns (TRL 1.x's names; nothing else a method needs):
- dpo / orpo: `prompt_ids`, `chosen_ids`, `rejected_ids` (completion ids after the prompt)
- kto: `prompt_ids`, `completion_ids`, `label` (bool)
- reward: `chosen_ids`, `rejected_ids` (full sequences), `margin` (float) when the data has one
Bookkeeping columns start with "_" and are not saved: `_len` (tokens of the row's sequences:
a pair counts its prompt twice), `_sup` (completion tokens), `_p` (prompt tokens, 0 for reward
rows), `_c` (the longest completion, or the longest sequence for reward rows).
"""

from __future__ import annotations

import logging
from typing import Any

import datasets

from newtune.config.schema import DatasetEntry, NewtuneConfig
from newtune.data.strategies.base import Preference, Strategy, Unpaired
from newtune.data.tokenize import Engine, PairRow, UnpairedRow
from newtune.errors import DataError

log = logging.getLogger(__name__)
_IDS = datasets.List(datasets.Value("int32"))
_BOOKKEEPING = {name: datasets.Value("int64") for name in ("_len", "_sup", "_p", "_c")}
ID_COLUMNS = {
    "dpo": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "orpo": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "kto": ("prompt_ids", "completion_ids"),
    "reward": ("chosen_ids", "rejected_ids"),
}


def features(method: str, margin: bool = False) -> datasets.Features:
    """The column types of a method's tokenized rows (bookkeeping columns included)."""
    cols: dict[str, Any] = {name: _IDS for name in ID_COLUMNS[method]}
    if method == "kto":
        cols["label"] = datasets.Value("bool")
    if margin:
        cols["margin"] = datasets.Value("float64")
    return datasets.Features({**cols, **_BOOKKEEPING})


def _columns(method: str, rows: list[Any], margin: bool) -> dict[str, list]:
    """The columns of tokenized rows, with the bookkeeping ones."""
    out: dict[str, list] = {name: [] for name in features(method, margin)}
    for row in rows:
        if isinstance(row, PairRow):
            p, comps = len(row.prompt_ids), [len(row.chosen_ids), len(row.rejected_ids)]
            out["prompt_ids"].append(row.prompt_ids)
            out["chosen_ids"].append(row.chosen_ids)
            out["rejected_ids"].append(row.rejected_ids)
        elif isinstance(row, UnpairedRow):
            p, comps = len(row.prompt_ids), [len(row.completion_ids)]
            out["prompt_ids"].append(row.prompt_ids)
            out["completion_ids"].append(row.completion_ids)
            out["label"].append(row.label)
        else:
            p, comps = 0, [len(row.chosen_ids), len(row.rejected_ids)]
            out["chosen_ids"].append(row.chosen_ids)
            out["rejected_ids"].append(row.rejected_ids)
            if margin:
                out["margin"].append(0.0 if row.margin is None else row.margin)
        out["_len"].append(p * len(comps) + sum(comps))
        out["_sup"].append(sum(comps))
        out["_p"].append(p)
        out["_c"].append(max(comps))
    return out


def check_kind(method: str, sample: Any) -> None:
    """A DataError when a strategy's sample does not fit the training method."""
    if method == "kto" and isinstance(sample, Preference | Unpaired):
        return
    if isinstance(sample, Preference):
        return
    if isinstance(sample, Unpaired):
        raise DataError(
            "the format gives unpaired rows (one completion and a label), which only "
            "`rl: kto` trains on; use a paired format (prompt, chosen, rejected) or `rl: kto`"
        )
    raise DataError(
        f"the format gives {type(sample).__name__} samples (supervised fine-tuning data), not "
        "preference pairs; with `rl:`/`reward_model:` use a preference format such as "
        "`preference` (prompt, chosen, rejected), or remove `rl:`"
    )


def tokenize_rows(engine: Engine, method: str, samples: list[Any], margin: bool) -> dict[str, list]:
    """Tokenize preference samples into the method's columns."""
    rows: list[Any]
    if method == "kto":
        rows = engine.tokenize_unpaired(samples)
    elif method == "reward":
        rows = engine.tokenize_reward(samples)
    else:
        rows = engine.tokenize_preference(samples)
    return _columns(method, rows, margin)


def has_margin(method: str, rows: datasets.Dataset) -> bool:
    """Whether reward rows carry TRL's `margin` column."""
    return method == "reward" and "margin" in rows.column_names


def align_margins(parts: list[datasets.Dataset]) -> list[datasets.Dataset]:
    """Give every part a `margin` column when one has it (0.0: no margin, as TRL's loss reads
    it), so the parts can be concatenated."""
    if not any("margin" in p.column_names for p in parts) or all(
        "margin" in p.column_names for p in parts
    ):
        return parts
    log.warning("some reward datasets have no `margin` column; their rows get margin 0.0")
    return [
        p
        if "margin" in p.column_names
        else p.add_column("margin", [0.0] * len(p), feature=datasets.Value("float64"))
        for p in parts
    ]


def _ints(ds: datasets.Dataset, name: str) -> list[int]:
    return ds.select_columns([name]).to_pandas()[name].tolist() if len(ds) else []


def apply_lengths(
    ds: datasets.Dataset, config: NewtuneConfig, method: str
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Drop, truncate or refuse rows over `max_prompt_len` / `sequence_len`; count everything.

    Prompts over `max_prompt_len`: truncate keeps their last tokens. Prompt plus the longest
    completion over `sequence_len`: truncate cuts the completions (TRL's keep_start), and a
    prompt that alone fills `sequence_len` is dropped (as TRL drops it); reward sequences are
    cut to `sequence_len`. Rows with no completion token or shorter than `min_sample_len` go.
    """
    limit, strategy = config.sequence_len, config.excess_length_strategy or "drop"
    cap = None if method == "reward" else config.max_prompt_len
    prompts, longest = _ints(ds, "_p"), _ints(ds, "_c")
    counts = dict.fromkeys(
        (
            "dropped_prompt_too_long",
            "prompt_truncated",
            "dropped_too_long",
            "truncated",
            "dropped_too_short",
            "dropped_no_supervision",
        ),
        0,
    )
    keep, cut = [], False
    for i, (p, c) in enumerate(zip(prompts, longest, strict=True)):
        if cap and p > cap:
            if strategy == "raise":
                raise DataError(
                    f"merged row {i} has a {p}-token prompt, over max_prompt_len={cap}, and "
                    "`excess_length_strategy: raise` is set. Raise `max_prompt_len`, or use "
                    "`drop` or `truncate`."
                )
            if strategy == "drop":
                counts["dropped_prompt_too_long"] += 1
                continue
            counts["prompt_truncated"] += 1
            p, cut = cap, True
        if p + c > limit:
            if strategy == "raise":
                raise DataError(
                    f"merged row {i} needs {p + c} tokens (prompt {p}, longest "
                    f"{'sequence' if method == 'reward' else 'completion'} {c}), over "
                    f"sequence_len={limit}, and `excess_length_strategy: raise` is set. Raise "
                    "`sequence_len`, or use `drop` or `truncate`."
                )
            if strategy == "drop" or (method != "reward" and p >= limit):
                counts["dropped_too_long"] += 1
                continue
            counts["truncated"] += 1
            cut = True
        keep.append(i)
    if cut:
        ds = ds.map(lambda b: _truncate(b, method, cap, limit), batched=True, desc="Truncating")
    sup, prompts, longest = _ints(ds, "_sup"), _ints(ds, "_p"), _ints(ds, "_c")
    kept = []
    for i in keep:
        if sup[i] == 0:
            counts["dropped_no_supervision"] += 1
        elif prompts[i] + longest[i] < config.min_sample_len:
            counts["dropped_too_short"] += 1
        else:
            kept.append(i)
    for what, n in counts.items():
        if n:
            log.warning("%s: %d row(s)", what.replace("_", " "), n)
    if len(kept) != len(ds):
        ds = ds.select(kept)
    return ds, counts


def _truncate(batch: dict[str, list], method: str, cap: int | None, limit: int) -> dict[str, list]:
    """Cut prompts to their last `cap` tokens and completions to what `limit` leaves."""
    names = ID_COLUMNS[method]
    out = {k: list(v) for k, v in batch.items()}
    for j in range(len(batch[names[0]])):
        if method == "reward":
            for name in names:
                out[name][j] = batch[name][j][:limit]
            sizes = [len(out[name][j]) for name in names]
            out["_len"][j] = out["_sup"][j] = sum(sizes)
            out["_c"][j] = max(sizes)
            continue
        prompt = batch["prompt_ids"][j]
        if cap and len(prompt) > cap:
            prompt = prompt[-cap:]
        room = max(limit - len(prompt), 0)
        out["prompt_ids"][j] = prompt
        for name in names[1:]:
            out[name][j] = batch[name][j][:room]
        comps = [len(out[name][j]) for name in names[1:]]
        out["_p"][j], out["_c"][j] = len(prompt), max(comps)
        out["_sup"][j] = sum(comps)
        out["_len"][j] = len(prompt) * len(comps) + sum(comps)
    return out


def required_columns_problem(
    where: str, entry: DatasetEntry, strategy: Strategy, columns: list[str]
) -> str | None:
    """The error for a dataset missing a column its preference format reads."""
    missing = [c for c in strategy.required_columns() if c not in columns]
    if not missing:
        return None
    rejected = " (the rejected side of each pair)" if any("rejected" in m for m in missing) else ""
    return (
        f"{where} ({entry.path}, type {entry.type}) needs column(s) {', '.join(missing)}"
        f"{rejected} but the data has {', '.join(columns)}. Pick the matching `type` or rename "
        "the columns."
    )
