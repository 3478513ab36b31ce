"""Weighted mixtures of BAGEL-format data sets, packed into one token-budgeted row per item.

Each (DDP rank, dataloader worker) pair runs its own *data stream*: stream `s` of `S = world_size *
num_workers` reads a disjoint share of every group's rows (whole units when a group has at least `S`
units, else every `S`-th row of each unit), in an order fixed by (seed, epoch) alone, so the shares of
all streams partition the data. A stream draws each sample's group by weight and all its random choices
(caption, instruction phrasing, CFG dropout) from a generator seeded by (seed, stream, draw number), so
the whole stream is a deterministic function of its *cursor*: the draw count and each group's (epoch,
unit, row) position. Every pack carries its stream's cursor after it; restarting a stream from the
cursor of the last pack the trainer consumed continues with exactly the next unseen samples.

`GroupMixture` runs the streams; `PackedDataset` packs their draws for stage 0 and the draft head,
`generation_datamodule.ParquetGenerationStream` batches them for distillation.

Packing is BAGEL's greedy rule: samples are added while the pack holds fewer than `expected_tokens`;
a sample that would push it past `max_tokens` closes the pack and opens the next one. Samples longer
than `max_tokens_per_sample` are skipped as bad rows.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from hyperbagel.backbone.config import BagelConfig
from hyperbagel.backbone.packing import PackedSequence, Sample, VaeImage, pack, sample_length
from hyperbagel.datamodules.cfg_dropout import CfgDropout
from hyperbagel.datamodules.readers import READERS, BadRow, Origin, ParquetReader, Reader, VLMReader


@dataclass
class DataGroup:
    """One weighted data set of a mixture, as written in YAML::

    - kind: t2i            # t2i | edit (parquet) or vlm (LLaVA jsonl)
      paths: [/data/t2i/]  # files, folders (all *.parquet / *.jsonl inside) or globs
      weight: 2.0          # relative sampling weight
      parquet_info: /data/t2i/parquet_info.json  # optional row-group index (parquet kinds)
      image_root: /data/vlm/images              # vlm: folder the rows' image paths are relative to
      name: my_t2i         # optional; defaults to the kind (kind + number when repeated)
    """

    kind: str
    paths: list[str] = field(default_factory=list)
    weight: float = 1.0
    name: str | None = None
    parquet_info: str | None = None
    image_root: str | None = None

    def reader(
        self, tokenizer: PreTrainedTokenizerBase, config: BagelConfig, max_tokens_per_sample: int | None
    ) -> Reader:
        cls = READERS[self.kind]
        if issubclass(cls, ParquetReader):
            return cls(self.paths, tokenizer, config, max_tokens_per_sample, parquet_info=self.parquet_info)
        return VLMReader(self.paths, tokenizer, config, max_tokens_per_sample, image_root=self.image_root)


def normalise_groups(groups: Sequence[DataGroup | dict[str, Any]]) -> list[DataGroup]:
    """Groups as `DataGroup`s with unique names, checked; dicts (e.g. from YAML) are accepted."""
    result = [dataclasses.replace(g) if isinstance(g, DataGroup) else DataGroup(**g) for g in groups]
    if not result:
        raise ValueError("a data mixture needs at least one group")
    kinds = Counter(g.kind for g in result)
    seen: Counter[str] = Counter()
    for g in result:
        if g.kind not in READERS:
            raise ValueError(f"unknown data group kind {g.kind!r}; known kinds: {sorted(READERS)}")
        if not g.weight > 0:
            raise ValueError(f"data group {g.name or g.kind!r} has weight {g.weight}; weights must be > 0")
        if g.parquet_info is not None and g.kind == "vlm":
            raise ValueError("parquet_info applies to parquet groups (t2i, edit), not vlm")
        if g.image_root is not None and g.kind != "vlm":
            raise ValueError(f"image_root applies to vlm groups, not {g.kind}")
        if g.name is None:
            g.name = g.kind if kinds[g.kind] == 1 else f"{g.kind}{seen[g.kind]}"
            seen[g.kind] += 1
    names = Counter(g.name for g in result)
    if max(names.values()) > 1:
        raise ValueError(f"data group names must be unique: {sorted(n for n, c in names.items() if c > 1)}")
    return result


def packed_to_device(packed: PackedSequence, device: torch.device | str) -> PackedSequence:
    """`packed` with its index tensors and its images on `device`."""
    moved = packed.to(device)
    moved.vit_images = [image.to(device) for image in packed.vit_images]
    moved.vae_images = [
        VaeImage(
            pixels=None if image.pixels is None else image.pixels.to(device),
            latents=None if image.latents is None else image.latents.to(device),
            noisy=image.noisy,
        )
        for image in packed.vae_images
    ]
    return moved


@dataclass
class TrainingPack:
    """One packed row and its bookkeeping: where its samples came from, the rows skipped while filling
    it, and (training only) its stream's cursor after it, which `DataPosition.record` keeps."""

    packed: PackedSequence
    origins: list[Origin]
    groups: list[str]
    num_samples: int
    num_tokens: int
    bad_rows: list[BadRow]
    stream: int
    num_streams: int
    cursor: dict[str, Any] | None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TrainingPack:
        """Lightning's batch transfer calls this: index tensors and images move, bookkeeping stays."""
        return dataclasses.replace(self, packed=packed_to_device(self.packed, device))


