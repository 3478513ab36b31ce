"""Plain image batches from the shapes world, for training the demo's autoencoder.

The autoencoder must reconstruct every image the later stages feed it: text-to-image renders and both
sides of editing pairs. The images are few and tiny, so they are rendered once in `setup` and kept in
memory as uint8.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from hyperbagel.datamodules.shapes import ShapesWorld
from hyperbagel.datamodules.shapes_scene import render_array


class ImageTensorDataset(Dataset):
    """uint8 images `[N, 3, H, W]` served one by one as float `[3, H, W]` in [-1, 1]."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index].float() / 127.5 - 1.0


def render_split(world: ShapesWorld, split: str, n: int) -> torch.Tensor:
    """`n` uint8 images `[n, 3, S, S]` of `split`: about half text-to-image renders, the rest edit pairs
    (source and target), so the autoencoder sees the scenes of both tasks."""
    if n < 1:
        raise ValueError(f"need at least one image for the {split} split, got n={n}")
    n_edit = (n - n // 2) // 2
    scenes = [s.scene for s in world.samples("t2i", split, n - 2 * n_edit)]
    for sample in world.samples("edit", split, n_edit):
        scenes += [sample.source, sample.target]
    pixels = np.stack([render_array(scene) for scene in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


class ShapesImageDataModule(LightningDataModule):
    """Batches `[B, 3, S, S]` in [-1, 1] of shapes-world renders: train split to train, val split to validate.

    Args:
        canvas_size: image side in pixels.
        seed: shapes-world seed (the splits themselves do not depend on it).
        num_train / num_val: images rendered per split.
        batch_size: images per batch.
        num_workers: DataLoader workers (0 is fastest for these in-memory images).
    """

    def __init__(
        self,
        canvas_size: int = 64,
        seed: int = 0,
        num_train: int = 4096,
        num_val: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.world = ShapesWorld(canvas_size=canvas_size, seed=seed)
        self.num_train = num_train
        self.num_val = num_val
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def make_dataset(self, split: str, n: int) -> Dataset:
        """The `n` items of `split` (a subclass serves other items from the same world)."""
        return ImageTensorDataset(render_split(self.world, split, n))

    def setup(self, stage: str) -> None:
        if self.train_dataset is None:
            self.train_dataset = self.make_dataset("train", self.num_train)
        if self.val_dataset is None:
            self.val_dataset = self.make_dataset("val", self.num_val)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size, num_workers=self.num_workers)
