"""`GenerationBatch`es for the distillation stages: text-to-image prompts and edits with clean targets.

Each batch holds one task kind (a text-to-image batch never pays for the image-CFG pass of edits) and
one latent grid. Two sources:
- `GenerationDataModule`: the shapes world. Batches are made once per split from a seeded permutation
  and visited in an epoch-seeded order split across DDP ranks (`ResumableBatchOrder`); a run restored
  from a checkpoint continues with the next unseen batch of its epoch. Images are rendered when a batch
  is made. Targets are the exact renders (for edits the exact edited scene).
- `ParquetGenerationDataModule`: BAGEL-format text-to-image and editing parquet (real scale), streamed
  through stage 0's readers and data streams, one item per caption / per edit turn, bucketed by task and
  grid; resumable like stage 0's data (the cursor of each consumed batch is kept in checkpoints).
"""

from __future__ import annotations

import random
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hyperbagel.backbone.packing import Sample, TextBlock, VaeImage, VitImage
from hyperbagel.datamodules.interleaved import load_model_config, load_tokenizer
from hyperbagel.datamodules.packed_dataset import DataGroup, DataPosition, GroupMixture, normalise_groups
from hyperbagel.datamodules.readers import BadRow, Reader
from hyperbagel.datamodules.resumable import ResumableStreams, StreamPositions, rank_and_world
from hyperbagel.datamodules.shapes import EditSample, ShapesWorld, T2ISample
from hyperbagel.distillation.batches import (
    TASKS,
    GenerationBatch,
    GenerationItem,
    edit_item,
    latent_grid,
    t2i_item,
)

SPLITS = ("train", "val", "test")


def _unwrap(batch: GenerationBatch) -> GenerationBatch:
    """DataLoader collate for a dataset whose items already are batches (picklable, unlike a lambda)."""
    return batch