class StreamItem(Protocol):
    """What a data stream yields besides its batch: which stream made it and the stream's cursor after
    it (None outside training), so that `DataPosition.record` can keep the position."""

    stream: int
    num_streams: int
    cursor: dict[str, Any] | None
    bad_rows: list[BadRow]


@dataclass
class DataPosition:
    """Cursor of each data stream of one rank after its last consumed pack, and the stream due next
    (dataloader workers hand out packs round-robin, so a restart must begin with that stream)."""

    cursors: dict[int, dict[str, Any]] = field(default_factory=dict)
    next_stream: int = 0
    num_streams: int | None = None

    def record(self, item: StreamItem) -> None:
        if item.cursor is None:
            raise ValueError("only items of an infinite (training) stream carry a cursor")
        self.cursors[item.stream] = item.cursor
        self.num_streams = item.num_streams
        self.next_stream = (item.stream + 1) % item.num_streams

    def rows_read(self) -> int:
        return sum(c["rows_read"] for c in self.cursors.values())

    def bad_row_count(self) -> int:
        return sum(c["bad_rows"] for c in self.cursors.values())


class BadDataError(ValueError):
    """Too many bad rows: the data set, not the training, needs fixing."""


class _BadRowLedger:
    """Counts rows read and skipped by one stream; stops it once the bad fraction exceeds the maximum."""

    def __init__(self, max_fraction: float, min_rows: int, where: str) -> None:
        self.max_fraction, self.min_rows, self.where = max_fraction, min_rows, where
        self.rows_read = self.bad = 0
        self.recent: deque[BadRow] = deque(maxlen=10)
        self.files: Counter[str] = Counter()
        self.pending: list[BadRow] = []

    def good(self) -> None:
        self.rows_read += 1
        self._check()

    def skip(self, bad: BadRow) -> None:
        self.rows_read += 1
        self.bad += 1
        self.recent.append(bad)
        self.files[bad.file] += 1
        self.pending.append(bad)
        self._check()

    def take(self) -> list[BadRow]:
        """Bad rows since the last call."""
        taken, self.pending = self.pending, []
        return taken

    def _check(self) -> None:
        if self.rows_read < self.min_rows or self.bad <= self.max_fraction * self.rows_read:
            return
        files = ", ".join(f"{name} ({count})" for name, count in self.files.most_common(10))
        recent = "\n  ".join(str(b) for b in self.recent)
        raise BadDataError(
            f"{self.bad} of {self.rows_read} rows read by {self.where} were bad "
            f"({self.bad / self.rows_read:.1%} > max_bad_fraction {self.max_fraction:.1%}).\n"
            f"Files with bad rows: {files}\nLatest bad rows:\n  {recent}"
        )


