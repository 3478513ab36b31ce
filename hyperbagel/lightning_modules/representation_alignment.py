"""Representation alignment (REPA, Yu et al. 2024) for the denoising tokens of a unified model.

A small MLP projects the hidden states that an early decoder layer holds at every noisy latent token onto
the patch features that a frozen, pretrained vision encoder computes from the *clean* image at the same
place; the loss is one minus their mean cosine similarity. Why: a from-scratch teacher learns to denoise
quickly but learns what object covers which place slowly (README, "Where the teacher stands"), and the
encoder's patch features are exactly that (the REPA paper reports 17.5x faster SiT training with DINOv2
features; on the shapes teacher's 28-minute text-to-image run it did not help, README). Here the encoder
is the vision-encoder stage's output (SigLIP in a real BAGEL). The projector is a training-only side
model: it is never exported and the sampler never runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hyperbagel.backbone.vision import SiglipNaViT


class RepresentationAlignment(nn.Module):
    """Frozen patch encoder + trainable projector; `loss` compares projected states with encoder features.

    Args:
        encoder: the frozen target encoder (its parameters are set to not require gradients here).
        hidden_size: width of the backbone states being aligned.
        projector_dim: width of the projector's two hidden layers (REPA: three linear layers with SiLU).
    """

    def __init__(self, encoder: SiglipNaViT, hidden_size: int, projector_dim: int = 512) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        feature_dim = encoder.config.hidden_size
        self.projector = nn.Sequential(
            nn.Linear(hidden_size, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, feature_dim),
        )

    def train(self, mode: bool = True) -> RepresentationAlignment:
        """The encoder stays in eval mode: it is a fixed target, not a model being trained."""
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def targets(self, images: list[torch.Tensor], grids: list[tuple[int, int]]) -> torch.Tensor:
        """Encoder features [sum of h*w, feature dim] of `images` ([3, H, W] in [-1, 1]) pooled onto each
        image's latent token grid (h, w) in raster order, the order of its latent tokens in a pack.

        An image is first resized to the nearest multiple of the encoder's patch (BAGEL's latent stride 16
        against SigLIP's 14); area pooling then maps the encoder's patch grid onto the latent grid."""
        patch = self.encoder.config.patch_size
        dtype = next(self.encoder.parameters()).dtype
        inputs = []
        for image in images:
            size = tuple(max(1, round(side / patch)) * patch for side in image.shape[-2:])
            if size != tuple(image.shape[-2:]):
                image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
            inputs.append(image.to(dtype))
        features, cu_seqlens, _ = self.encoder.encode_images(inputs)
        pooled = []
        for i, (image, (h, w)) in enumerate(zip(inputs, grids, strict=True)):
            grid = features[cu_seqlens[i] : cu_seqlens[i + 1]]
            grid = grid.T.reshape(-1, image.shape[-2] // patch, image.shape[-1] // patch)
            pooled.append(F.adaptive_avg_pool2d(grid.float(), (h, w)).flatten(1).T)
        return torch.cat(pooled)

    def loss(
        self, features: torch.Tensor, images: list[torch.Tensor], grids: list[tuple[int, int]]
    ) -> torch.Tensor:
        """1 - mean cosine similarity between projected `features` [N, hidden] (the latent tokens of
        `images`, in order) and the encoder's pooled features of the clean images."""
        target = self.targets(images, grids)
        if target.shape[0] != features.shape[0]:
            raise ValueError(
                f"{features.shape[0]} latent-token features for images whose grids hold "
                f"{target.shape[0]} tokens"
            )
        projected = self.projector(features).float()
        return 1.0 - F.cosine_similarity(projected, target, dim=-1).mean()
