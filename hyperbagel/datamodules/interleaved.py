"""Lightning data module over weighted groups of BAGEL-format data, packed, resumable (`resumable.py`).

A batch is one `TrainingPack` (one packed row). The module records the cursor of every training pack
the trainer actually consumes (`on_before_batch_transfer` runs in the main process just before the
step), and Lightning stores `state_dict()` in each checkpoint, so a restored run restarts every data
stream right after its last consumed pack: no sample is repeated or skipped. Under DDP the state holds
every rank's position (gathered when the checkpoint is written); restoring needs the same world size
and number of workers, since those decide which rows each stream reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
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
    TrainingPack,
    keep_pack,
    normalise_groups,
)
from hyperbagel.datamodules.resumable import ResumableStreams, StreamPositions, rank_and_world
from hyperbagel.datamodules.shapes_tokenizer import build_shapes_tokenizer


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
