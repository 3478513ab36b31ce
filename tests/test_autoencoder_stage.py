"""The autoencoder stage: a real Lightning fit exports loadable weights with working latent normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hyperbagel.backbone.autoencoder import AutoencoderConfig, BagelAutoencoder, image_to_tensor
from hyperbagel.datamodules.shapes import ShapesWorld
from hyperbagel.datamodules.shapes_images import ShapesImageDataModule
from hyperbagel.lightning_modules.autoencoder import AutoencoderStage

TINY = {"ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 4, "norm_num_groups": 4}


def tiny_data(**kwargs) -> ShapesImageDataModule:
    return ShapesImageDataModule(canvas_size=32, num_train=16, num_val=8, batch_size=8, **kwargs)


def test_datamodule_batches_are_train_and_val_renders_in_range() -> None:
    data = tiny_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= -1.0 and batch.max() == 1.0  # the background is white
    train, val = data.train_dataset.images, data.val_dataset.images
    assert len(train) == 16 and len(val) == 8
    # Half text-to-image renders of the train split, then (source, target) edit pairs.
    world = ShapesWorld(canvas_size=32, seed=0)
    first_t2i = image_to_tensor([world.samples("t2i", "train", 8)[0].image])[0]
    first_edit = world.samples("edit", "train", 4)[0]
    assert torch.equal(data.train_dataset[0], first_t2i)
    assert torch.equal(data.train_dataset[9], image_to_tensor([first_edit.target_image])[0])
    # Edit pairs come as (source, target): the two differ, but only in part of the image.
    source, target = train[8].float(), train[9].float()
    changed = (source != target).any(0).float().mean()
    assert 0 < changed < 0.5
    assert not any(torch.equal(v, t) for v in val for t in train)


def test_fit_exports_loadable_weights_with_normalised_latents(tmp_path: Path) -> None:
    torch.manual_seed(0)
    export = tmp_path / "ae"
    stage = AutoencoderStage(config=TINY, lr=1e-3, export_dir=str(export), normalisation_images=16)
    trainer = Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path / "logs")),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=2,
        num_sanity_val_steps=0,
    )
    data = tiny_data()
    trainer.fit(stage, datamodule=data)

    config = AutoencoderConfig.from_dict(json.loads((export / "ae_config.json").read_text()))
    assert (config.ch, config.z_channels) == (8, 4)
    assert (config.shift_factor, config.scale_factor) == (
        stage.config.shift_factor,
        stage.config.scale_factor,
    )
    loaded = BagelAutoencoder.from_file(export / "ae.safetensors", config)
    ours, theirs = stage.autoencoder.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name

    # The factors are finite, not FLUX's defaults, and make the stats batch's latents standard.
    assert config.shift_factor != AutoencoderConfig().shift_factor
    stats = torch.stack([data.train_dataset[i] for i in range(16)])
    with torch.no_grad():
        latents = loaded.encode(stats)
    assert abs(latents.mean().item()) < 1e-4
    assert latents.std().item() == pytest.approx(1.0, abs=1e-4)
    assert sorted(p.name for p in export.iterdir()) == ["ae.safetensors", "ae_config.json"]  # no temp files

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/loss", "train/psnr", "val/loss", "val/psnr"} <= set(events.Tags()["scalars"])
    grid = events.Images("val/reconstructions")[0]
    assert (grid.width, grid.height) == (2 + 8 * 34, 2 + 2 * 34)  # 8 originals over 8 reconstructions

    # Every checkpoint save re-exports, and a restored stage keeps the factors.
    (export / "ae_config.json").unlink()
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert (export / "ae_config.json").is_file()
    restored = AutoencoderStage.load_from_checkpoint(tmp_path / "last.ckpt")
    assert restored.config.scale_factor == stage.config.scale_factor
    assert restored.config.shift_factor == stage.config.shift_factor


def test_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    stage = AutoencoderStage(config=TINY, gradient_weight=0.5)
    data = tiny_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    optimizer = torch.optim.AdamW(stage.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        losses, _ = stage.compute_losses(batch, sample=True)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(losses["loss"].item())
    assert set(losses) == {"reconstruction", "kl", "gradient", "loss", "psnr"}
    assert sum(history[-5:]) / 5 < 0.6 * sum(history[:5]) / 5


def test_rejects_unknown_loss_and_config_fields() -> None:
    with pytest.raises(ValueError, match="reconstruction_loss"):
        AutoencoderStage(config=TINY, reconstruction_loss="huber")
    with pytest.raises(ValueError, match="unknown autoencoder config fields"):
        AutoencoderStage(config={**TINY, "channels": 3})
