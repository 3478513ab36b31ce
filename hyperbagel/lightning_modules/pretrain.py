"""Stage 0: BAGEL's own training objective (pre-training or fine-tuning the teacher).

Next-token cross-entropy on text blocks that carry a loss and velocity MSE on noisy latents, weighted as
configured (BAGEL pre-training uses CE:MSE = 0.25:1), with logit-normal timesteps and a timestep shift
(1.0 in pre-training, 4.0 later in BAGEL's recipe). The same stage fine-tunes a real BAGEL checkpoint
when `model` points at its folder.
"""

from __future__ import annotations

from typing import Any

import torch

from hyperbagel.backbone.packing import PackedSequence
from hyperbagel.lightning_modules.base import BagelStage


def packed_of(batch: Any) -> PackedSequence:
    """The packed sequence inside a batch (a bare `PackedSequence` or a wrapper holding one as `.packed`)."""
    return batch if isinstance(batch, PackedSequence) else batch.packed


class PretrainStage(BagelStage):
    """Trains the whole unified model on packed interleaved data with CE + velocity MSE.

    Args:
        ce_weight / mse_weight: weights of the two losses in the optimised total.
        timestep_shift: shift applied to the logit-normal training times.
        uniform_time_fraction: share of noisy images trained at a uniform time instead (0 = BAGEL's draw);
            keeps the last, low-noise sampler steps trained under a large shift (on the shapes
            memorisation probe 0.25 did worse than 0; README, "Where the teacher stands").
        val_seed: fixes validation noise and times so validation losses are comparable across epochs.
        **kwargs: everything `BagelStage` takes (model, optimizer, trainable parameters, ...).
    """

    def __init__(
        self,
        ce_weight: float = 0.25,
        mse_weight: float = 1.0,
        timestep_shift: float = 1.0,
        uniform_time_fraction: float = 0.0,
        val_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ce_weight = ce_weight
        self.mse_weight = mse_weight
        self.timestep_shift = timestep_shift
        self.uniform_time_fraction = uniform_time_fraction
        self.val_seed = val_seed

    def compute_losses(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        packed = packed_of(batch)
        generator = None
        if stage == "val":
            generator = torch.Generator(device=self.device).manual_seed(self.val_seed)
        losses = self.model.training_losses(
            packed, self.timestep_shift, generator, self.uniform_time_fraction
        )
        total = self.ce_weight * losses.ce + self.mse_weight * losses.mse
        return {
            "loss": total,
            "ce": losses.ce,
            "mse": losses.mse,
            "ce_tokens": torch.tensor(float(losses.num_ce_tokens)),
            "mse_tokens": torch.tensor(float(losses.num_mse_tokens)),
        }
