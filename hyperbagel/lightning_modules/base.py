"""Base of every training stage: holds the backbone, chooses what trains, builds optimizers, guards losses.

A stage subclasses `BagelStage` and implements `compute_losses` (a dict of named scalar terms plus the total
under "loss"); the base does the rest: model construction inside `configure_model` (sharded there, one FSDP2
unit per decoder layer, under Lightning's `ModelParallelStrategy`), trainable-parameter selection by name
patterns, optimizer and scheduler from YAML (any `torch.optim` or `bitsandbytes.optim` class), logging every
term, and skipping non-finite losses (counted and logged) instead of corrupting the weights, up to a limit
that stops the run with an error naming the step, the non-finite terms and the last good checkpoint.
"""

from __future__ import annotations

import fnmatch
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from hyperbagel.backbone.autoencoder import BagelAutoencoder
from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import from_pretrained, load_autoencoder, load_vision_encoder
from hyperbagel.backbone.config import PRESETS
from hyperbagel.backbone.sharding import check_optimizer_shards, shard_bagel
from hyperbagel.datamodules.interleaved import load_model_config, load_tokenizer


class NonFiniteLossError(RuntimeError):
    """A loss term was NaN or inf; the message names the step, the term and the last good checkpoint."""


def last_checkpoint(trainer: Any) -> str | None:
    """The most recently written checkpoint file of the trainer's ModelCheckpoint callbacks, if any."""
    paths: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            candidates = [callback.last_model_path, callback.best_model_path, *callback.best_k_models]
            paths += [Path(p) for p in candidates if p and Path(p).exists()]  # a sharded one is a folder
    return str(max(paths, key=lambda p: p.stat().st_mtime)) if paths else None


def resume_hint(trainer: Any) -> str:
    """Where a stopped run can restart from, for its error message."""
    checkpoint = last_checkpoint(trainer)
    return f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint written yet"


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """BAGEL's published AdamW settings (betas 0.9 / 0.95, eps 1e-15)."""
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)


def optimizer_config(
    optimizer_factory: OptimizerCallable, scheduler_factory: LRSchedulerCallable | None, params: Any
) -> Any:
    """What `configure_optimizers` returns for one YAML optimizer (and optional per-step scheduler)."""
    optimizer = optimizer_factory(params)
    check_optimizer_shards(optimizer)
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def log_loss_terms(
    module: LightningModule,
    losses: dict[str, torch.Tensor],
    stage: str,
    batch_size: int,
    prog_bar: tuple[str, ...] = ("loss",),
) -> None:
    """Log every term as `stage/name`: per step in training, as an epoch mean (synced) in validation."""
    on_step = stage == "train"
    for name, value in losses.items():
        module.log(
            f"{stage}/{name}",
            value.detach().float() if isinstance(value, torch.Tensor) else float(value),
            on_step=on_step,
            on_epoch=not on_step,
            prog_bar=name in prog_bar,
            batch_size=batch_size,
            sync_dist=not on_step,
        )


