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


@pytest.mark.parametrize("name", ["tiny", "shapes"])
def test_demo_presets_speak_the_shapes_tokenizer(name: str) -> None:
    tokenizer = build_shapes_tokenizer()
    config = preset(name)
    assert config.special_tokens == SpecialTokenIds.from_tokenizer(tokenizer)
    assert config.llm.vocab_size >= len(tokenizer)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="bagel-7b-mot"):
        preset("bagel-70b")
