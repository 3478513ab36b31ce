"""Stage 0: BAGEL's own training objective (pre-training or fine-tuning the teacher).

Next-token cross-entropy on text blocks that carry a loss and velocity MSE on noisy latents, weighted as
configured (BAGEL pre-training uses CE:MSE = 0.25:1), with logit-normal timesteps and a timestep shift
(1.0 in pre-training, 4.0 later in BAGEL's recipe). The same stage fine-tunes a real BAGEL checkpoint
when `model` points at its folder.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hyperbagel.backbone.checkpoint import load_vision_encoder
from hyperbagel.backbone.packing import PackedSequence
from hyperbagel.backbone.vision import SiglipNaViT
from hyperbagel.lightning_modules.base import BagelStage, optimizer_config
from hyperbagel.lightning_modules.representation_alignment import RepresentationAlignment


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
        alignment_encoder: folder of a pretrained vision encoder (the vision-encoder stage's output) whose
            patch features of each clean image the noisy latent tokens' states are aligned with (REPA,
            `representation_alignment.py`); None turns the term off (BAGEL's own objective).
        alignment_weight: weight of the alignment loss in the total.
        alignment_layer: k, the decoder layer whose input (the output of the first k layers) is aligned.
        alignment_projector_dim: hidden width of the alignment projector (a side model, never exported).
        **kwargs: everything `BagelStage` takes (model, optimizer, trainable parameters, ...).
    """

    def __init__(
        self,
        ce_weight: float = 0.25,
        mse_weight: float = 1.0,
        timestep_shift: float = 1.0,
        uniform_time_fraction: float = 0.0,
        val_seed: int = 0,
        alignment_encoder: str | None = None,
        alignment_weight: float = 0.5,
        alignment_layer: int = 3,
        alignment_projector_dim: int = 512,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ce_weight = ce_weight
        self.mse_weight = mse_weight
        self.timestep_shift = timestep_shift
        self.uniform_time_fraction = uniform_time_fraction
        self.val_seed = val_seed
        self.alignment_encoder = alignment_encoder
        self.alignment_weight = alignment_weight
        self.alignment_layer = alignment_layer
        self.alignment_projector_dim = alignment_projector_dim
        self.alignment: RepresentationAlignment | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.alignment_encoder is None:
            return
        config = self.model.config
        num_layers = config.llm.num_hidden_layers
        if not 1 <= self.alignment_layer < num_layers:
            raise ValueError(f"alignment_layer={self.alignment_layer} must lie in [1, {num_layers - 1}]")
        encoder = SiglipNaViT(config.vit, config.vit_max_num_patch_per_side)
        load_vision_encoder(self.alignment_encoder, encoder)
        self.alignment = RepresentationAlignment(encoder, config.hidden_size, self.alignment_projector_dim)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The backbone's trainable parameters (not the alignment projector, a side model)."""
        return [(n, p) for n, p in super().trainable_named_parameters() if not n.startswith("alignment.")]

    def configure_optimizers(self) -> Any:
        params = [p for _, p in self.trainable_named_parameters()]
        if self.alignment is not None:
            params += list(self.alignment.projector.parameters())
        return optimizer_config(self.optimizer_factory, self.scheduler_factory, params)

    def compute_losses(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        packed = packed_of(batch)
        generator = None
        if stage == "val":
            generator = torch.Generator(device=self.device).manual_seed(self.val_seed)
        feature_layer = None if self.alignment is None else self.alignment_layer
        losses = self.model.training_losses(
            packed, self.timestep_shift, generator, self.uniform_time_fraction, feature_layer
        )
        total = self.ce_weight * losses.ce + self.mse_weight * losses.mse
        terms = {
            "ce": losses.ce,
            "mse": losses.mse,
            "ce_tokens": torch.tensor(float(losses.num_ce_tokens)),
            "mse_tokens": torch.tensor(float(losses.num_mse_tokens)),
        }
        if losses.noisy_features is not None:
            terms["alignment"] = self.alignment_loss(packed, losses.noisy_features)
            total = total + self.alignment_weight * terms["alignment"]
        return {"loss": total, **terms}

    def alignment_loss(self, packed: PackedSequence, features: torch.Tensor) -> torch.Tensor:
        """REPA term over the pack's noisy images (their pixels are the encoder's input)."""
        images, grids = [], []
        for index, (image, grid) in enumerate(zip(packed.vae_images, packed.vae_grids, strict=True)):
            if not image.noisy:
                continue
            if image.pixels is None:
                raise ValueError(
                    f"noisy VAE image {index} of the pack holds precomputed latents; representation "
                    "alignment needs its pixels (set alignment_encoder=None or pass pixels)"
                )
            images.append(image.pixels.to(self.device))
            grids.append(grid)
        return self.alignment.loss(features, images, grids)
