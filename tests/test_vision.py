"""SigLIP NaViT encoder and BAGEL's embedding modules against independent references."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import SiglipVisionConfig, SiglipVisionModel

from hyperbagel.backbone.embeddings import MLPConnector, PositionEmbedding, TimestepEmbedder
from hyperbagel.backbone.vision import (
    SiglipNaViT,
    conv_patch_weight_to_linear,
    flattened_position_ids,
    patchify_image,
)

PATCH = 2
MAX_SIDE = 4


def tiny_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=PATCH * MAX_SIDE,
        patch_size=PATCH,
        vision_use_head=False,
    )


def navit_from_hf(hf: SiglipVisionModel) -> SiglipNaViT:
    """Copy every HF weight into our module under BAGEL's names (strict: names must match exactly)."""
    ours = SiglipNaViT(hf.config, max_num_patch_per_side=MAX_SIDE)
    state = {f"vision_model.{name}": value for name, value in hf.state_dict().items()}
    conv_key = "vision_model.embeddings.patch_embedding.weight"
    state[conv_key] = conv_patch_weight_to_linear(state[conv_key])
    ours.load_state_dict(state, strict=True)
    return ours.eval()


@pytest.fixture(scope="module")
def hf_and_ours() -> tuple[SiglipVisionModel, SiglipNaViT]:
    torch.manual_seed(0)
    hf = SiglipVisionModel(tiny_config()).eval()
    with torch.no_grad():  # make LayerNorms and biases non-trivial too
        for param in hf.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return hf, navit_from_hf(hf)


def test_parameter_names_are_bagels(hf_and_ours):
    _, ours = hf_and_ours
    shapes = {name: tuple(p.shape) for name, p in ours.named_parameters()}
    assert shapes["vision_model.embeddings.patch_embedding.weight"] == (32, 3 * PATCH * PATCH)
    assert shapes["vision_model.embeddings.patch_embedding.bias"] == (32,)
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (MAX_SIDE * MAX_SIDE, 32)
    for suffix in (
        "layer_norm1.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.weight",
        "self_attn.out_proj.bias",
        "layer_norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc2.bias",
    ):
        assert f"vision_model.encoder.layers.1.{suffix}" in shapes
    assert "vision_model.post_layernorm.weight" in shapes
    assert not any("head" in name for name in shapes)


def test_full_grid_image_matches_transformers(hf_and_ours):
    hf, ours = hf_and_ours
    torch.manual_seed(1)
    image = torch.randn(3, PATCH * MAX_SIDE, PATCH * MAX_SIDE)
    with torch.no_grad():
        expected = hf(pixel_values=image[None]).last_hidden_state[0]
        features, cu_seqlens, position_ids = ours.encode_images([image])
    assert features.shape == (MAX_SIDE * MAX_SIDE, 32)
    assert cu_seqlens.tolist() == [0, MAX_SIDE * MAX_SIDE]
    assert position_ids.tolist() == list(range(MAX_SIDE * MAX_SIDE))
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_packed_images_do_not_attend_to_each_other(hf_and_ours):
    _, ours = hf_and_ours
    torch.manual_seed(2)
    big = torch.randn(3, 8, 8)  # 4x4 patches
    small = torch.randn(3, 4, 6)  # 2x3 patches
    with torch.no_grad():
        packed, cu_seqlens, position_ids = ours.encode_images([big, small])
        alone_big, _, _ = ours.encode_images([big])
        alone_small, _, small_ids = ours.encode_images([small])
    assert cu_seqlens.tolist() == [0, 16, 22]
    # row * 4 + col for rows 0..1, cols 0..2
    assert small_ids.tolist() == [0, 1, 2, 4, 5, 6]
    assert position_ids.tolist() == list(range(16)) + [0, 1, 2, 4, 5, 6]
    torch.testing.assert_close(packed[:16], alone_big, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[16:], alone_small, atol=1e-5, rtol=1e-5)


