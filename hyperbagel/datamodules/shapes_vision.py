"""Images with per-pixel object identities from the shapes world, for pretraining the vision encoder.

BAGEL's ViT starts from SigLIP, a pretrained encoder that already sees objects; the demo's ViT starts
from scratch, and learning to see shapes only through one-word answers is slow (a from-scratch model
binds a shape to its colour far more slowly than it reads a colour). This datamodule serves what a
dense pretraining objective needs instead: the image exactly as the teacher's ViT branch receives it
(`vit_input`) and, at the same size, which (colour, shape) identity covers each pixel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from hyperbagel.backbone.checkpoint import load_config
from hyperbagel.backbone.config import PRESETS, BagelConfig, preset
from hyperbagel.backbone.image_transforms import vit_input
from hyperbagel.datamodules.shapes import ShapesWorld
from hyperbagel.datamodules.shapes_images import ShapesImageDataModule
from hyperbagel.datamodules.shapes_scene import Scene, identity_map, render_array


def vision_config(model_config: str) -> BagelConfig:
    """A preset's or a checkpoint folder's config (only its ViT settings matter here)."""
    return preset(model_config) if model_config in PRESETS else load_config(model_config)


def vision_scenes(world: ShapesWorld, split: str, n: int) -> list[Scene]:
    """`n` scenes of `split`, a third each from understanding, text-to-image and editing (source and
    target), so the encoder sees every kind of image the teacher's ViT branch reads."""
    if n < 3:
        raise ValueError(f"need at least 3 scenes for the {split} split, got n={n}")
    n_vqa, n_edit = n // 3, n // 6
    scenes = [s.scene for s in world.samples("vqa", split, n_vqa)]
    for sample in world.samples("edit", split, n_edit):
        scenes += [sample.source, sample.target]
    scenes += [s.scene for s in world.samples("t2i", split, n - len(scenes))]
    return scenes


class IdentityMapDataset(Dataset):
    """Rendered scenes as (ViT input `[3, H, W]` in [-1, 1], identity map `[H, W]` int64)."""

    def __init__(self, scenes: list[Scene], config: BagelConfig) -> None:
        self.canvases = np.stack([render_array(scene) for scene in scenes])
        self.maps = np.stack([identity_map(scene) for scene in scenes])
        self.config = config

    def __len__(self) -> int:
        return len(self.canvases)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = vit_input(Image.fromarray(self.canvases[index]), self.config)
        labels = torch.from_numpy(self.maps[index]).long()
        if tuple(labels.shape) != tuple(pixels.shape[1:]):
            labels = F.interpolate(labels[None, None].float(), size=pixels.shape[1:], mode="nearest")[0, 0]
        return pixels, labels.long()


class ShapesVisionDataModule(ShapesImageDataModule):
    """Batches of (ViT inputs `[B, 3, H, W]`, identity maps `[B, H, W]`) of shapes-world scenes.

    Args:
        model_config: preset name or checkpoint folder whose ViT input rules (sizes, stride) apply.
        **kwargs: the world and loader settings of `ShapesImageDataModule` (canvas_size, seed, num_train,
            num_val, batch_size, num_workers).
    """

    def __init__(self, model_config: str = "shapes", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = vision_config(model_config)

    def make_dataset(self, split: str, n: int) -> IdentityMapDataset:
        return IdentityMapDataset(vision_scenes(self.world, split, n), self.config)
