"""Vision-encoder pretraining (the demo's SigLIP stand-in): labels, targets, training, export and loading."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hyperbagel.backbone.checkpoint import VIT_CONFIG_FILE, VIT_WEIGHTS_FILE, save_pretrained
from hyperbagel.datamodules.shapes import ShapesWorld
from hyperbagel.datamodules.shapes_scene import IDENTITIES, Scene, ShapeObject, identity_map, shape_mask
from hyperbagel.datamodules.shapes_vision import ShapesVisionDataModule, vision_scenes
from hyperbagel.lightning_modules.pretrain import PretrainStage
from hyperbagel.lightning_modules.vision_encoder import NUM_CLASSES, VisionEncoderStage, patch_histograms

from helpers import quiet_trainer


def _scene() -> Scene:
    return Scene(
        canvas_size=32,
        objects=(
            ShapeObject(color="red", shape="circle", cx=8.0, cy=8.0, size=10),
            ShapeObject(color="blue", shape="square", cx=22.0, cy=22.0, size=8),
        ),
    )


def test_identity_map_labels_each_object_by_colour_and_shape() -> None:
    scene = _scene()
    labels = identity_map(scene)
    red_circle = 1 + IDENTITIES.index(("red", "circle"))
    blue_square = 1 + IDENTITIES.index(("blue", "square"))
    assert set(np.unique(labels)) == {0, red_circle, blue_square}
    assert (labels == red_circle).sum() == shape_mask("circle", 10, 10).sum()
    assert (labels == blue_square).sum() == 64
    x0, y0, x1, y1 = scene.objects[1].bbox
    assert (labels[y0:y1, x0:x1] == blue_square).all()


def test_patch_histograms_are_class_fractions_in_row_major_patch_order() -> None:
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, 2:] = 5  # the whole top-right patch
    labels[0, 3, 0] = 7  # one pixel of the bottom-left patch
    hist = patch_histograms(labels, patch=2)
    assert hist.shape == (1, 4, NUM_CLASSES)
    torch.testing.assert_close(hist.sum(-1), torch.ones(1, 4))
    assert hist[0, 1, 5] == 1.0  # patch (row 0, col 1)
    assert hist[0, 2, 7] == 0.25 and hist[0, 2, 0] == 0.75  # patch (row 1, col 0)
    assert hist[0, 0, 0] == 1.0 and hist[0, 3, 0] == 1.0


def test_datamodule_serves_vit_inputs_with_aligned_identity_maps() -> None:
    data = ShapesVisionDataModule(
        model_config="shapes", canvas_size=64, num_train=12, num_val=6, batch_size=4
    )
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 64, 64) and labels.shape == (4, 64, 64)
    assert labels.dtype == torch.long and 0 <= labels.min() and labels.max() < NUM_CLASSES
    white = (images.permute(0, 2, 3, 1) == 1.0).all(-1)
    assert torch.equal(white, labels == 0)  # exact renders: background pixels are exactly the white ones

    # The tiny preset's ViT reads at most 16 px: images and maps are resized alike.
    tiny = ShapesVisionDataModule(model_config="tiny", canvas_size=32, num_train=12, num_val=6, batch_size=4)
    tiny.setup("fit")
    images, labels = next(iter(tiny.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and labels.shape == (4, 16, 16)
    train_keys = {s.key() for s in vision_scenes(ShapesWorld(32), "train", 12)}
    assert train_keys.isdisjoint(s.key() for s in vision_scenes(ShapesWorld(32), "val", 12))


def test_training_learns_and_the_export_loads_into_a_preset_teacher(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stage = VisionEncoderStage(
        model_config="tiny",
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
        export_dir=str(tmp_path / "vit"),
    )
    data = ShapesVisionDataModule(model_config="tiny", canvas_size=32, num_train=24, num_val=6, batch_size=8)
    data.setup("fit")
    fixed = next(iter(data.train_dataloader()))
    first = stage.compute_losses(fixed)["loss"].item()
    quiet_trainer(tmp_path, max_steps=30).fit(
        stage, train_dataloaders=DataLoader([fixed] * 30, batch_size=None)
    )
    assert stage.compute_losses(fixed)["loss"].item() < 0.7 * first
    assert sorted(p.name for p in (tmp_path / "vit").iterdir()) == sorted([VIT_CONFIG_FILE, VIT_WEIGHTS_FILE])

    teacher = PretrainStage(model="tiny", vision_encoder=str(tmp_path / "vit"))
    teacher.configure_model()
    for name, value in stage.vit_model.state_dict().items():
        torch.testing.assert_close(teacher.model.vit_model.state_dict()[name], value, msg=name)


def test_an_encoder_of_another_preset_or_a_checkpoint_with_its_own_is_refused(tmp_path: Path) -> None:
    VisionEncoderStage(model_config="shapes").export(tmp_path / "shapes_vit")
    with pytest.raises(ValueError, match="mis-shaped keys"):
        PretrainStage(model="tiny", vision_encoder=str(tmp_path / "shapes_vit")).configure_model()
    teacher = PretrainStage(model="tiny")
    teacher.configure_model()
    save_pretrained(teacher.model, tmp_path / "ckpt", tokenizer=teacher.tokenizer)
    with pytest.raises(ValueError, match="has its own vit_model"):
        PretrainStage(model=str(tmp_path / "ckpt"), vision_encoder=str(tmp_path / "shapes_vit"))
