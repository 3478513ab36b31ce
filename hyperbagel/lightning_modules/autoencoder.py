"""Training the demo's small image autoencoder (the stage before the teacher when no FLUX VAE is used).

A KL-regularised autoencoder (BAGEL's FLUX architecture, scaled down) learns to reconstruct images
with an L1 or MSE loss, optionally plus an L1 loss on image gradients that keeps flat-colour edges
crisp. Its latents are then normalised as FLUX's are: `shift_factor` is the mean and `scale_factor` the
inverse standard deviation of the raw latents of a fixed set of training images, so the generator sees
roughly unit-variance latents. The factors are recomputed whenever the stage saves (checkpoint or fit
end), stored in the checkpoint, and exported with the weights as `ae.safetensors` + `ae_config.json`,
the pair `BagelAutoencoder.from_file` and the later stages load.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import IterableDataset
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchvision.utils import make_grid

from hyperbagel.backbone.autoencoder import AutoencoderConfig, BagelAutoencoder
from hyperbagel.backbone.config import preset
from hyperbagel.lightning_modules.base import log_loss_terms

SHAPES_AUTOENCODER = preset("shapes").vae.to_dict()  # one definition: the demo preset's autoencoder
RECONSTRUCTION_LOSSES = ("l1", "mse")


def image_gradient_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of horizontal and vertical finite differences (penalises blurred edges)."""
    return sum((pred.diff(dim=dim) - target.diff(dim=dim)).abs().mean() for dim in (-2, -1))


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename it over `path`, so a reader or a crash
    never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class AutoencoderStage(LightningModule):
    """Trains a `BagelAutoencoder` on batches of images `[B, 3, H, W]` in [-1, 1].

    Args:
        config: `AutoencoderConfig` fields; default the shapes preset's (downsample 4, 4 latent channels).
        lr: peak AdamW learning rate, reached after `warmup_steps` and decayed to zero by a cosine over
            the run (`trainer.max_steps` / epochs).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        kl_weight: weight of the posterior's KL to N(0, 1), summed over latent elements and averaged over
            the batch (as in LDM/FLUX autoencoder training; it only keeps the latents tame).
        reconstruction_loss: "l1" or "mse", averaged over pixels.
        gradient_weight: weight of the L1 loss on image gradients (0 disables it).
        normalisation_images: training images (evenly spaced over the training set) whose raw latents set
            `shift_factor` / `scale_factor`.
        export_dir: where `ae.safetensors` and `ae_config.json` are written on every save and at fit end.
        num_logged_images: originals (top row) and reconstructions (bottom row) logged at validation.
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        lr: float = 2e-3,
        warmup_steps: int = 20,
        weight_decay: float = 0.0,
        kl_weight: float = 1e-6,
        reconstruction_loss: str = "l1",
        gradient_weight: float = 0.5,
        normalisation_images: int = 256,
        export_dir: str | None = None,
        num_logged_images: int = 8,
    ) -> None:
        super().__init__()
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"reconstruction_loss must be one of {RECONSTRUCTION_LOSSES}, got {reconstruction_loss!r}"
            )
        if normalisation_images < 2:
            raise ValueError(f"normalisation_images must be at least 2, got {normalisation_images}")
        self.save_hyperparameters()
        self.autoencoder = BagelAutoencoder(AutoencoderConfig.from_dict(config or SHAPES_AUTOENCODER))
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.weight_decay = weight_decay
        self.kl_weight = kl_weight
        self.reconstruction_loss = reconstruction_loss
        self.gradient_weight = gradient_weight
        self.normalisation_images = normalisation_images
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.num_logged_images = num_logged_images

    @property
    def config(self) -> AutoencoderConfig:
        return self.autoencoder.config

    # --- optimisation --------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.autoencoder.parameters(), lr=self.lr, betas=(0.9, 0.99), weight_decay=self.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, min(self.warmup_steps, total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- steps ---------------------------------------------------------------------------------------
    def _checked(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected image batches [B, {self.config.in_channels}, H, W], got {tuple(images.shape)}"
            )
        return images

    def compute_losses(
        self, images: torch.Tensor, sample: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Loss terms (total under "loss") and the reconstruction; `sample` draws latents from the
        posterior (training) instead of taking its mode (validation, and what `encode` does)."""
        images = self._checked(images)
        posterior = self.autoencoder.vae.encode(images).latent_dist
        latents = posterior.sample() if sample else posterior.mode()
        recon = self.autoencoder.vae.decode(latents).sample.float()
        target = images.float()
        if self.reconstruction_loss == "l1":
            reconstruction = (recon - target).abs().mean()
        else:
            reconstruction = (recon - target).pow(2).mean()
        kl = posterior.kl().float().mean()
        losses = {"reconstruction": reconstruction, "kl": kl}
        loss = reconstruction + self.kl_weight * kl
        if self.gradient_weight > 0:
            losses["gradient"] = image_gradient_l1(recon, target)
            loss = loss + self.gradient_weight * losses["gradient"]
        losses["loss"] = loss
        with torch.no_grad():
            losses["psnr"] = peak_signal_noise_ratio(recon.detach().clamp(-1, 1), target, data_range=2.0)
        return losses, recon

    def _log_terms(self, losses: dict[str, torch.Tensor], stage: str, batch_size: int) -> None:
        log_loss_terms(self, losses, stage, batch_size, prog_bar=("loss", "psnr"))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        losses, _ = self.compute_losses(batch, sample=True)
        self._log_terms(losses, "train", batch.shape[0])
        return losses["loss"]

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        losses, recon = self.compute_losses(batch, sample=False)
        self._log_terms(losses, "val", batch.shape[0])
        if batch_idx == 0:
            self._log_reconstructions(batch, recon)

    def _log_reconstructions(self, images: torch.Tensor, recon: torch.Tensor) -> None:
        if not isinstance(self.logger, TensorBoardLogger) or self.num_logged_images <= 0:
            return
        n = min(self.num_logged_images, images.shape[0])
        pairs = torch.cat([images[:n].float(), recon[:n].clamp(-1, 1)]).cpu()
        grid = make_grid((pairs + 1.0) / 2.0, nrow=n, padding=2, pad_value=0.5)
        self.logger.experiment.add_image("val/reconstructions", grid, self.global_step)

    # --- latent normalisation ------------------------------------------------------------------------
    def normalisation_batch(self) -> torch.Tensor | None:
        """`normalisation_images` images evenly spaced over the training set; None when the trainer has no
        training data loaded (a save outside `fit`), in which case the current factors stand."""
        loader = self.trainer.train_dataloader
        if loader is None:
            return None
        dataset = getattr(loader, "dataset", None)
        if not isinstance(dataset, Sized) or isinstance(dataset, IterableDataset) or len(dataset) == 0:
            raise ValueError(
                "the latent normalisation needs an indexable, non-empty training dataset of image tensors; "
                f"the training DataLoader holds {type(dataset).__name__}"
            )
        n = min(self.normalisation_images, len(dataset))
        indices = torch.linspace(0, len(dataset) - 1, n).round().long().unique().tolist()
        return torch.stack([dataset[i] for i in indices])

    @torch.no_grad()
    def update_latent_normalisation(self, images: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
        """Set `shift_factor` / `scale_factor` to the mean / inverse std of the raw posterior-mode latents of
        `images` (over every element), so `encode` gives zero-mean, unit-variance latents on them."""
        was_training = self.autoencoder.training
        self.autoencoder.eval()
        param = next(self.autoencoder.parameters())
        latents = torch.cat(
            [
                self.autoencoder.vae.encode(self._checked(chunk.to(param.device, param.dtype)))
                .latent_dist.mode()
                .float()
                for chunk in images.split(batch_size)
            ]
        )
        self.autoencoder.train(was_training)
        mean, std = latents.mean().item(), latents.std().item()
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise RuntimeError(f"cannot normalise latents with mean {mean} and std {std}; training diverged")
        self.config.shift_factor = mean
        self.config.scale_factor = 1.0 / std
        return self.config.shift_factor, self.config.scale_factor

    # --- export --------------------------------------------------------------------------------------
    def export(self, folder: str | Path) -> None:
        """Write `ae.safetensors` (FLUX naming) and `ae_config.json` into `folder`, each atomically."""
        folder = Path(folder)
        config_text = json.dumps(self.config.to_dict(), indent=2) + "\n"
        write_atomically(folder / "ae.safetensors", self.autoencoder.save_file)
        write_atomically(folder / "ae_config.json", lambda tmp: tmp.write_text(config_text))

    def _normalise_and_export(self) -> None:
        images = self.normalisation_batch()
        if images is not None:
            self.update_latent_normalisation(images)
        if self.export_dir is not None and self.trainer.is_global_zero:
            self.export(self.export_dir)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._normalise_and_export()
        checkpoint["latent_normalisation"] = {
            "shift_factor": self.config.shift_factor,
            "scale_factor": self.config.scale_factor,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        factors = checkpoint.get("latent_normalisation")
        if factors is not None:
            self.config.shift_factor = factors["shift_factor"]
            self.config.scale_factor = factors["scale_factor"]

    def on_fit_end(self) -> None:
        self._normalise_and_export()
