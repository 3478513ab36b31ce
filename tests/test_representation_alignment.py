"""Representation alignment (REPA) in stage 0: encoder targets on the latent grid, the term, what trains."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hyperbagel.backbone.packing import TextBlock, VaeImage, pack
from hyperbagel.lightning_modules.pretrain import PretrainStage
from hyperbagel.lightning_modules.vision_encoder import VisionEncoderStage

from helpers import FixedPacks, quiet_trainer


@pytest.fixture
def encoder_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "vit"
    torch.manual_seed(0)
    VisionEncoderStage(model_config="tiny").export(folder)
    return folder


def _aligned_stage(encoder_folder: Path, alignment_layer: int = 1, **kwargs) -> PretrainStage:
    """A tiny stage (2 decoder layers, so layer 1 is the only one between) with the alignment term on."""
    torch.manual_seed(0)
    stage = PretrainStage(
        model="tiny", alignment_encoder=str(encoder_folder), alignment_layer=alignment_layer, **kwargs
    )
    stage.configure_model()
    return stage


def test_targets_are_the_encoder_patches_area_pooled_onto_the_latent_grid(encoder_folder: Path) -> None:
    alignment = _aligned_stage(encoder_folder).alignment
    image = torch.rand(3, 16, 16) * 2 - 1  # tiny preset: ViT patch 2 -> 8x8 patches; latent stride 4 -> 4x4
    with torch.no_grad():
        features, _, _ = alignment.encoder.encode_images([image])
    grid = features.T.reshape(-1, 8, 8)
    torch.testing.assert_close(alignment.targets([image], [(8, 8)]), features)
    pooled = grid.reshape(-1, 4, 2, 4, 2).mean(dim=(2, 4)).flatten(1).T
    torch.testing.assert_close(alignment.targets([image], [(4, 4)]), pooled)
    two = alignment.targets([image, image.flip(-1)], [(4, 4), (2, 2)])
    assert two.shape == (16 + 4, features.shape[1])
    assert alignment.targets([torch.rand(3, 15, 17)], [(3, 4)]).shape == (12, features.shape[1])


def test_the_alignment_term_trains_the_projector_and_backbone_not_the_encoder(
    encoder_folder: Path, tmp_path: Path
) -> None:
    stage = _aligned_stage(encoder_folder, alignment_weight=0.5)
    packs = FixedPacks(stage.model.config)
    losses = stage.compute_losses(packs.packed, "train")
    assert 0.0 < losses["alignment"].item() <= 2.0
    expected = stage.ce_weight * losses["ce"] + stage.mse_weight * losses["mse"] + 0.5 * losses["alignment"]
    torch.testing.assert_close(losses["loss"], expected)

    names = [name for name, _ in stage.trainable_named_parameters()]
    assert names and not any(name.startswith("alignment.") for name in names)
    optimised = {id(p) for group in stage.configure_optimizers().param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in stage.alignment.projector.parameters())
    assert not any(p.requires_grad for p in stage.alignment.encoder.parameters())

    encoder_before = {k: v.clone() for k, v in stage.alignment.encoder.state_dict().items()}
    first = stage.compute_losses(packs.packed, "val")["alignment"].item()
    quiet_trainer(tmp_path, 40).fit(stage, DataLoader(packs, batch_size=None))
    assert stage.compute_losses(packs.packed, "val")["alignment"].item() < 0.5 * first
    for key, value in stage.alignment.encoder.state_dict().items():
        torch.testing.assert_close(value, encoder_before[key], msg=key)
    assert not stage.alignment.encoder.training


def test_features_come_from_the_requested_layer_at_noisy_latent_tokens_only(encoder_folder: Path) -> None:
    model = _aligned_stage(encoder_folder).model
    packed = FixedPacks(model.config).packed  # two noisy 16 px images (4x4 tokens each) and one clean one
    seeded = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    without = model.training_losses(packed, generator=seeded())
    assert without.noisy_features is None
    first, second = (model.training_losses(packed, generator=seeded(), feature_layer=k) for k in (1, 2))
    assert first.noisy_features.shape == (32, model.config.hidden_size) == (first.num_mse_tokens, 32)
    torch.testing.assert_close(first.mse, without.mse)
    assert not torch.allclose(first.noisy_features, second.noisy_features)


def test_bad_alignment_settings_and_latent_only_images_are_refused(encoder_folder: Path) -> None:
    with pytest.raises(ValueError, match=r"alignment_layer=2 must lie in \[1, 1\]"):
        _aligned_stage(encoder_folder, alignment_layer=2)
    stage = _aligned_stage(encoder_folder)
    latents = torch.randn(4, 8, 8)  # tiny: 4 channels at stride 2 for a 16 px image
    packed = pack([[[TextBlock([10, 11]), VaeImage(latents=latents, noisy=True)]]], stage.model.config)
    with pytest.raises(ValueError, match="noisy VAE image 0 of the pack holds precomputed latents"):
        stage.compute_losses(packed, "train")


def test_the_loss_is_one_minus_the_mean_cosine_similarity(encoder_folder: Path) -> None:
    alignment = _aligned_stage(encoder_folder).alignment
    image = torch.rand(3, 16, 16) * 2 - 1
    target = alignment.targets([image], [(4, 4)])
    with torch.no_grad():
        for layer in alignment.projector:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        alignment.projector[-1].bias.copy_(F.normalize(torch.randn(target.shape[1]), dim=0))
    bias = alignment.projector[-1].bias
    expected = 1.0 - F.cosine_similarity(bias.expand_as(target), target, dim=-1).mean()
    torch.testing.assert_close(alignment.loss(torch.randn(16, 32), [image], [(4, 4)]), expected)