class _GroupStream:
    """One group's rows as seen by one data stream: epochs of shuffled units, this stream's share."""

    def __init__(
        self, name: str, index: int, reader: Reader, seed: int, shard: int, num_shards: int, shuffle: bool
    ) -> None:
        self.name, self.index, self.reader = name, index, reader
        self.seed, self.shard, self.num_shards, self.shuffle = seed, shard, num_shards, shuffle
        self.epoch = self.unit_pos = self.row_pos = 0
        self.good_this_epoch: int | None = 0  # None: this epoch was not read from its start here
        self.rows_this_epoch = 0
        self._plan_cache: tuple[int, list[tuple[int, int | None]]] | None = None
        self._rows_cache: tuple[tuple[int, int], list[tuple[int, Any]]] | None = None

    def position(self) -> list[int]:
        return [self.epoch, self.unit_pos, self.row_pos]

    def seek(self, position: Sequence[int]) -> None:
        self.epoch, self.unit_pos, self.row_pos = (int(p) for p in position)
        self.good_this_epoch = 0 if self.unit_pos == self.row_pos == 0 else None
        self.rows_this_epoch = 0

    def _plan(self) -> list[tuple[int, int | None]]:
        """This stream's units (indexes into `reader.units`) of the current epoch, each with its slot
        offset when the units are too few to share out whole and their rows are split instead."""
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            count = len(self.reader.units)
            order = np.arange(count)
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.index, self.epoch]).permutation(count)
            if count >= self.num_shards:
                plan = [(int(order[p]), None) for p in range(self.shard, count, self.num_shards)]
            else:
                plan = [(int(order[p]), p) for p in range(count)]
            self._plan_cache = (self.epoch, plan)
        return self._plan_cache[1]

    def _rows(self) -> list[tuple[int, Any]]:
        key = (self.epoch, self.unit_pos)
        if self._rows_cache is None or self._rows_cache[0] != key:
            unit_id, offset = self._plan()[self.unit_pos]
            rows = self.reader.load_unit(self.reader.units[unit_id])
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.index, self.epoch, unit_id])
                rows = [rows[j] for j in rng.permutation(len(rows))]
            if offset is not None:
                rows = [r for j, r in enumerate(rows) if (j + offset) % self.num_shards == self.shard]
            self._rows_cache = (key, rows)
        return self._rows_cache[1]

    def _next_row(self, infinite: bool) -> tuple[str, int, Any] | None:
        while True:
            plan = self._plan()
            if self.unit_pos >= len(plan):
                if not infinite:
                    return None
                self._check_epoch()
                self.epoch, self.unit_pos, self.row_pos = self.epoch + 1, 0, 0
                self.good_this_epoch, self.rows_this_epoch = 0, 0
                continue
            rows = self._rows()
            if self.row_pos >= len(rows):
                self.unit_pos, self.row_pos = self.unit_pos + 1, 0
                continue
            row, raw = rows[self.row_pos]
            self.row_pos += 1
            self.rows_this_epoch += 1
            return self.reader.units[plan[self.unit_pos][0]].file, row, raw

    def _check_epoch(self) -> None:
        """A whole epoch read here without a single usable sample would make the stream spin forever."""
        if self.good_this_epoch != 0:
            return
        where = f"data stream {self.shard} of {self.num_shards}"
        if self.rows_this_epoch == 0:
            raise ValueError(
                f"data group {self.name!r} gives {where} no rows ({len(self.reader.units)} units in "
                f"{len(self.reader.files)} files): use fewer ranks or workers, or more, smaller units"
            )
        raise BadDataError(
            f"all {self.rows_this_epoch} rows of data group {self.name!r} read by {where} are bad"
        )

    def next_sample(
        self, rng: np.random.Generator, ledger: _BadRowLedger, infinite: bool
    ) -> tuple[Origin, Sample] | None:
        """The next usable sample, skipping (and recording) bad rows; None once a finite pass ends."""
        while True:
            found = self._next_row(infinite)
            if found is None:
                return None
            file, row, raw = found
            result = self.reader.decode(file, row, raw, rng)
            if isinstance(result, BadRow):
                ledger.skip(result)
                continue
            ledger.good()
            if self.good_this_epoch is not None:
                self.good_this_epoch += 1
            return Origin(file, row), result