def test_flattened_position_ids_by_hand():
    assert flattened_position_ids(2, 2, 70).tolist() == [0, 1, 70, 71]
    assert flattened_position_ids(1, 3, 5).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="5x2"):
        flattened_position_ids(5, 2, 4)


def test_patchify_order_by_hand():
    image = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    expected = [
        [image[c, row * 2 + y, col * 2 + x].item() for y in range(2) for x in range(2) for c in range(3)]
        for row in range(2)
        for col in range(3)
    ]
    assert patchify_image(image, 2).tolist() == expected


def test_conv_weight_converted_to_linear_matches_conv():
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 5, kernel_size=PATCH, stride=PATCH)
    image = torch.randn(3, 6, 8)
    with torch.no_grad():
        expected = conv(image[None])[0].flatten(1).T  # [patches row-major, 5]
        got = F.linear(patchify_image(image, PATCH), conv_patch_weight_to_linear(conv.weight), conv.bias)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_non_multiple_image_size_is_rejected(hf_and_ours):
    _, ours = hf_and_ours
    with pytest.raises(ValueError, match="7x8"):
        ours.encode_images([torch.randn(3, 7, 8)])


def test_oversized_image_is_rejected(hf_and_ours):
    _, ours = hf_and_ours
    with pytest.raises(ValueError, match="5x4"):
        ours.encode_images([torch.randn(3, 10, 8)])


def mae_sincos_reference(side: int, dim: int) -> np.ndarray:
    """MAE 2-D sin-cos written out: first half encodes the column, second half the row."""
    quarter = dim // 4
    omega = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
    table = np.zeros((side * side, dim))
    for row in range(side):
        for col in range(side):
            values = []
            for coordinate in (col, row):
                values += [math.sin(coordinate * w) for w in omega]
                values += [math.cos(coordinate * w) for w in omega]
            table[row * side + col] = values
    return table


def test_position_embedding_is_frozen_mae_sincos():
    module = PositionEmbedding(3, 8)
    assert not module.pos_embed.requires_grad
    assert [name for name, _ in module.named_parameters()] == ["pos_embed"]
    np.testing.assert_allclose(module.pos_embed.numpy(), mae_sincos_reference(3, 8), atol=1e-7)
    ids = torch.tensor([4, 0, 8])
    torch.testing.assert_close(module(ids), module.pos_embed[ids])


def test_position_embedding_full_precision_at_bagel_side():
    module = PositionEmbedding(70, 16)
    np.testing.assert_allclose(module.pos_embed.numpy(), mae_sincos_reference(70, 16), atol=1e-6)


def timestep_reference(t: float, dim: int) -> list[float]:
    half = dim // 2
    freqs = [math.exp(-math.log(10000) * i / half) for i in range(half)]
    return [math.cos(t * f) for f in freqs] + [math.sin(t * f) for f in freqs]


def test_timestep_sinusoid_uses_raw_t():
    embedder = TimestepEmbedder(hidden_size=12)
    t = torch.tensor([0.0, 0.3, 1.0])
    expected = torch.tensor([timestep_reference(v, 256) for v in (0.0, 0.3, 1.0)], dtype=torch.float32)
    frequencies = embedder.frequency_embedding(t)
    torch.testing.assert_close(frequencies, expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        out = embedder(t)
        first, second = embedder.mlp[0], embedder.mlp[2]
        manual = F.linear(F.silu(F.linear(expected, first.weight, first.bias)), second.weight, second.bias)
    assert out.shape == (3, 12)
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)
    assert sorted(embedder.state_dict()) == ["mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"]


def test_mlp_connector_is_fc1_tanh_gelu_fc2():
    torch.manual_seed(4)
    connector = MLPConnector(6, 10, 7)
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = connector.fc2(F.gelu(connector.fc1(x), approximate="tanh"))
        got = connector(x)
    assert got.shape == (5, 7)
    torch.testing.assert_close(got, expected)
    assert sorted(connector.state_dict()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
