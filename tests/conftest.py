"""Shared fixtures: a tiny random BAGEL that speaks the shapes-world tokenizer."""

import pytest
import torch

from hyperbagel.backbone.autoencoder import BagelAutoencoder
from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.config import BagelConfig, SpecialTokenIds, tiny_config
from hyperbagel.datamodules.shapes_tokenizer import build_shapes_tokenizer


@pytest.fixture(scope="session")
def shapes_tokenizer():
    return build_shapes_tokenizer()


@pytest.fixture
def tiny_bagel_config(shapes_tokenizer) -> BagelConfig:
    return tiny_config(
        vocab_size=len(shapes_tokenizer), special_tokens=SpecialTokenIds.from_tokenizer(shapes_tokenizer)
    )


@pytest.fixture
def tiny_bagel(tiny_bagel_config) -> Bagel:
    """Random tiny model in eval mode; llm2vae re-drawn (it starts at zero) so velocities are non-trivial."""
    torch.manual_seed(0)
    model = Bagel(tiny_bagel_config, BagelAutoencoder(tiny_bagel_config.vae))
    with torch.no_grad():
        for p in model.llm2vae.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()