class BagelStage(LightningModule, ABC):
    """A LightningModule over one shared `Bagel` backbone.

    Args:
        model: a preset name ("tiny", "shapes", "bagel-7b-mot": random init) or a folder in BAGEL's
            checkpoint layout.
        autoencoder: folder holding `ae.safetensors` (and `ae_config.json`), used with a preset.
        vision_encoder: folder holding a pretrained `vit.safetensors` (the vision-encoder stage's output),
            loaded into a preset's `vit_model` as BAGEL loads SigLIP; a checkpoint folder has its own.
        tokenizer: "shapes" or a tokenizer folder; defaults to the checkpoint's own, or "shapes" for presets.
        trainable: patterns (fnmatch) over the backbone's parameter names, i.e. BAGEL checkpoint keys such
            as "language_model.model.layers.*_moe_gen.*", that train; None means the stage's
            `default_trainable` (every parameter that can, unless a subclass says otherwise).
        frozen: patterns removed from the trainable set (e.g. "vit_model.*").
        optimizer / lr_scheduler: classes from YAML, called with the trainable parameters / optimizer.
        gradient_checkpointing: recompute decoder layers in backward to save activation memory.
        max_nonfinite_losses: consecutive non-finite losses tolerated (skipped) before the run stops.
    """

    # What trains when `trainable` is None. A class attribute, not an init default, because LightningCLI
    # passes every init argument explicitly (None included), so a subclass cannot default it through kwargs.
    default_trainable: tuple[str, ...] = ("*",)

    def __init__(
        self,
        model: str = "tiny",
        autoencoder: str | None = None,
        vision_encoder: str | None = None,
        tokenizer: str | None = None,
        trainable: list[str] | None = None,
        frozen: list[str] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        gradient_checkpointing: bool = False,
        max_nonfinite_losses: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model_source = model
        self.autoencoder_source = autoencoder
        self.vision_encoder_source = vision_encoder
        if vision_encoder is not None and model not in PRESETS:
            raise ValueError(
                f"vision_encoder={vision_encoder!r} applies to a preset; "
                f"the checkpoint {model!r} has its own vit_model"
            )
        self.trainable_patterns = list(self.default_trainable if trainable is None else trainable)
        self.frozen_patterns = frozen or []
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.gradient_checkpointing = gradient_checkpointing
        self.max_nonfinite_losses = max_nonfinite_losses
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.model: Bagel | None = None
        self.tokenizer = load_tokenizer(tokenizer or ("shapes" if model in PRESETS else model))

    # --- model construction --------------------------------------------------------------------------
    def build_model(self) -> Bagel:
        """The backbone this stage trains; subclasses that need side models extend `configure_model`."""
        if self.model_source not in PRESETS:
            return from_pretrained(self.model_source)
        config = load_model_config(self.model_source, self.tokenizer)
        if self.autoencoder_source is None:
            autoencoder = BagelAutoencoder(config.vae)
        else:
            autoencoder = load_autoencoder(self.autoencoder_source)
            config.vae = autoencoder.config
        model = Bagel(config, autoencoder)
        if self.vision_encoder_source is not None:
            load_vision_encoder(self.vision_encoder_source, model.vit_model)
        return model

    def configure_model(self) -> None:
        if self.model is not None:
            return
        # `from_pretrained` hands back an inference model (eval mode), and Lightning keeps each module's mode:
        # without this, a stage started from a checkpoint folder would never run activation checkpointing.
        self.model = self.build_model().train()
        self.model.language_model.model.gradient_checkpointing = self.gradient_checkpointing
        self.select_trainable(self.model)
        if (mesh := self.sharding_mesh()) is not None:
            shard_bagel(self.model, mesh)

    def sharding_mesh(self) -> DeviceMesh | None:
        """The data-parallel mesh to shard over (FSDP2) under `ModelParallelStrategy`, else None."""
        mesh = self.device_mesh
        if mesh is None:
            return None
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                "hyperbagel shards data-parallel only (FSDP2): set ModelParallelStrategy's "
                "tensor_parallel_size to 1 and data_parallel_size to the number of devices"
            )
        return mesh["data_parallel"]

    def select_trainable(self, module: nn.Module) -> None:
        """requires_grad = matches `trainable` and not `frozen` (frozen-by-design tables stay frozen)."""
        for name, param in module.named_parameters():
            if name.endswith("pos_embed.pos_embed"):
                param.requires_grad_(False)
                continue
            wanted = any(fnmatch.fnmatchcase(name, p) for p in self.trainable_patterns)
            unwanted = any(fnmatch.fnmatchcase(name, p) for p in self.frozen_patterns)
            param.requires_grad_(wanted and not unwanted)
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(
                f"no parameter is trainable with trainable={self.trainable_patterns} "
                f"frozen={self.frozen_patterns}"
            )

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything the optimizer updates; EMA and exports follow this list."""
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        params = [p for _, p in self.trainable_named_parameters()]
        return optimizer_config(self.optimizer_factory, self.scheduler_factory, params)

    # --- steps ---------------------------------------------------------------------------------------
    @abstractmethod
    def compute_losses(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        """Named loss terms with the optimised total under "loss" ("train" or "val" stage)."""

    def batch_size_of(self, batch: Any) -> int:
        return 1

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        losses = self.compute_losses(batch, "train")
        if not torch.isfinite(losses["loss"]).item():
            return self._skip_nonfinite(losses)
        self.nonfinite_in_a_row = 0
        self._log_terms(losses, "train", batch)
        return losses["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            losses = self.compute_losses(batch, "val")
        self._log_terms(losses, "val", batch)

    def _log_terms(self, losses: dict[str, torch.Tensor], stage: str, batch: Any) -> None:
        log_loss_terms(self, losses, stage, self.batch_size_of(batch))

    def _skip_nonfinite(self, losses: dict[str, torch.Tensor]) -> None:
        """Skip this step (no backward, no update); stop once too many come in a row."""
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        self.log("train/nonfinite_losses", float(self.nonfinite_total), on_step=True)
        if self.nonfinite_in_a_row > self.max_nonfinite_losses:
            values = {name: float(value.detach().float().mean()) for name, value in losses.items()}
            bad = ", ".join(f"train/{name} = {v}" for name, v in values.items() if not math.isfinite(v))
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row, the last at global step "
                f"{self.global_step} ({bad}); {resume_hint(self.trainer)}. Lower the learning rate or "
                "inspect the data."
            )
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the rows read and skipped as bad where the data module counts them (BAGEL-format data),
        so a run's data quality is on TensorBoard beside its losses."""
        data = getattr(self.trainer, "datamodule", None)
        if getattr(data, "bad_row_count", None) is not None:
            self.log("data/rows_read", float(data.rows_read), on_step=True, on_epoch=False)
            self.log("data/bad_rows", float(data.bad_row_count), on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_losses"] = {"in_a_row": self.nonfinite_in_a_row, "total": self.nonfinite_total}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counts = checkpoint.get("nonfinite_losses", {})
        self.nonfinite_in_a_row = counts.get("in_a_row", 0)
        self.nonfinite_total = counts.get("total", 0)