class ShapesGenerationBatches(Dataset):
    """Fixed batches of one split: `n` samples of each kind, cut into single-kind batches.

    Args:
        world: the shapes world drawing the samples.
        split: "train", "val" or "test".
        n: samples per kind.
        kinds: task kinds to include ("t2i", "edit").
        batch_size: samples per batch; a kind's last partial batch is dropped when `drop_last`.
        tokenizer / config: text encoding and the model's image transforms.
        seed: the permutation of each kind's samples into batches (None keeps the world's order).
    """

    def __init__(
        self,
        world: ShapesWorld,
        split: str,
        n: int,
        kinds: list[str],
        batch_size: int,
        tokenizer: Any,
        config: Any,
        seed: int | None = 0,
        drop_last: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.config = config
        self.batches: list[list[T2ISample | EditSample]] = []
        self.kinds: list[str] = []  # each batch's task kind
        for kind in kinds:
            samples = list(world.samples(kind, split, n))
            if seed is not None:
                random.Random(f"{seed}|{kind}|{split}").shuffle(samples)
            stop = len(samples) - len(samples) % batch_size if drop_last else len(samples)
            self.batches += [samples[i : i + batch_size] for i in range(0, stop, batch_size)]
            self.kinds += [kind] * (len(self.batches) - len(self.kinds))
        if not self.batches:
            raise ValueError(
                f"the {split} split has no batch: {n} samples per kind with batch_size {batch_size}"
            )

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> GenerationBatch:
        return GenerationBatch.collate([self._item(sample) for sample in self.batches[index]])

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _item(self, sample: T2ISample | EditSample) -> GenerationItem:
        if isinstance(sample, T2ISample):
            return t2i_item(sample.prompt, self._encode(sample.prompt), self.config, sample.image)
        return edit_item(
            sample.source_image,
            sample.instruction,
            self._encode(sample.instruction),
            self.config,
            sample.target_image,
        )


class ResumableBatchOrder(DistributedSampler):
    """The training batches' order: a permutation seeded by (seed, data epoch), each rank taking its share
    (equal shares, remainders dropped), resumable after any batch. Given each batch's kind, the ranks'
    batches of one step share a kind: a sharded (FSDP) model's layers are gathered by all ranks together,
    so every rank must call the same layers at every step, and a text-to-image batch calls other ones than
    an edit.

    Where an iteration starts is decided by `batches_consumed()`, the data module's count of the batches
    this rank consumed over the whole run: the data epoch is that count over the batches an epoch holds,
    and the epoch's batches already consumed are skipped. Not Lightning's epoch (`set_epoch`, ignored): a
    run resumed from a checkpoint written at an epoch's last batch numbers its next epoch one too high
    (Lightning 2.6), which would change the order; the count is exact.

    Why a `DistributedSampler`: its order does not depend on the global random state (which a restored
    run does not share with the interrupted one), and Lightning leaves such a sampler in place under DDP
    instead of wrapping it.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        seed: int,
        kinds: Sequence[str],
        batches_consumed: Callable[[], int] = lambda: 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=True)
        if len(kinds) != len(dataset):
            raise ValueError(f"got {len(kinds)} batch kinds for {len(dataset)} batches")
        self.kinds = list(kinds)
        self.batches_consumed = batches_consumed
        self.num_samples = sum(count // num_replicas for count in Counter(self.kinds).values())
        if self.num_samples == 0:
            raise ValueError(f"no kind has a batch for each of the {num_replicas} ranks")

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's share of the epoch's permutation (or of the batches in order, without `shuffle`),
        taken in steps of `num_replicas` batches of one kind (each kind's remainder dropped); with one rank,
        the permutation itself."""
        order = list(range(len(self.kinds)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.kinds), generator=generator).tolist()
        pending: dict[str, list[int]] = {}
        share = []
        for index in order:
            step = pending.setdefault(self.kinds[index], [])
            step.append(index)
            if len(step) == self.num_replicas:
                share.append(step[self.rank])
                step.clear()
        return share

    def __iter__(self) -> Iterator[int]:
        epoch, done = divmod(self.batches_consumed(), self.num_samples)
        return iter(self.epoch_order(epoch)[done:])


class GenerationDataModule(LightningDataModule):
    """Shapes-world text-to-image and editing batches for the distillation stages.

    Args:
        model_config: preset name or checkpoint folder (image transforms and special token ids).
        tokenizer: "shapes" or a tokenizer folder.
        kinds: task kinds ("t2i", "edit").
        n_train / n_val / n_test: samples per kind in each split (0 disables validation / testing).
        batch_size: samples per batch (single-kind batches).
        canvas_size / world_seed: the world's canvas and seed (splits do not depend on the seed).
        seed: how samples are grouped into training batches and the batches ordered in each epoch.
        num_workers: DataLoader workers.

    The position in the training data (the batches consumed, as data epoch and batches consumed in it) is
    in the checkpoint; a restored run goes on with the next unseen batch. Under DDP every rank consumes the
    same number of batches, so rank 0's count serves all.
    """

    def __init__(
        self,
        model_config: str,
        tokenizer: str = "shapes",
        kinds: list[str] | None = None,
        n_train: int = 2000,
        n_val: int = 16,
        n_test: int = 0,
        batch_size: int = 8,
        canvas_size: int = 64,
        world_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.kinds = list(kinds or TASKS)
        unknown = sorted(set(self.kinds) - set(TASKS))
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {TASKS}, got {self.kinds}")
        if n_train < batch_size or n_val < 0 or n_test < 0:
            raise ValueError(
                f"need n_train >= batch_size ({batch_size}) and n_val, n_test >= 0; got {n_train}, {n_val}, "
                f"{n_test}"
            )
        self.tokenizer = load_tokenizer(tokenizer)
        self.config = load_model_config(model_config, self.tokenizer)
        self.world = ShapesWorld(canvas_size, world_seed)
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.datasets: dict[str, ShapesGenerationBatches] = {}
        self.batches_consumed = 0  # training batches this rank consumed in the run
        self.epoch_length: int | None = None  # training batches an epoch holds on each rank
        self._restored: dict[str, int] | None = None

    def split(self, name: str) -> ShapesGenerationBatches:
        """The batches of a split (built on first use)."""
        if name not in self.datasets:
            train = name == "train"
            self.datasets[name] = ShapesGenerationBatches(
                self.world,
                name,
                self.sizes[name],
                self.kinds,
                self.batch_size,
                self.tokenizer,
                self.config,
                seed=self.seed if train else None,
                drop_last=train,
            )
        return self.datasets[name]

    def _loader(self, name: str, sampler: ResumableBatchOrder | None = None) -> DataLoader:
        return DataLoader(
            self.split(name),
            batch_size=None,
            sampler=sampler,
            collate_fn=_unwrap,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world_size = rank_and_world(self)
        batches = self.split("train")
        order = ResumableBatchOrder(
            batches, world_size, rank, self.seed, batches.kinds, lambda: self.batches_consumed
        )
        self.epoch_length = len(order)
        if self._restored is not None:
            self.batches_consumed = self._restored["epoch"] * len(order) + self._restored["consumed"]
            self._restored = None
        return self._loader("train", order)

    def val_dataloader(self) -> DataLoader | list:
        return self._evaluation_loader("val") if self.sizes["val"] else []

    def test_dataloader(self) -> DataLoader | list:
        return self._evaluation_loader("test") if self.sizes["test"] else []

    def _evaluation_loader(self, name: str) -> DataLoader:
        """The split in order, each step's batches of one kind on every rank (see `ResumableBatchOrder`)."""
        rank, world_size = rank_and_world(self)
        batches = self.split(name)
        order = ResumableBatchOrder(batches, world_size, rank, self.seed, batches.kinds, shuffle=False)
        return self._loader(name, order)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches the trainer is about to consume (the checkpoint's position)."""
        if self.trainer is not None and self.trainer.training:
            self.batches_consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._restored is not None:
            return dict(self._restored)
        epoch, consumed = divmod(self.batches_consumed, self.epoch_length or 1)
        return {"epoch": epoch, "consumed": consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"epoch", "consumed"}:
            raise ValueError(f"not a GenerationDataModule position: keys {sorted(state_dict)}")
        self._restored = {"epoch": int(state_dict["epoch"]), "consumed": int(state_dict["consumed"])}
        # Lightning cannot see that this module resumes mid-epoch (its loaders hold no state) and warns
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")


# --- BAGEL-format parquet ------------------------------------------------------------------------------
def reader_items(sample: Sample, kind: str, reader: Reader) -> list[GenerationItem]:
    """Generation items of a reader's sample: a caption and its image, or one item per edit turn
    (source as clean VAE + ViT, instruction, target), as the inferencer builds contexts."""
    config, decode = reader.config, reader.tokenizer.decode
    if kind == "t2i":
        text, image = sample
        grid = latent_grid(image.pixels, config, "image")
        return [GenerationItem("t2i", [text], [], None, grid, image.pixels, decode(list(text.ids)))]
    items = []
    for turn in range(0, len(sample), 4):
        source, vit, text, target = sample[turn : turn + 4]
        if not (isinstance(source, VaeImage) and isinstance(vit, VitImage) and isinstance(text, TextBlock)):
            raise ValueError(
                f"unexpected edit blocks at turn {turn // 4}: {[type(b).__name__ for b in sample]}"
            )
        clean = VaeImage(pixels=source.pixels)
        grid = latent_grid(source.pixels, config, "source image")
        if latent_grid(target.pixels, config, "target image") != grid:
            continue  # BAGEL edits keep the source's size; a resized target cannot be a regression target
        items.append(
            GenerationItem(
                "edit", [clean, vit, text], [clean, vit], [text], grid, target.pixels, decode(list(text.ids))
            )
        )
    return items


def generation_groups(groups: list[DataGroup | dict[str, Any]]) -> list[DataGroup]:
    """`normalise_groups`, refusing kinds a distillation batch cannot hold (understanding data)."""
    groups = normalise_groups(groups)
    bad = sorted({g.kind for g in groups} - set(TASKS))
    if bad:
        raise ValueError(f"generation data groups must be of kinds {TASKS}, got {bad}")
    return groups


@dataclass
class PositionedBatch:
    """A training batch of `ParquetGenerationStream` with its stream's cursor after it (`StreamItem`);
    the data module records the cursor and hands the stages the bare batch."""

    batch: GenerationBatch
    stream: int
    num_streams: int
    cursor: dict[str, Any] | None
    bad_rows: list[BadRow]


class ParquetGenerationStream(GroupMixture):
    """Endless single-kind, single-grid batches from weighted t2i / edit parquet groups.

    Rows come from `GroupMixture`'s data streams (`mixture` holds its options): seeded shares per rank
    and worker, groups drawn by weight, bad rows skipped and counted, `max_bad_fraction` enforced. Items
    wait in a bucket per (task, grid) until `batch_size` of them are there.

    The kind of a stream's k-th batch is drawn first, by the kinds' summed group weights, from a seed of
    (seed, stream, k) that leaves the rank out, and rows are then drawn from that kind's groups until a
    batch of it is full (a batch of another kind completed by leftover edit turns waits for its kind's
    turn). So every rank's batch of a step has one kind, as a sharded model needs (its ranks gather
    the same layers together, and an edit calls other layers than a text-to-image batch).

    A batch's cursor is the stream's cursor after its last draw, the batches yielded and, under "waiting",
    the cursor before the draw (and the kind drawn for) of every item still held (in a bucket, a finished
    batch waiting for its turn, or a later turn of the last edit chain); a restart re-reads those rows in
    their original order, so the restored stream yields exactly the batches the old one would have.
    """

    def __init__(
        self,
        groups: list[DataGroup],
        tokenizer: Any,
        config: Any,
        batch_size: int,
        max_tokens_per_sample: int | None = None,
        **mixture: Any,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        super().__init__(generation_groups(groups), tokenizer, config, max_tokens_per_sample, **mixture)
        self.batch_size = batch_size
        self.group_index = {g.name: i for i, g in enumerate(self.groups)}
        self.kinds = sorted({g.kind for g in self.groups})
        self.kind_groups = {k: [i for i, g in enumerate(self.groups) if g.kind == k] for k in self.kinds}
        weights = np.array([sum(self.groups[i].weight for i in self.kind_groups[k]) for k in self.kinds])
        self.kind_weights = weights / weights.sum()

    def scheduled_kind(self, stream: int, batch: int) -> str:
        """The kind of stream `stream`'s `batch`-th batch: the same on every rank."""
        rng = np.random.default_rng([self.seed, stream, batch])
        return self.kinds[int(rng.choice(len(self.kinds), p=self.kind_weights))]

    def _items(self, drawn: Any) -> list[GenerationItem]:
        index = self.group_index[drawn.group]
        return reader_items(drawn.sample, self.groups[index].kind, self.readers[index])

    def _batches(
        self, stream: int, num_streams: int, cursor: dict[str, Any] | None
    ) -> Iterator[PositionedBatch]:
        # draw -> (stream position before it, kind drawn for) for every draw with items still held
        before_draw: dict[int, tuple[dict[str, Any], str | None]] = {}
        waiting: deque[tuple[int, int, GenerationItem]] = deque()  # (draw, item index, item) not bucketed
        buckets: dict[tuple[str, tuple[int, int]], list[tuple[int, int, GenerationItem]]] = {}
        finished: dict[str, deque[list[tuple[int, int, GenerationItem]]]] = {k: deque() for k in self.kinds}
        bad_rows: list[BadRow] = []
        draws, yielded = 0, 0
        if cursor is not None:  # re-read the rows of the held items, oldest first
            yielded = cursor.get("batches", 0)
            for snapshot, indexes, *kind in cursor["waiting"]:
                among = self.kind_groups[kind[0]] if kind and kind[0] is not None else None
                items = self._items(self._stream(stream, num_streams, snapshot).draw(among))
                before_draw[draws] = (snapshot, kind[0] if kind else None)
                waiting.extend((draws, i, items[i]) for i in indexes)
                draws += 1
        state = self._stream(stream, num_streams, cursor)
        kind = self.scheduled_kind(stream, yielded)
        while True:
            if finished[kind]:
                entries = finished[kind].popleft()
                yielded += 1
                held = sorted(
                    [
                        *waiting,
                        *(e for b in buckets.values() for e in b),
                        *(e for queue in finished.values() for batch in queue for e in batch),
                    ],
                    key=lambda e: e[:2],
                )
                for draw in [d for d in before_draw if d not in {e[0] for e in held}]:
                    del before_draw[draw]
                by_draw: dict[int, list[int]] = {}
                for draw, index, _ in held:
                    by_draw.setdefault(draw, []).append(index)
                after = {
                    **state.snapshot(),
                    "batches": yielded,
                    "waiting": [[before_draw[d][0], by_draw[d], before_draw[d][1]] for d in by_draw],
                }
                batch = GenerationBatch.collate([item for _, _, item in entries])
                yield PositionedBatch(batch, stream, num_streams, after, bad_rows)
                bad_rows = []
                kind = self.scheduled_kind(stream, yielded)
                continue
            if not waiting:
                snapshot = state.snapshot()
                drawn = state.draw(self.kind_groups[kind])
                bad_rows += drawn.bad_rows
                before_draw[draws] = (snapshot, kind)
                waiting.extend((draws, i, item) for i, item in enumerate(self._items(drawn)))
                draws += 1
                continue
            entry = waiting.popleft()
            bucket = buckets.setdefault((entry[2].kind, entry[2].grid), [])
            bucket.append(entry)
            if len(bucket) == self.batch_size:
                finished[entry[2].kind].append(list(bucket))
                bucket.clear()


class ParquetGenerationDataModule(ResumableStreams, LightningDataModule):
    """Distillation batches from BAGEL-format parquet (real scale; see `ParquetGenerationStream`).

    Resumable like `InterleavedDataModule`: the cursor of every training batch the trainer consumes is
    kept and saved for every rank in checkpoints, so a restored run continues with exactly the next
    unseen batches (same world size and worker count required unless `strict_resume` is False). Bad rows
    are skipped and counted; a stream stops with `BadDataError` once more than `max_bad_fraction` of its
    rows were bad.

    Args:
        groups: t2i / edit `DataGroup`s (dicts with kind, paths, weight, parquet_info).
        tokenizer / model_config: as `InterleavedDataModule` (a checkpoint folder at real scale).
        batch_size: items per batch (1 at real scale lets every image keep its own size).
        val_groups: validation groups, read by rank 0's stream for `val_batches` batches.
        max_tokens_per_sample: rows whose sample exceeds this are skipped.
        seed: seeds the streams (with rank and worker).
        num_workers: DataLoader workers per rank.
        max_bad_fraction / bad_fraction_min_rows / strict_resume: as `InterleavedDataModule`.
    """

    def __init__(
        self,
        groups: list[DataGroup],
        tokenizer: str,
        model_config: str,
        batch_size: int = 1,
        val_groups: list[DataGroup] | None = None,
        val_batches: int = 8,
        max_tokens_per_sample: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        max_bad_fraction: float = 0.05,
        bad_fraction_min_rows: int = 100,
        strict_resume: bool = True,
    ) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer)
        self.config = load_model_config(model_config, self.tokenizer)
        self.groups = generation_groups(groups)
        self.val_groups = generation_groups(val_groups) if val_groups else []
        self.options = {
            "batch_size": batch_size,
            "seed": seed,
            "max_tokens_per_sample": max_tokens_per_sample,
            "max_bad_fraction": max_bad_fraction,
            "bad_fraction_min_rows": bad_fraction_min_rows,
        }
        self.val_batches = val_batches
        self.num_workers = num_workers
        self.positions = StreamPositions(strict_resume)

    def _stream(
        self, groups: list[DataGroup], position: DataPosition | None, rank: int = 0, world_size: int = 1
    ) -> ParquetGenerationStream:
        return ParquetGenerationStream(
            groups,
            self.tokenizer,
            self.config,
            rank=rank,
            world_size=world_size,
            position=position,
            **self.options,
        )

    def train_dataloader(self) -> DataLoader:
        # Fresh workers per iteration: each restart re-reads the shared position.
        position = self.positions.for_training(self, self.num_workers)
        stream = self._stream(self.groups, position, *rank_and_world(self))
        return DataLoader(stream, batch_size=None, collate_fn=_unwrap, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_groups:
            return []
        batches = []
        for positioned in self._stream(self.val_groups, None):  # rank 0's: the same batches every time
            batches.append(positioned.batch)
            if len(batches) == self.val_batches:
                break
        return DataLoader(batches, batch_size=None, collate_fn=_unwrap)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position after each training batch the trainer is about to consume."""
        if not isinstance(batch, PositionedBatch):
            return batch
        if self.trainer is None or self.trainer.training:
            self.positions.record(batch)
        return batch.batch
