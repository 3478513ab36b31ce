"""Classifier-free-guidance dropout of the conditioning blocks of generation samples.

As in BAGEL's packer, each conditioning block of a sample that generates an image (one holding a noisy
VAE image) is removed independently with its kind's probability, so the model also learns the
unconditional and partly conditional velocities that CFG combines at inference: captions and
instructions (text), ViT views and clean VAE views of input images. Blocks that carry a loss (noisy VAE
images, text with loss) are never dropped, and understanding samples are left whole (BAGEL marks none of
their blocks as droppable: without its question or image, an answer would be noise to learn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hyperbagel.backbone.packing import Sample, TextBlock, VaeImage, VitImage


@dataclass
class CfgDropout:
    """Drop probabilities per conditioning kind (BAGEL: text 0.1, ViT 0.3, clean VAE 0.3)."""

    text: float = 0.1
    vit: float = 0.3
    vae: float = 0.3

    def __post_init__(self) -> None:
        for name in ("text", "vit", "vae"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"CFG dropout probability {name}={getattr(self, name)} is not in [0, 1]")

    def probability(self, block: TextBlock | VitImage | VaeImage) -> float:
        """Drop probability of one block; 0 for blocks with a loss."""
        if isinstance(block, TextBlock):
            return 0.0 if block.loss else self.text
        if isinstance(block, VitImage):
            return self.vit
        return 0.0 if block.noisy else self.vae

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        """`sample` without its dropped blocks (a new list; blocks are shared, not copied)."""
        if not any(isinstance(block, VaeImage) and block.noisy for block in sample):
            return list(sample)
        draws = rng.random(len(sample))
        return [block for block, u in zip(sample, draws) if u >= self.probability(block)]
