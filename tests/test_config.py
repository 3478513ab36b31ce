"""Presets: sizes, the real model's dimensions, and agreement with the built-in tokenizer."""

import pytest
import torch

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.config import SpecialTokenIds, preset
from hyperbagel.datamodules.shapes_tokenizer import build_shapes_tokenizer


def _parameters(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Bagel(preset(name)).parameters())


def test_tiny_preset_is_well_under_a_million_parameters() -> None:
    assert _parameters("tiny") < 200_000


def test_bagel_7b_mot_has_the_real_size() -> None:
    """~7B active / ~14B total: both experts of 28 Qwen2.5-7B layers plus the 26-layer SigLIP."""
    total = _parameters("bagel-7b-mot")
    assert 14.0e9 < total < 14.8e9
    config = preset("bagel-7b-mot")
    assert config.image_stride == 16 and config.latent_token_dim == 64 and config.vit.num_hidden_layers == 26


@pytest.mark.parametrize("name", ["tiny", "shapes", "shapes_coarse"])
def test_demo_presets_speak_the_shapes_tokenizer(name: str) -> None:
    tokenizer = build_shapes_tokenizer()
    config = preset(name)
    assert config.special_tokens == SpecialTokenIds.from_tokenizer(tokenizer)
    assert config.llm.vocab_size >= len(tokenizer)


def test_coarse_shapes_preset_differs_only_in_its_latent_patches() -> None:
    """16 tokens of 4x4x4 latents for a 64 px image, stride 16 like BAGEL's; the rest is the shapes preset."""
    fine, coarse = preset("shapes"), preset("shapes_coarse")
    assert coarse.image_stride == 16 and coarse.latent_token_dim == 64
    assert (coarse.vae_max_image_size // coarse.image_stride) ** 2 == 16
    assert coarse.max_latent_size * coarse.image_stride == fine.max_latent_size * fine.image_stride == 64
    assert coarse.llm.to_dict() == fine.llm.to_dict() and coarse.vit.to_dict() == fine.vit.to_dict()


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="bagel-7b-mot"):
        preset("bagel-70b")
    with pytest.raises(KeyError, match="nor an existing checkpoint folder"):  # a missing earlier export
        preset("outputs/shapes/teacher_edit")
