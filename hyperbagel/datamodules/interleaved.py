"""Lightning data module over weighted groups of BAGEL-format data, packed, resumable.

A batch is one `TrainingPack` (one packed row). The module records the cursor of every training pack
the trainer actually consumes (`on_before_batch_transfer` runs in the main process just before the
step), and Lightning stores `state_dict()` in each checkpoint, so a restored run restarts every data
stream right after its last consumed pack: no sample is repeated or skipped. Under DDP the state holds
every rank's position (gathered when the checkpoint is written); restoring needs the same world size
and number of workers, since those decide which rows each stream reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from hyperbagel.backbone.checkpoint import load_config
from hyperbagel.backbone.checkpoint import load_tokenizer as load_folder_tokenizer
from hyperbagel.backbone.config import BagelConfig, SpecialTokenIds, preset
from hyperbagel.datamodules.cfg_dropout import CfgDropout
from hyperbagel.datamodules.packed_dataset import (
    DataGroup,
    DataPosition,
    PackedDataset,
    StreamItem,
    TrainingPack,
    keep_pack,
    normalise_groups,
)
from hyperbagel.datamodules.readers import BadRow
from hyperbagel.datamodules.shapes_tokenizer import build_shapes_tokenizer

STATE_VERSION = 1
LOGGED_BAD_ROWS = 20  # per rank and process; later ones are only counted
log = logging.getLogger(__name__)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """ "shapes" for the shapes world's word tokenizer, else a local folder with tokenizer files."""
    if name == "shapes":
        return build_shapes_tokenizer()
    return load_folder_tokenizer(name)


def load_model_config(name: str, tokenizer: PreTrainedTokenizerBase) -> BagelConfig:
    """A preset name or a checkpoint folder; the special token ids are the tokenizer's.

    Presets carry placeholder special ids, so they take the tokenizer's; a checkpoint folder's ids must
    already agree with its tokenizer's, or its model would read our packs wrongly.
    """
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    if Path(name).is_dir():
        config = load_config(name)
        if config.special_tokens != specials:
            raise ValueError(
                f"special token ids of {name} ({config.special_tokens.to_dict()}) differ from the "
                f"tokenizer's ({specials.to_dict()})"
            )
        return config
    config = preset(name).copy()
    config.special_tokens = specials
    return config


def rank_and_world(module: LightningDataModule) -> tuple[int, int]:
    trainer = module.trainer
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamPositions:
    """A data module's resumable position over `GroupMixture` streams: this rank's `DataPosition`,
    recorded for each training item the trainer consumes, saved for every rank in checkpoints and
    handed back to the next training loader after a restore.

    Args:
        strict_resume: on a restore with another world size or worker count, raise (True) or warn and
            restart the data streams from the beginning (False).
    """

    def __init__(self, strict_resume: bool = True) -> None:
        self.strict_resume = strict_resume
        self.position = DataPosition()
        self.bad_rows: list[BadRow] = []
        self._restored: dict[str, Any] | None = None

    def record(self, item: StreamItem) -> None:
        """Keep the position after a training item about to be consumed (and its skipped rows, the
        first `LOGGED_BAD_ROWS` of them also logged with file, row and reason)."""
        self.position.record(item)
        for number, bad in enumerate(item.bad_rows, start=len(self.bad_rows) + 1):
            if number > LOGGED_BAD_ROWS:
                break
            log.warning("skipped bad data row %d: %s", number, bad)
            if number == LOGGED_BAD_ROWS:
                log.warning("further bad rows are counted (data/bad_rows), not logged")
        self.bad_rows += item.bad_rows

    def for_training(self, module: LightningDataModule, num_workers: int) -> DataPosition:
        """The position a new training loader starts from: the restored one, once, after a restore."""
        if self._restored is not None:
            self.position = self._position_from_state(module, self._restored, num_workers)
            self._restored = None
        return self.position

    def _local_state(self) -> dict[str, Any]:
        return {
            "cursors": dict(self.position.cursors),
            "next_stream": self.position.next_stream,
            "num_streams": self.position.num_streams,
        }

    def state_dict(self, module: LightningDataModule) -> dict[str, Any]:
        """Every rank's data position (a collective under DDP: Lightning calls it on all ranks)."""
        local = self._local_state() if self._restored is None else self._restored_local(module)
        rank, world_size = rank_and_world(module)
        ranks = [local]
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * world_size
            torch.distributed.all_gather_object(ranks, local)
        return {"version": STATE_VERSION, "world_size": world_size, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"unknown data-position state version {state_dict.get('version')}")
        self._restored = state_dict

    def _restored_local(self, module: LightningDataModule) -> dict[str, Any]:
        rank, _ = rank_and_world(module)
        ranks = self._restored["ranks"]
        return ranks[rank] if rank < len(ranks) else {"cursors": {}, "next_stream": 0, "num_streams": None}

    def _position_from_state(
        self, module: LightningDataModule, state: dict[str, Any], num_workers: int
    ) -> DataPosition:
        _, world_size = rank_and_world(module)
        local = self._restored_local(module)
        streams = max(1, num_workers)
        saved_streams = local["num_streams"]
        if state["world_size"] != world_size or saved_streams not in (None, streams):
            message = (
                f"the data position was saved with world size {state['world_size']} and {saved_streams} "
                f"streams (dataloader workers) per rank; this run has world size {world_size} and {streams}"
            )
            if self.strict_resume:
                raise ValueError(message + "; set strict_resume=False to restart the data streams instead")
            rank_zero_warn(message + ": restarting the data streams from their beginning (samples repeat)")
            return DataPosition()
        return DataPosition(
            cursors=dict(local["cursors"]), next_stream=local["next_stream"], num_streams=saved_streams
        )


