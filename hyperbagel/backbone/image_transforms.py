"""BAGEL's image resize rule, shared by training data and inference.

An image is scaled (aspect kept) so its longer side is at most `max_size` and its shorter side at least
`min_size`, then each side is rounded to a multiple of `stride` (16 px for the VAE: 8x downsampling times
the 2x2 latent patch; 14 px for the ViT patch). Training and inference must agree on it, or the model sees
sizes at test time it never saw in training.
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from hyperbagel.backbone.config import BagelConfig


def target_size(width: int, height: int, stride: int, max_size: int, min_size: int) -> tuple[int, int]:
    """(width, height) after BAGEL's scale-then-round rule; each side is at least one stride."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image has an empty side: {width}x{height}")
    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    new_width = max(stride, round(width * scale / stride) * stride)
    new_height = max(stride, round(height * scale / stride) * stride)
    return new_width, new_height


def resize_to_stride(image: Image.Image, stride: int, max_size: int, min_size: int) -> Image.Image:
    """RGB copy of `image` resized by `target_size` (bicubic, as BAGEL's transform)."""
    size = target_size(image.width, image.height, stride, max_size, min_size)
    image = image.convert("RGB")
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float tensor in [-1, 1]."""
    return TF.to_tensor(image.convert("RGB")) * 2.0 - 1.0


def vae_input(image: Image.Image, config: BagelConfig) -> torch.Tensor:
    """An image prepared for the VAE branch of `config`'s model."""
    resized = resize_to_stride(
        image, config.image_stride, config.vae_max_image_size, config.vae_min_image_size
    )
    return pil_to_tensor(resized)


def vit_input(image: Image.Image, config: BagelConfig) -> torch.Tensor:
    """An image prepared for the ViT branch of `config`'s model."""
    resized = resize_to_stride(
        image, config.vit_patch_size, config.vit_max_image_size, config.vit_min_image_size
    )
    return pil_to_tensor(resized)
