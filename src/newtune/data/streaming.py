"""Streamed training data: read, tokenize and pack on the fly, with a resumable position.

`pretraining_dataset` (and `datasets` with `streaming: true`) are read as `datasets`
IterableDatasets (hub, local files, https; nothing prepared is written), each rank reading
its own part (`split_dataset_by_node`). Rows are taken `streaming_multipack_buffer_size` at a
time, turned into samples by the same strategies and Engine as prepared data, and packed:

- `sample_packing: true`: best-fit-decreasing bins of the buffer (`data.packing.pack`), samples
  isolated by restarting position ids. Samples of bins filled below `CARRY_FILL` wait for the
  next buffer, so packing stays dense across buffers.
- `pretraining_sample_concatenation: true`: consecutive samples fill each row in order (a
  sample that does not fit starts the next row; they attend to each other).
- otherwise one sample per row.

The stream never ends: after the last source it starts again (the next pass, `epoch`), so
`max_steps` ends training. A `StreamPosition` says where the stream is after any micro-batch:
the buffer to read next (source, row) with the samples carried into it, and the bins of that
buffer already given out. Planning a buffer is deterministic, so a stream opened at a position
gives exactly the micro-batches that would have followed it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch

from newtune.config.schema import DatasetEntry, NewtuneConfig
from newtune.config.schema.pretraining import is_streamed
from newtune.data.packing import Packing, pack
from newtune.data.prepare import _batch_tokenizer, _strategy_for, engine_for
from newtune.data.sources import (
    _builder,
    _first_line,
    _load_hub,
    _locate_local,
    _locate_remote,
    _scheme,
    _split_of,
)
from newtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CARRY_FILL = 0.99  # bins below this fill (of capacity) wait for the next buffer's samples
POSITION_FILE = "stream_position.json"
Sample = tuple[list[int], list[int]]  # input_ids, labels


@dataclass(frozen=True)
class StreamPosition:
    """Where a rank's stream is: pass, source, row, carried samples, bins given out."""

    epoch: int = 0
    source: int = 0
    row: int = 0
    carry: tuple[Sample, ...] = ()
    emitted: int = 0

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {**dataclasses.asdict(self), "carry": [list(map(list, s)) for s in self.carry]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamPosition:
        """The position saved by `as_json`."""
        carry = tuple((list(ids), list(lab)) for ids, lab in data.get("carry", []))
        fields = {k: int(data.get(k, 0)) for k in ("epoch", "source", "row", "emitted")}
        return cls(carry=carry, **fields)


@dataclass
class StreamStats:
    """What a stream did in this process: rows read, samples, packed rows and tokens."""

    rows_read: int = 0
    samples: int = 0
    dropped: int = 0
    packed_rows: int = 0
    tokens: int = 0
    capacity: int = 0
    per_source: dict[int, int] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """The stats.json `stream` section."""
        cap = self.packed_rows * self.capacity
        return {
            "rows_read": self.rows_read,
            "samples": self.samples,
            "dropped": self.dropped,
            "packed_rows": self.packed_rows,
            "row_capacity": self.capacity,
            "tokens": self.tokens,
            "efficiency": round(self.tokens / cap, 6) if cap else 0.0,
        }


def stream_entries(config: NewtuneConfig) -> tuple[str, list[DatasetEntry]]:
    """The config key streamed and its entries as `datasets:` entries (pretrain -> completion)."""
    if not config.pretraining_dataset:
        return "datasets", list(config.datasets)
    entries = []
    for e in config.pretraining_dataset:
        data = e.model_dump(exclude={"text_column", "skip"}, exclude_unset=False)
        if e.type == "pretrain":
            data.update(type="completion", field=e.text_column)
        entries.append(DatasetEntry(**data))
    return "pretraining_dataset", entries


def _skip_of(config: NewtuneConfig, index: int) -> int:
    if not config.pretraining_dataset:
        return 0
    return config.pretraining_dataset[index].skip or 0


def open_source(entry: DatasetEntry, index: int, key: str) -> datasets.IterableDataset:
    """The rows of `{key}[index]` as an IterableDataset (nothing is downloaded whole)."""
    where = f"{key}[{index}]"
    scheme = _scheme(entry.path)
    located = _locate_remote(entry, where, scheme) if scheme else _locate_local(entry, where)
    try:
        if located is None:
            return _stream_hub(entry, where)
        if located.folder is not None:
            data = datasets.load_from_disk(located.folder, storage_options=located.options)
            if isinstance(data, datasets.DatasetDict):
                data = data[_split_of(entry)]
            return data.to_iterable_dataset()
        options = dict(located.options) if located.options else None
        return datasets.load_dataset(
            _builder(located.fmt or "json"),
            data_files=list(located.files),
            split="train",
            streaming=True,
            storage_options=options,
        )
    except (DataError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for unreadable sources
        raise DataError(
            f"{where}: could not stream {entry.path}: {_first_line(exc)}. Check the path, "
            "`ds_type` and `data_files`."
        ) from exc


def _stream_hub(entry: DatasetEntry, where: str) -> datasets.IterableDataset:
    if isinstance(entry.name, list) and len(entry.name) > 1:
        raise ConfigError(
            f"`{where}.name`: a streamed hub dataset takes one configuration name; give "
            "one entry per configuration"
        )
    name = entry.name[0] if isinstance(entry.name, list) else entry.name
    try:
        return datasets.load_dataset(
            entry.path,
            name,
            split=_split_of(entry),
            revision=entry.revision,
            data_files=entry.data_files,
            streaming=True,
        )
    except Exception:  # noqa: BLE001 - the prepared path's message names every cause
        _load_hub(entry, where)  # raises the same DataError as a prepared run
        raise


class TokenStream(torch.utils.data.IterableDataset):
    """An endless stream of packed bins (each a list of `{input_ids, labels}` samples) for one
    rank; `rows` bins make a micro-batch. `marks[k]` is the position after micro-batch k."""

    def __init__(
        self,
        config: NewtuneConfig,
        tokenizer: Any,
        template: str | None,
        packing: Packing,
        rank: int = 0,
        world_size: int = 1,
        start: StreamPosition | None = None,
        first_batch: int = 0,
    ) -> None:
        super().__init__()
        self.config, self.tokenizer, self.template = config, tokenizer, template
        self.capacity, self.rows = packing.capacity, packing.rows
        self.mode = (
            "pack"
            if config.sample_packing
            else ("concat" if config.pretraining_sample_concatenation else "single")
        )
        self.rank, self.world_size = rank, world_size
        self.start = start or StreamPosition()
        self.first_batch = first_batch
        self.key, self.entries = stream_entries(config)
        self.stats = StreamStats(capacity=self.capacity)
        self.marks: dict[int, StreamPosition] = {}
        self._tokenizers: dict[int, Any] = {}

    # -- sources -------------------------------------------------------------------------------

    def _rows(self, source: int, row: int) -> Iterator[dict[str, Any]]:
        """This rank's rows of one source from `row` on (rows counted on this rank)."""
        ds = open_source(self.entries[source], source, self.key)
        if _skip_of(self.config, source):
            ds = ds.skip(_skip_of(self.config, source))
        if self.world_size > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        if row:
            ds = ds.skip(row)
        for item in ds:
            self.stats.rows_read += 1
            self.stats.per_source[source] = self.stats.per_source.get(source, 0) + 1
            yield item

    def _tokenizer_of(self, source: int) -> Any:
        if source not in self._tokenizers:
            entry = self.entries[source]
            strategy = _strategy_for(entry, source, self.key, self.config)
            if strategy is None:
                raise ConfigError(
                    f"`{self.key}[{source}].type` is missing for {entry.path}; a streamed "
                    "source needs a format (e.g. `type: completion`)"
                )
            engine = engine_for(entry, self.config, self.tokenizer, self.template, strategy)
            self._tokenizers[source] = _batch_tokenizer(
                f"{self.key}[{source}]", entry, strategy, engine
            )
        return self._tokenizers[source]

    def _samples(self, source: int, first: int, rows: list[dict[str, Any]]) -> list[Sample]:
        """Tokenized samples of a buffer of rows, fitted to sequence_len as prepared data is."""
        if not rows:
            return []
        batch = {k: [r.get(k) for r in rows] for k in rows[0]}
        columns, _ = self._tokenizer_of(source)(batch, list(range(first, first + len(rows))))
        limit, how = self.config.sequence_len, self.config.excess_length_strategy or "drop"
        out = []
        for ids, labels in zip(columns["input_ids"], columns["labels"], strict=True):
            if len(ids) > limit:
                if how == "raise":
                    raise DataError(
                        f"{self.key}[{source}]: a sample of {len(ids)} tokens (near row "
                        f"{first}) is longer than sequence_len={limit} and "
                        "`excess_length_strategy: raise` is set"
                    )
                if how != "truncate":
                    self.stats.dropped += 1
                    continue
                ids, labels = ids[:limit], labels[:limit]
            if len(ids) < self.config.min_sample_len or all(t == -100 for t in labels[1:]):
                self.stats.dropped += 1
                continue
            out.append((list(ids), list(labels)))
        self.stats.samples += len(out)
        return out

    # -- planning ------------------------------------------------------------------------------

    def plan(
        self, samples: list[Sample], position: StreamPosition, last: bool
    ) -> tuple[list[list[Sample]], tuple[Sample, ...]]:
        """The bins of a buffer (in the order given out) and the samples carried to the next.

        Deterministic in (samples, position): a resumed stream plans the same bins.
        """
        if self.mode == "single":
            return [[s] for s in samples], ()
        lengths = np.array([len(s[0]) for s in samples], dtype=np.int64)
        if self.mode == "concat":
            bins: list[list[int]] = []
            used = self.capacity
            for i, n in enumerate(lengths.tolist()):
                if used + n > self.capacity:
                    bins.append([])
                    used = 0
                bins[-1].append(i)
                used += n
        else:
            bins = pack(lengths, self.capacity).as_lists() if len(samples) else []
        carry: list[int] = []
        if not last and bins:
            fills = [int(lengths[b].sum()) for b in bins]
            if self.mode == "concat":
                low = [len(bins) - 1] if fills[-1] < CARRY_FILL * self.capacity else []
            else:
                low, room = [], self.config.streaming_multipack_buffer_size // 2
                for j in sorted(range(len(bins)), key=fills.__getitem__):  # emptiest first
                    if fills[j] >= CARRY_FILL * self.capacity or len(bins[j]) > room:
                        break
                    low.append(j)  # at most half a buffer of samples waits
                    room -= len(bins[j])
            carry = [i for j in low for i in bins[j]]
            bins = [b for j, b in enumerate(bins) if j not in set(low)]
        if self.mode == "pack":
            seed = [self.config.seed, position.epoch, position.source, position.row]
            order = np.random.default_rng(seed).permutation(len(bins))
            bins = [bins[j] for j in order]
        return [[samples[i] for i in b] for b in bins], tuple(samples[i] for i in sorted(carry))

    def _buffers(
        self, position: StreamPosition
    ) -> Iterator[tuple[StreamPosition, list[list[Sample]], StreamPosition]]:
        """(position at the buffer, its bins, the position after it), endlessly."""
        size = self.config.streaming_multipack_buffer_size
        empty_passes = 0
        while True:
            gave = False
            for source in range(position.source, len(self.entries)):
                row = position.row if source == position.source else 0
                carry = position.carry
                reader = self._rows(source, row)
                while True:
                    rows = list(itertools.islice(reader, size))
                    last_of_source = len(rows) < size
                    at = StreamPosition(position.epoch, source, row, carry)
                    last = last_of_source and source == len(self.entries) - 1
                    samples = list(carry) + self._samples(source, row, rows)
                    bins, carry = self.plan(samples, at, last)
                    row += len(rows)
                    after = StreamPosition(position.epoch, source, row, carry)
                    if last_of_source:
                        after = (
                            StreamPosition(position.epoch, source + 1, 0, carry)
                            if not last
                            else StreamPosition(position.epoch + 1, 0, 0, ())
                        )
                    gave = gave or bool(bins)
                    yield at, bins, after
                    if last_of_source:
                        break
                position = after
            if not gave:
                empty_passes += 1
                if empty_passes > 1:
                    raise DataError(
                        f"`{self.key}`: the stream gives no sample (every row was empty, too "
                        "short or too long for sequence_len); check the sources and `type`"
                    )
            else:
                empty_passes = 0

    def __iter__(self) -> Iterator[list[dict[str, list[int]]]]:
        """Bins from the start position on; records the position after every micro-batch."""
        given = self.first_batch * self.rows
        skip = self.start.emitted  # bins of the first buffer given out before a resume
        for at, bins, after in self._buffers(dataclasses.replace(self.start, emitted=0)):
            for j in range(skip, len(bins)):
                given += 1
                if given % self.rows == 0:
                    done = after if j + 1 == len(bins) else dataclasses.replace(at, emitted=j + 1)
                    self.marks[given // self.rows] = done
                    self.marks.pop(given // self.rows - 4096, None)
                self.stats.packed_rows += 1
                self.stats.tokens += sum(len(s[0]) for s in bins[j])
                if self.mode == "concat":  # one sequence: the samples attend to each other
                    yield [
                        {
                            "input_ids": sum((s[0] for s in bins[j]), []),
                            "labels": sum((s[1] for s in bins[j]), []),
                        }
                    ]
                else:
                    yield [{"input_ids": ids, "labels": lab} for ids, lab in bins[j]]
            skip = 0


def write_position(positions: list[StreamPosition], step: int) -> str:
    """The checkpoint's stream file: one position per rank after `step` optimizer steps."""
    return json.dumps({"step": step, "ranks": [p.as_json() for p in positions]})


def read_position(text: str, rank: int, world_size: int, where: str) -> StreamPosition:
    """This rank's saved position; the number of ranks must be the one that saved it."""
    data = json.loads(text)
    ranks = data.get("ranks", [])
    if len(ranks) != world_size:
        raise ConfigError(
            f"{where} was saved by {len(ranks)} process(es) and this run has {world_size}; a "
            "stream resumes with the same number of processes (each reads its own part)"
        )
    return StreamPosition.from_json(ranks[rank])


__all__ = ["StreamPosition", "TokenStream", "is_streamed", "open_source", "read_position"]