class _Drawn(NamedTuple):
    sample: Sample
    length: int
    origin: Origin
    group: str
    bad_rows: list[BadRow]


class _DataStream:
    """The mixture as read by one data stream (one rank's one worker)."""

    def __init__(self, dataset: GroupMixture, stream: int, num_streams: int) -> None:
        self.dataset = dataset
        self.shard = dataset.rank * num_streams + stream
        num_shards = dataset.world_size * num_streams
        self.groups = [
            _GroupStream(g.name, i, reader, dataset.seed, self.shard, num_shards, dataset.infinite)
            for i, (g, reader) in enumerate(zip(dataset.groups, dataset.readers))
        ]
        weights = np.array([g.weight for g in dataset.groups], dtype=np.float64)
        self.weights = weights / weights.sum()
        where = f"data stream {stream} of rank {dataset.rank} (shard {self.shard} of {num_shards})"
        self.ledger = _BadRowLedger(dataset.max_bad_fraction, dataset.bad_fraction_min_rows, where)
        self.draws = 0
        self.current_group = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "draws": self.draws,
            "rows_read": self.ledger.rows_read,
            "bad_rows": self.ledger.bad,
            "groups": {g.name: g.position() for g in self.groups},
        }

    def restore(self, cursor: dict[str, Any]) -> None:
        self.draws = int(cursor["draws"])
        self.ledger.rows_read, self.ledger.bad = int(cursor["rows_read"]), int(cursor["bad_rows"])
        for g in self.groups:
            if g.name in cursor["groups"]:
                g.seek(cursor["groups"][g.name])

    def draw(self, among: Sequence[int] | None = None) -> _Drawn | None:
        """The next sample (None once a finite pass is over); `among` restricts an infinite stream's group
        draw to those groups (by their weights)."""
        rng = np.random.default_rng([self.dataset.seed, self.shard, self.draws])
        self.draws += 1
        if self.dataset.infinite:
            candidates, weights = list(range(len(self.groups))), self.weights
            if among is not None and len(among) < len(self.groups):
                candidates = list(among)
                weights = self.weights[candidates] / self.weights[candidates].sum()
            group = self.groups[candidates[int(rng.choice(len(candidates), p=weights))]]
            found = group.next_sample(rng, self.ledger, infinite=True)
        else:
            found = None
            while found is None and self.current_group < len(self.groups):
                group = self.groups[self.current_group]
                found = group.next_sample(rng, self.ledger, infinite=False)
                if found is None:
                    self.current_group += 1
        if found is None:
            return None
        origin, sample = found
        if self.dataset.dropout is not None:
            sample = self.dataset.dropout.apply(sample, rng)
        length = sample_length(sample, self.dataset.config)
        return _Drawn(sample, length, origin, group.name, self.ledger.take())


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class GroupMixture(IterableDataset, ABC):
    """Samples of weighted BAGEL-format groups, one data stream per (rank, worker), resumable from a
    `DataPosition`; infinite (reshuffled epochs) for training, one ordered pass over every group
    otherwise. Subclasses turn a stream's draws into batches (`_batches`).

    `rank` / `world_size` default to torch.distributed's when it is initialised; `position`, when
    given, is read at each `iter()` (so a shared, updated `DataPosition` restarts every stream right
    after its last consumed item).
    """

    def __init__(
        self,
        groups: Sequence[DataGroup | dict[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        config: BagelConfig,
        max_tokens_per_sample: int | None,
        seed: int = 0,
        infinite: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        position: DataPosition | None = None,
        max_bad_fraction: float = 1.0,
        bad_fraction_min_rows: int = 100,
        dropout: CfgDropout | None = None,
    ) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction {max_bad_fraction} is not in [0, 1]")
        self.groups = normalise_groups(groups)
        self.config = config
        self.readers = [g.reader(tokenizer, config, max_tokens_per_sample) for g in self.groups]
        for reader in self.readers:
            reader.units  # noqa: B018 - list files and units once, here, so a bad path fails at once
        self.dropout = dropout if infinite else None
        self.seed = seed
        self.infinite = infinite
        default_rank, default_world = _distributed_rank()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")
        self.position = position
        self.max_bad_fraction, self.bad_fraction_min_rows = max_bad_fraction, bad_fraction_min_rows

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        num_streams, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        position = self.position if self.infinite else None
        cursor = None
        stream = worker
        if position is not None and position.cursors:
            if position.num_streams != num_streams:
                raise ValueError(
                    f"the data position was recorded with {position.num_streams} streams per rank "
                    f"(dataloader workers) and cannot restart {num_streams}"
                )
            stream = (worker + position.next_stream) % num_streams
            cursor = position.cursors.get(stream)
        return self._batches(stream, num_streams, cursor)

    def _stream(self, stream: int, num_streams: int, cursor: dict[str, Any] | None = None) -> _DataStream:
        """Data stream `stream` of this rank, restarted at `cursor` when given."""
        state = _DataStream(self, stream, num_streams)
        if cursor is not None:
            state.restore(cursor)
        return state

    @abstractmethod
    def _batches(self, stream: int, num_streams: int, cursor: dict[str, Any] | None) -> Iterator[Any]:
        """The items of data stream `stream`, restarted at `cursor` when given."""


class PackedDataset(GroupMixture):
    """Packs of a weighted mixture of BAGEL-format groups (`GroupMixture`, whose options `mixture` holds:
    dropout, seed, infinite, rank, world_size, position, max_bad_fraction, bad_fraction_min_rows), one
    packed row per item, by BAGEL's greedy token budgets; no CFG dropout and no cursors outside training."""

    def __init__(
        self,
        groups: Sequence[DataGroup | dict[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        config: BagelConfig,
        expected_tokens: int = 32768,
        max_tokens: int = 36864,
        max_tokens_per_sample: int = 16384,
        **mixture: Any,
    ) -> None:
        if not 0 < max_tokens_per_sample <= max_tokens:
            raise ValueError(
                f"need 0 < max_tokens_per_sample ({max_tokens_per_sample}) <= max_tokens ({max_tokens})"
            )
        if not 0 < expected_tokens <= max_tokens:
            raise ValueError(f"need 0 < expected_tokens ({expected_tokens}) <= max_tokens ({max_tokens})")
        super().__init__(groups, tokenizer, config, max_tokens_per_sample, **mixture)
        self.expected_tokens, self.max_tokens = expected_tokens, max_tokens

    def _batches(
        self, stream: int, num_streams: int, cursor: dict[str, Any] | None
    ) -> Iterator[TrainingPack]:
        state = self._stream(stream, num_streams, cursor)
        pending: _Drawn | None = None
        pending_cursor: dict[str, Any] | None = None
        while True:
            samples: list[_Drawn] = []
            bad_rows: list[BadRow] = []
            tokens = 0
            exhausted = False
            while tokens < self.expected_tokens:
                if pending is None:
                    pending_cursor = state.snapshot()
                    pending = state.draw()
                    if pending is None:
                        bad_rows += state.ledger.take()
                        exhausted = True
                        break
                if samples and tokens + pending.length > self.max_tokens:
                    break
                samples.append(pending)
                bad_rows += pending.bad_rows
                tokens += pending.length
                pending = None
            if not samples:
                return
            after = pending_cursor if pending is not None else state.snapshot()
            yield TrainingPack(
                packed=pack([[d.sample for d in samples]], self.config),
                origins=[d.origin for d in samples],
                groups=[d.group for d in samples],
                num_samples=len(samples),
                num_tokens=tokens,
                bad_rows=bad_rows,
                stream=stream,
                num_streams=num_streams,
                cursor=after if self.infinite else None,
            )
            if exhausted:
                return


def keep_pack(pack: TrainingPack) -> TrainingPack:
    """DataLoader collate function: a batch is one pack, passed through unchanged."""
    return pack
