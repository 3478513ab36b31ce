"""Pretraining the demo's vision encoder (standing in for BAGEL's SigLIP initialisation).

BAGEL starts its ViT from SigLIP, so its understanding expert reads features that already separate
objects. The demo's ViT is random, and a teacher trained from there binds shapes to colours slowly. This
stage gives it what SigLIP gives the real model, with the shapes world's exact labels: every ViT patch
token predicts, through a linear probe, the fraction of the patch's pixels covered by each (colour,
shape) identity or the background (soft cross-entropy). The probe is thrown away; the encoder is
exported under BAGEL's `vit_model.*` keys (`vit.safetensors` + `vit_config.json`), which
`BagelStage(vision_encoder=...)` loads into a preset model before the teacher trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from hyperbagel.backbone.checkpoint import save_vision_encoder
from hyperbagel.backbone.vision import SiglipNaViT
from hyperbagel.datamodules.shapes_scene import IDENTITIES
from hyperbagel.datamodules.shapes_vision import vision_config
from hyperbagel.lightning_modules.base import default_optimizer, log_loss_terms, optimizer_config

NUM_CLASSES = len(IDENTITIES) + 1  # background, then every (colour, shape)
# A patch counts as showing an object (for the accuracy metric) when less than this much is background.
FOREGROUND_PATCH = 0.5


def patch_histograms(labels: torch.Tensor, patch: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Identity maps `[B, H, W]` -> per-patch class fractions `[B, (H/p)*(W/p), C]`, patches in row-major
    order (the order the ViT packs them in)."""
    one_hot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    fractions = F.avg_pool2d(one_hot, patch)  # [B, C, H/p, W/p]
    return fractions.flatten(2).transpose(1, 2)


class VisionEncoderStage(LightningModule):
    """Trains a `SiglipNaViT` (the preset's `vit_model`) to name what covers each of its patches.

    Args:
        model_config: preset name or checkpoint folder whose ViT is built (random init).
        optimizer / lr_scheduler: from YAML, called with the encoder's and the probe's parameters.
        export_dir: where `vit.safetensors` and `vit_config.json` are written on every checkpoint save and
            at fit end.
    """

    def __init__(
        self,
        model_config: str = "shapes",
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        config = vision_config(model_config)
        self.vit_config = config.vit
        self.vit_model = SiglipNaViT(config.vit, config.vit_max_num_patch_per_side)
        self.probe = nn.Linear(config.vit.hidden_size, NUM_CLASSES)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.export_dir = Path(export_dir) if export_dir is not None else None

    def configure_optimizers(self) -> Any:
        return optimizer_config(self.optimizer_factory, self.scheduler_factory, self.parameters())

    def compute_losses(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        if images.ndim != 4 or labels.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(
                f"expected images [B, 3, H, W] and identity maps [B, H, W], got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        features, _, _ = self.vit_model.encode_images(list(images))
        logits = self.probe(features).float().reshape(images.shape[0], -1, NUM_CLASSES)
        target = patch_histograms(labels, self.vit_config.patch_size)
        loss = -(target * logits.log_softmax(-1)).sum(-1).mean()
        with torch.no_grad():
            foreground = target[..., 0] < FOREGROUND_PATCH
            correct = logits.argmax(-1) == target.argmax(-1)
            accuracy = correct[foreground].float().mean() if foreground.any() else correct.float().mean()
        return {"loss": loss, "foreground_patch_accuracy": accuracy}

    def _log_terms(self, losses: dict[str, torch.Tensor], stage: str, batch_size: int) -> None:
        log_loss_terms(self, losses, stage, batch_size, prog_bar=tuple(losses))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"non-finite vision-encoder loss at step {self.global_step}")
        self._log_terms(losses, "train", batch[0].shape[0])
        return losses["loss"]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._log_terms(self.compute_losses(batch), "val", batch[0].shape[0])

    # --- export --------------------------------------------------------------------------------------
    def export(self, folder: str | Path) -> None:
        """Write the encoder under BAGEL's `vit_model.*` keys and its SigLIP config (see checkpoint.py)."""
        save_vision_encoder(folder, self.vit_model, self.vit_config)

    def _export(self) -> None:
        if self.export_dir is not None and self.trainer.is_global_zero:
            self.export(self.export_dir)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._export()

    def on_fit_end(self) -> None:
        self._export()
