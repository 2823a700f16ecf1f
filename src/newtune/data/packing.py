"""Multipack: best-fit-decreasing bin packing of sample lengths, and the batch sampler.

`pack` is exact best-fit decreasing (each sample, longest first, goes into the open bin with
the least room that still fits it) computed per distinct length instead of per sample: all
samples of one length go to the tightest bins as whole runs (a bin with room r takes r // s
of them), so the Python loop runs per (length, room) pair and numpy does the rest. 1M
lengths pack in well under a second.

`MultipackBatchSampler` shuffles the samples into groups (seeded by `seed` and the epoch),
packs each group, shuffles the bins, and deals them into batches of `rows` bins. Every
epoch yields the same number of batches, a multiple of the number of ranks, and every sample
exactly once: where an epoch packs into fewer bins than the most any epoch needs, bins are
split (a bin of k samples becomes two) rather than samples repeated or dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from newtune.config.schema import NewtuneConfig
from newtune.errors import DataError

DEFAULT_GROUP_SIZE = 100_000


@dataclass(frozen=True)
class Bins:
    """Packed bins as CSR: bin b holds `items[offsets[b]:offsets[b + 1]]` (sample indices)."""

    items: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def bin(self, b: int) -> np.ndarray:
        """The sample indices in bin b."""
        return self.items[self.offsets[b] : self.offsets[b + 1]]

    def as_lists(self) -> list[list[int]]:
        """Every bin as a list of sample indices."""
        return [part.tolist() for part in np.split(self.items, self.offsets[1:-1])]


def pack(lengths: np.ndarray, capacity: int, indices: np.ndarray | None = None) -> Bins:
    """Best-fit-decreasing packing of `lengths` into bins of `capacity` tokens.

    Returns bins of positions into `lengths` (or of `indices[position]` when given), each
    bin's samples longest first, bins in the order they were opened.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = np.arange(len(lengths)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(lengths) == 0:
        return Bins(np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64))
    if lengths.max() > capacity or lengths.min() < 1:
        bad = int(np.flatnonzero((lengths > capacity) | (lengths < 1))[0])
        raise DataError(
            f"sample {int(ids[bad])} has {int(lengths[bad])} tokens, which cannot be packed into "
            f"rows of {capacity}; prepare the data with this sequence_len"
        )
    order = np.argsort(-lengths, kind="stable")
    sizes, counts = np.unique(lengths[order], return_counts=True)
    sizes, counts = sizes[::-1], counts[::-1]  # longest first, as `order`
    bin_of: list[int] = []  # bin of the i-th sample in `order`, appended in that order
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room -> open bins
    occupied = np.zeros(capacity + 1, dtype=bool)
    n_bins = 0
    for size, count in zip(sizes.tolist(), counts.tolist(), strict=True):
        left = count
        for room in (np.flatnonzero(occupied[size:]) + size).tolist():
            fit = room // size  # a bin with this room takes this many before another is tighter
            bins = by_room[room]
            k = min(len(bins), -(-left // fit))
            chosen, by_room[room] = bins[-k:], bins[:-k]
            occupied[room] = bool(by_room[room])
            placed = min(left, k * fit)
            bin_of += _repeat(chosen, fit, placed)
            last = placed - (k - 1) * fit  # the last chosen bin may take fewer
            _reopen(by_room, occupied, chosen[:-1], room - fit * size)
            _reopen(by_room, occupied, chosen[-1:], room - last * size)
            left -= placed
            if not left:
                break
        if left:  # open new bins, each filled with as many of this size as fit
            fit = capacity // size
            k = -(-left // fit)
            chosen = list(range(n_bins, n_bins + k))
            n_bins += k
            bin_of += _repeat(chosen, fit, left)
            last = left - (k - 1) * fit
            _reopen(by_room, occupied, chosen[:-1], capacity - fit * size)
            _reopen(by_room, occupied, chosen[-1:], capacity - last * size)
    bins_of = np.array(bin_of, dtype=np.int64)
    within = np.argsort(bins_of, kind="stable")  # group by bin, longest first inside a bin
    offsets = np.zeros(n_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(bins_of, minlength=n_bins), out=offsets[1:])
    return Bins(ids[order[within]], offsets)


def pack_next_fit(lengths: np.ndarray, capacity: int, indices: np.ndarray | None = None) -> Bins:
    """Next-fit packing that keeps the order of `lengths`: a bin is closed when the next sample
    does not fit (Axolotl's `sample_packing_sequentially`)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = np.arange(len(lengths)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        return pack(lengths, capacity, indices)  # its DataError names the sample
    offsets, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > capacity:
            offsets.append(i)
            used = 0
        used += n
    if len(lengths):
        offsets.append(len(lengths))
    return Bins(ids, np.array(offsets, dtype=np.int64))


def _repeat(bins: list[int], times: int, count: int) -> list[int]:
    """Each bin `times` times, in order, cut to `count` entries."""
    if times == 1:
        return bins[:count]
    return [b for b in bins for _ in range(times)][:count]


def _reopen(by_room: list[list[int]], occupied: np.ndarray, bins: list[int], room: int) -> None:
    if bins and room > 0:
        by_room[room].extend(bins)
        occupied[room] = True


def packing_report(
    lengths: np.ndarray, packing: Packing, seed: int, group_size: int = DEFAULT_GROUP_SIZE
) -> dict[str, float | int]:
    """What packing does to these lengths (epoch 0): packed rows, capacity and efficiency."""
    sampler = MultipackBatchSampler(
        lengths, packing.capacity, packing.rows, seed=seed, group_size=group_size
    )
    rows = len(sampler.packed(0)[1])
    return {
        "packed_rows": rows,
        "row_capacity": packing.capacity,
        "efficiency": round(efficiency(lengths, rows, packing.capacity), 6),
    }


def efficiency(lengths: np.ndarray, n_rows: int, capacity: int) -> float:
    """Real tokens over packed capacity (rows x capacity)."""
    return float(np.sum(lengths)) / (n_rows * capacity) if n_rows else 0.0


def split_to(bounds: np.ndarray, target: int) -> np.ndarray:
    """Split the bins with the most samples in two until there are `target` bins.

    `bounds` holds one `(start, end)` row per bin into a shared item array.
    """
    if len(bounds) >= target:
        return bounds
    rows = [tuple(b) for b in bounds.tolist()]
    while len(rows) < target:
        b = max(range(len(rows)), key=lambda i: rows[i][1] - rows[i][0])
        lo, hi = rows[b]
        if hi - lo < 2:
            raise DataError(
                f"cannot make {target} batches from {int(sum(e - s for s, e in rows))} samples; "
                "use fewer processes or more data"
            )
        mid = (lo + hi) // 2
        rows[b : b + 1] = [(lo, mid), (mid, hi)]
    return np.array(rows, dtype=np.int64)


class MultipackBatchSampler:
    """Batches of packed bins for one rank: `rows` bins of `capacity` tokens per batch.

    Yields, for each batch, a list of bins (each a list of dataset indices). `len()` is the
    same every epoch. `shuffle=False` packs the whole dataset in one group in order, and
    `even=False` lets ranks have different numbers of batches, none of them repeated or
    split (eval: a rank may get none).
    """

    def __init__(
        self,
        lengths: np.ndarray,
        capacity: int,
        rows: int,
        seed: int = 42,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        epochs: int = 1,
        group_size: int = DEFAULT_GROUP_SIZE,
        even: bool = True,
        in_order: bool = False,
        next_fit: bool = False,
    ) -> None:
        self.even, self.in_order, self.next_fit = even, in_order, next_fit
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.capacity, self.rows, self.seed, self.shuffle = capacity, rows, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epochs, self.group_size = max(1, epochs), group_size
        self.epoch = 0
        self._packed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._batches: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch (its shuffle); called by the Trainer before each epoch."""
        self.epoch = epoch

    def packed(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """An epoch's packing: sample indices, and `(start, end)` per bin in batch order.

        Epochs past `epochs` reuse the packing of `epoch % epochs`.
        """
        epoch = epoch % self.epochs if self.shuffle else 0
        if epoch not in self._packed:
            rng = np.random.default_rng([self.seed, epoch])
            n = len(self.lengths)
            shuffle = self.shuffle and not self.in_order
            order = rng.permutation(n) if shuffle else np.arange(n)
            items, offsets = [], [np.zeros(1, dtype=np.int64)]
            packer = pack_next_fit if self.next_fit else pack
            for start in range(0, n, self.group_size):
                group = order[start : start + self.group_size]
                done = packer(self.lengths[group], self.capacity, group)
                offsets.append(done.offsets[1:] + (offsets[-1][-1] if items else 0))
                items.append(done.items)
            flat = np.concatenate(items) if items else np.zeros(0, dtype=np.int64)
            ends = np.concatenate(offsets)
            bounds = np.stack([ends[:-1], ends[1:]], axis=1)
            if shuffle:
                bounds = bounds[rng.permutation(len(bounds))]
            self._packed[epoch] = (flat, bounds)
        return self._packed[epoch]

    def __len__(self) -> int:
        """Batches per rank per epoch: enough for the epoch that packs into the most bins."""
        if not self.even:
            return len(self.batch_bounds(0)[self.rank :: self.num_replicas])
        if self._batches is None:
            epochs = range(self.epochs if self.shuffle else 1)
            most = max(len(self.packed(e)[1]) for e in epochs)
            self._batches = max(1, math.ceil(math.ceil(most / self.rows) / self.num_replicas))
        return self._batches

    def batch_bounds(self, epoch: int) -> list[np.ndarray]:
        """Every rank's batches (bin bounds) for an epoch; rank r takes r, r + W, r + 2W, ...

        The bins are dealt into exactly `len(self) * W` batches of at most `rows` bins,
        the short ones last; bins are split first if there are fewer bins than batches.
        """
        if not self.even:
            bounds = self.packed(epoch)[1]
            return [bounds[i : i + self.rows] for i in range(0, len(bounds), self.rows)]
        total = len(self) * self.num_replicas
        bounds = split_to(self.packed(epoch)[1], total)
        sizes = np.full(total, self.rows)
        excess = total * self.rows - len(bounds)
        sizes -= excess // total
        if excess % total:
            sizes[total - excess % total :] -= 1
        ends = np.cumsum(sizes).tolist()
        return [bounds[end - size : end] for end, size in zip(ends, sizes.tolist(), strict=True)]

    def __iter__(self) -> Iterator[list[list[int]]]:
        items = self.packed(self.epoch)[0]
        for batch in self.batch_bounds(self.epoch)[self.rank :: self.num_replicas]:
            yield [items[lo:hi].tolist() for lo, hi in batch.tolist()]


def sample_lengths(dataset: Any) -> np.ndarray:
    """Token count of every row, read from the Arrow column without decoding rows."""
    column = dataset.with_format("arrow")["input_ids"]  # honours an indices mapping
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


@dataclass(frozen=True)
class Packing:
    """How rows are packed: `rows` bins of `capacity` tokens per micro-batch."""

    capacity: int
    rows: int
    pad_to_capacity: bool = False
    in_order: bool = False  # curriculum_sampling: rows and bins in dataset order
    next_fit: bool = False  # sample_packing_sequentially: next-fit packing, order kept

    @classmethod
    def for_run(
        cls, sequence_len: int, micro_batch_size: int, attn: str, pad: bool = False
    ) -> Packing:
        """flash-attention (varlen) reads one long row; sdpa/eager take micro_batch_size rows."""
        if attn.startswith("flash_attention"):
            return cls(sequence_len * micro_batch_size, 1, pad)
        return cls(sequence_len, micro_batch_size, pad)


def packing_plan(config: NewtuneConfig) -> tuple[Packing | None, Packing | None]:
    """Train and eval packing for this config (None where samples are padded instead)."""
    attn = config.attn_implementation or "sdpa"
    pad = bool(config.pad_to_sequence_len)
    train = (
        dataclasses.replace(
            Packing.for_run(config.sequence_len, config.micro_batch_size, attn, pad),
            in_order=bool(config.curriculum_sampling),
            next_fit=bool(config.sample_packing_sequentially),
        )
        if config.sample_packing
        else None
    )
    eval_packs = config.eval_sample_packing
    eval_packs = bool(config.sample_packing) if eval_packs is None else eval_packs
    eval_rows = config.eval_batch_size or config.micro_batch_size
    return train, (
        Packing.for_run(config.sequence_len, eval_rows, attn, pad) if eval_packs else None
    )