class ResumableStreams:
    """For data modules over `GroupMixture` streams (`self.positions`): the position, the bad-row
    figures and the checkpoint state, as Lightning and the stages read them."""

    positions: StreamPositions

    @property
    def position(self) -> DataPosition:
        """This rank's position after the last consumed training batch."""
        return self.positions.position

    @property
    def bad_rows(self) -> list[BadRow]:
        """Bad rows skipped while filling the training batches consumed in this process (this rank)."""
        return list(self.positions.bad_rows)

    @property
    def bad_row_count(self) -> int:
        """Bad rows skipped on this rank since training began (restored across checkpoints)."""
        return self.position.bad_row_count()

    @property
    def rows_read(self) -> int:
        """Rows read on this rank since training began (restored across checkpoints)."""
        return self.position.rows_read()

    def state_dict(self) -> dict[str, Any]:
        return self.positions.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.positions.load_state_dict(state_dict)


class InterleavedDataModule(ResumableStreams, LightningDataModule):
    """Packed batches of a weighted mixture of BAGEL-format groups.

    Args:
        groups: training groups (`DataGroup`s or dicts with its fields: kind, paths, weight, name,
            parquet_info, image_root).
        tokenizer: "shapes" or a folder with tokenizer files.
        model_config: a preset name (`hyperbagel.backbone.config.preset`) or a checkpoint folder; it
            decides the resize rules and token counts of images.
        val_groups: validation groups, read once each per validation (no shuffle, no CFG dropout).
        expected_tokens / max_tokens / max_tokens_per_sample: packing budgets (BAGEL: 32768 / 36864 /
            16384).
        text_dropout / vit_dropout / vae_dropout: CFG dropout of conditioning blocks of generation
            samples.
        seed: seeds every data stream (with the rank, worker and draw number).
        num_workers: dataloader workers per rank; each one is a separate data stream.
        max_bad_fraction: a data stream stops with `BadDataError` once more than this fraction of the
            rows it read were bad, after `bad_fraction_min_rows` rows.
        strict_resume: on a restore with another world size or worker count, raise (True) or warn
            and restart the data streams from the beginning (False).
    """

    def __init__(
        self,
        groups: list[DataGroup],
        tokenizer: str,
        model_config: str,
        val_groups: list[DataGroup] | None = None,
        expected_tokens: int = 32768,
        max_tokens: int = 36864,
        max_tokens_per_sample: int = 16384,
        text_dropout: float = 0.1,
        vit_dropout: float = 0.3,
        vae_dropout: float = 0.3,
        seed: int = 0,
        num_workers: int = 0,
        max_bad_fraction: float = 0.05,
        bad_fraction_min_rows: int = 100,
        strict_resume: bool = True,
    ) -> None:
        super().__init__()
        self.groups = normalise_groups(groups)
        self.val_groups = normalise_groups(val_groups) if val_groups else []
        self.tokenizer = load_tokenizer(tokenizer)
        self.config = load_model_config(model_config, self.tokenizer)
        self.budgets = {
            "expected_tokens": expected_tokens,
            "max_tokens": max_tokens,
            "max_tokens_per_sample": max_tokens_per_sample,
        }
        self.dropout = CfgDropout(text=text_dropout, vit=vit_dropout, vae=vae_dropout)
        self.seed = seed
        self.num_workers = num_workers
        self.max_bad_fraction = max_bad_fraction
        self.bad_fraction_min_rows = bad_fraction_min_rows
        self.positions = StreamPositions(strict_resume)

    # --- data -----------------------------------------------------------------------------------------
    def _dataset(
        self, groups: list[DataGroup], infinite: bool, position: DataPosition | None
    ) -> PackedDataset:
        rank, world_size = rank_and_world(self)
        return PackedDataset(
            groups,
            self.tokenizer,
            self.config,
            **self.budgets,
            dropout=self.dropout,
            seed=self.seed,
            infinite=infinite,
            rank=rank,
            world_size=world_size,
            position=position,
            max_bad_fraction=self.max_bad_fraction,
            bad_fraction_min_rows=self.bad_fraction_min_rows,
        )

    def _loader(self, dataset: PackedDataset) -> DataLoader:
        # Fresh workers per iteration: each restart re-reads the shared position (persistent workers
        # would resume from the stale copy they were started with).
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=keep_pack)

    def train_dataloader(self) -> DataLoader:
        position = self.positions.for_training(self, self.num_workers)
        return self._loader(self._dataset(self.groups, infinite=True, position=position))

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_groups:
            return []
        return self._loader(self._dataset(self.val_groups, infinite=False, position=None))

    # --- bookkeeping ----------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position after each training pack the trainer is about to consume."""
        if isinstance(batch, TrainingPack) and batch.cursor is not None:
            self.positions.record(batch)
        return batch
