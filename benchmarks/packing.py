"""Packing efficiency and time: newtune's multipack vs TRL's `pack_dataset` (bfd) vs padding.

Lengths are drawn lognormal (median 300, sigma 0.9, clipped to [1, 2048]), packed into rows
of 2048 tokens. Each tool starts from the same in-memory Arrow dataset of `input_ids`:
  * newtune pack: `sample_lengths` + exact best-fit decreasing over the whole set.
  * newtune sampler: what `train` runs per epoch: shuffled groups of 100k samples, each
    packed best-fit decreasing, bins shuffled (`MultipackBatchSampler`).
  * TRL bfd: `trl.pack_dataset(ds, 2048, strategy="bfd")` (a batched map: BFD within each
    map batch of 1,000 rows; kept in memory, no cache file written).
  * padded: batches of 8 rows in random order, each padded to its longest row (no packing).
Efficiency = real tokens / (rows x row width): the share of the compute spent on real tokens.

Run: python benchmarks/packing.py [--sizes 100000 1000000]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from newtune.data.packing import MultipackBatchSampler, pack, sample_lengths  # noqa: E402

CAPACITY = 2048
PAD_BATCH = 8


def draw_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Lognormal lengths, median 300, sigma 0.9, clipped to [1, 2048]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(300), 0.9, n)), 1, CAPACITY).astype(np.int64)


def as_dataset(lengths: np.ndarray) -> datasets.Dataset:
    """An Arrow dataset whose rows have these many (dummy) token ids."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(np.ones(int(offsets[-1]), dtype=np.int32))
    column = pa.LargeListArray.from_arrays(pa.array(offsets), values)
    return datasets.Dataset(pa.table({"input_ids": column}))


def timed(fn):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(n: int, trl_too: bool) -> list[tuple[str, int, float, float]]:
    """(method, rows, efficiency, seconds) for n lengths."""
    lengths = draw_lengths(n)
    tokens = int(lengths.sum())
    ds = as_dataset(lengths)
    out = []
    bins, secs = timed(lambda: pack(sample_lengths(ds), CAPACITY))
    out.append(("newtune pack (exact BFD)", len(bins), tokens / (len(bins) * CAPACITY), secs))

    def sampler_rows() -> int:
        sampler = MultipackBatchSampler(sample_lengths(ds), CAPACITY, 1, seed=0)
        return len(sampler.packed(0)[1])

    rows, secs = timed(sampler_rows)
    out.append(("newtune sampler (100k groups)", rows, tokens / (rows * CAPACITY), secs))
    if trl_too:
        from trl import pack_dataset

        packed, secs = timed(
            lambda: pack_dataset(ds, CAPACITY, strategy="bfd", map_kwargs={"keep_in_memory": True})
        )
        out.append(("TRL pack_dataset bfd", len(packed), tokens / (len(packed) * CAPACITY), secs))

    def padded() -> float:
        order = np.random.default_rng(0).permutation(n)
        shuffled = lengths[order]
        pad = len(shuffled) % PAD_BATCH
        full = np.concatenate([shuffled, np.zeros((PAD_BATCH - pad) % PAD_BATCH, np.int64)])
        return float(full.reshape(-1, PAD_BATCH).max(axis=1).sum() * PAD_BATCH)

    area, secs = timed(padded)
    out.append((f"padded, batches of {PAD_BATCH}", n, tokens / area, secs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (not installed)")
    opts = parser.parse_args()
    results = [(n, run(n, not opts.no_trl)) for n in opts.sizes]
    print(f"\n{os.cpu_count()} CPUs; lengths lognormal(median 300, sigma 0.9) <= {CAPACITY}\n")
    head = f"{'samples':>9}  {'method':<30} {'rows':>9} {'efficiency':>11} {'seconds':>8}"
    print(head)
    print("-" * len(head))
    for n, rows in results:
        for method, count, eff, secs in rows:
            print(f"{n:>9,}  {method:<30} {count:>9,} {100 * eff:>10.3f}% {secs:>8.3f}")


if __name__ == "__main__":
    main()
