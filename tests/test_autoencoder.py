"""Tests of the FLUX autoencoder wrapper: BAGEL's key layout, latent normalisation, latent tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hyperbagel.backbone.autoencoder import (
    AutoencoderConfig,
    BagelAutoencoder,
    image_to_tensor,
    patchify_latents,
    tensor_to_pil,
    unpatchify_latents,
)

TINY = AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_num_groups=4)


def tiny_model(seed: int = 0) -> BagelAutoencoder:
    torch.manual_seed(seed)
    model = BagelAutoencoder(TINY).eval()
    # perturb every tensor so that constant inits (norm weights 1, biases 0) differ between seeds.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def expected_tiny_flux_shapes() -> dict[str, tuple[int, ...]]:
    """FLUX/LDM names and shapes for TINY, written from the LDM naming rules (levels: 8 ch, 16 ch)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(prefix: str, c: int) -> None:
        resnet(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{proj}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    conv("encoder.conv_in", 8, 3, 3)
    resnet("encoder.down.0.block.0", 8, 8)
    conv("encoder.down.0.downsample.conv", 8, 8, 3)
    resnet("encoder.down.1.block.0", 8, 16)
    mid("encoder", 16)
    norm("encoder.norm_out", 16)
    conv("encoder.conv_out", 8, 16, 3)  # mean and log-variance: 2 * z_channels

    conv("decoder.conv_in", 16, 4, 3)
    mid("decoder", 16)
    # decoder up.1 is the LOW resolution level (runs first), up.0 the full-resolution one.
    resnet("decoder.up.1.block.0", 16, 16)
    resnet("decoder.up.1.block.1", 16, 16)
    conv("decoder.up.1.upsample.conv", 16, 16, 3)
    resnet("decoder.up.0.block.0", 16, 8)
    resnet("decoder.up.0.block.1", 8, 8)
    norm("decoder.norm_out", 8)
    conv("decoder.conv_out", 3, 8, 3)
    return shapes


# ---------------------------------------------------------------- config


def test_config_flux_values_and_dict_round_trip():
    flux = AutoencoderConfig.flux()
    assert (flux.ch, flux.ch_mult, flux.num_res_blocks, flux.z_channels) == (128, (1, 2, 4, 4), 2, 16)
    assert (flux.scale_factor, flux.shift_factor) == (0.3611, 0.1159)
    assert flux.downsample_factor == 8
    assert TINY.downsample_factor == 2
    assert AutoencoderConfig.from_dict(TINY.to_dict()) == TINY
    assert TINY.to_dict()["ch_mult"] == [1, 2]  # JSON friendly
    with pytest.raises(ValueError, match="bogus"):
        AutoencoderConfig.from_dict({"bogus": 1})


# ---------------------------------------------------------------- checkpoint layout


def test_flux_key_set_and_shapes_match_ldm_rules():
    model = tiny_model()
    got = {k: tuple(v.shape) for k, v in model.state_dict_flux().items()}
    assert got == expected_tiny_flux_shapes()


def test_round_trip_diffusers_flux_diffusers_is_bit_identical():
    source, target = tiny_model(0), tiny_model(1)
    target.load_flux_state_dict(source.state_dict_flux())
    src, tgt = source.vae.state_dict(), target.vae.state_dict()
    assert src.keys() == tgt.keys()
    for key in src:
        assert torch.equal(src[key], tgt[key]), key


def test_attention_projections_are_1x1_convs_in_flux_and_linear_in_diffusers():
    model = tiny_model()
    flux = model.state_dict_flux()
    attn = model.vae.encoder.mid_block.attentions[0]
    pairs = (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v), ("proj_out", attn.to_out[0]))
    for flux_name, linear in pairs:
        assert flux[f"encoder.mid.attn_1.{flux_name}.weight"].shape == (16, 16, 1, 1)
        assert linear.weight.shape == (16, 16)
        assert torch.equal(flux[f"encoder.mid.attn_1.{flux_name}.weight"][:, :, 0, 0], linear.weight)
    reloaded = tiny_model(1)
    reloaded.load_flux_state_dict(flux)
    assert reloaded.vae.decoder.mid_block.attentions[0].to_q.weight.shape == (16, 16)


def test_flux_named_attention_reproduces_diffusers_attention():
    """FLUX's AttnBlock math on the FLUX-named weights equals diffusers' attention module."""
    model = tiny_model()
    w = model.state_dict_flux()
    p = "decoder.mid.attn_1"
    x = torch.randn(2, 16, 3, 5)
    h = F.group_norm(x, 4, w[f"{p}.norm.weight"], w[f"{p}.norm.bias"], eps=1e-6)
    q, k, v = (F.conv2d(h, w[f"{p}.{n}.weight"], w[f"{p}.{n}.bias"]).flatten(2) for n in "qkv")
    attn = torch.softmax(q.transpose(1, 2) @ k / 16**0.5, dim=-1)  # [B, HW, HW]
    out = (v @ attn.transpose(1, 2)).reshape(x.shape)
    expected = x + F.conv2d(out, w[f"{p}.proj_out.weight"], w[f"{p}.proj_out.bias"])
    with torch.no_grad():
        got = model.vae.decoder.mid_block.attentions[0](x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_flux_up_index_is_reversed_resnet_reproduces_diffusers():
    """FLUX's `decoder.up.0.block.0` (16 -> 8, nin_shortcut) is diffusers' last up block's first resnet."""
    model = tiny_model()
    w = model.state_dict_flux()
    p = "decoder.up.0.block.0"
    x = torch.randn(1, 16, 4, 4)
    h = F.silu(F.group_norm(x, 4, w[f"{p}.norm1.weight"], w[f"{p}.norm1.bias"], eps=1e-6))
    h = F.conv2d(h, w[f"{p}.conv1.weight"], w[f"{p}.conv1.bias"], padding=1)
    h = F.silu(F.group_norm(h, 4, w[f"{p}.norm2.weight"], w[f"{p}.norm2.bias"], eps=1e-6))
    h = F.conv2d(h, w[f"{p}.conv2.weight"], w[f"{p}.conv2.bias"], padding=1)
    expected = F.conv2d(x, w[f"{p}.nin_shortcut.weight"], w[f"{p}.nin_shortcut.bias"]) + h
    with torch.no_grad():
        got = model.vae.decoder.up_blocks[1].resnets[0](x, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_save_file_then_from_file_gives_identical_outputs(tmp_path):
    model = tiny_model()
    path = tmp_path / "ae.safetensors"
    model.save_file(path)
    loaded = BagelAutoencoder.from_file(path, config=TINY).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.encode(x), loaded.encode(x))
        lat = model.encode(x)
        assert torch.equal(model.decode(lat), loaded.decode(lat))


def test_from_file_dtype_and_default_config_error(tmp_path):
    model = tiny_model()
    path = tmp_path / "ae.safetensors"
    model.save_file(path)
    half = BagelAutoencoder.from_file(path, config=TINY, dtype=torch.bfloat16)
    assert half.vae.encoder.conv_in.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="ae.safetensors") as err:
        BagelAutoencoder.from_file(path)  # defaults to the real FLUX config: everything mismatches
    assert "encoder.conv_in.weight: checkpoint (8, 3, 3, 3) vs model (128, 3, 3, 3)" in str(err.value)


# ---------------------------------------------------------------- errors


def test_missing_unexpected_and_misshaped_keys_are_reported_together():
    model = tiny_model()
    sd = dict(model.state_dict_flux())
    del sd["decoder.up.0.block.0.nin_shortcut.bias"]
    sd["encoder.mid.attn_2.q.weight"] = torch.zeros(16, 16, 1, 1)
    sd["encoder.mid.attn_1.k.weight"] = torch.zeros(16, 16)  # Linear shape instead of FLUX's 1x1 conv
    with pytest.raises(ValueError) as err:
        tiny_model(1).load_flux_state_dict(sd)
    message = str(err.value)
    assert "missing keys ['decoder.up.0.block.0.nin_shortcut.bias']" in message
    assert "unexpected keys ['encoder.mid.attn_2.q.weight']" in message
    assert "encoder.mid.attn_1.k.weight: checkpoint (16, 16) vs model (16, 16, 1, 1)" in message


def test_non_strict_load_tolerates_missing_and_unexpected_but_not_shapes():
    source, target = tiny_model(0), tiny_model(1)
    kept_before = target.vae.encoder.conv_in.bias.clone()
    sd = dict(source.state_dict_flux())
    del sd["encoder.conv_in.bias"]
    sd["extra.weight"] = torch.zeros(1)
    target.load_flux_state_dict(sd, strict=False)
    assert torch.equal(target.vae.encoder.conv_in.bias, kept_before)
    assert torch.equal(target.vae.decoder.conv_out.weight, source.vae.decoder.conv_out.weight)
    sd["decoder.conv_out.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"decoder.conv_out.bias: checkpoint \(4,\) vs model \(3,\)"):
        target.load_flux_state_dict(sd, strict=False)


def test_missing_and_unreadable_files_name_the_file(tmp_path):
    missing = tmp_path / "nope" / "ae.safetensors"
    with pytest.raises(FileNotFoundError, match="nope"):
        BagelAutoencoder.from_file(missing, config=TINY)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="broken.safetensors"):
        BagelAutoencoder.from_file(broken, config=TINY)


# ---------------------------------------------------------------- encode / decode


def test_encode_decode_apply_scale_and_shift_exactly():
    model = tiny_model()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = model.encode(x)
        posterior = model.vae.encode(x).latent_dist
        torch.testing.assert_close(latents, (posterior.mean - 0.1159) * 0.3611, rtol=0, atol=0)
        sampled = model.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        by_hand = posterior.sample(torch.Generator().manual_seed(3))
        torch.testing.assert_close(sampled, (by_hand - 0.1159) * 0.3611, rtol=0, atol=0)
        assert not torch.equal(sampled, latents)

        loud = latents * 50  # drive the decoder out of range to see the clamp
        decoded = model.decode(loud)
        raw = model.vae.decode(loud / 0.3611 + 0.1159).sample
        assert raw.abs().max() > 1
        torch.testing.assert_close(decoded, raw.clamp(-1, 1), rtol=0, atol=0)
    assert latents.shape == (2, TINY.z_channels, 32 // TINY.downsample_factor, 32 // TINY.downsample_factor)
    assert latents.shape == (2, 4, 16, 16)
    assert model.decode(latents).shape == x.shape


def test_encode_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_model().encode(torch.zeros(1, 4, 8, 8))


# ---------------------------------------------------------------- latent tokens


def test_patchify_order_is_row_major_tokens_with_pqc_inside():
    # x[c, row, col] = 16 * c + 4 * row + col, C = 2 on a 4x4 latent -> 2x2 token grid of 8-dim tokens
    x = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4)
    tokens = patchify_latents(x)
    assert tokens.shape == (1, 4, 8)
    # token = [x[0,r,c], x[1,r,c]] for (r, c) in (0,0), (0,1), (1,0), (1,1) inside its 2x2 patch
    assert tokens[0, 0].tolist() == [0, 16, 1, 17, 4, 20, 5, 21]  # grid (0, 0): rows 0-1, cols 0-1
    assert tokens[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]  # grid (0, 1): rows 0-1, cols 2-3
    assert tokens[0, 2].tolist() == [8, 24, 9, 25, 12, 28, 13, 29]  # grid (1, 0): rows 2-3, cols 0-1
    assert tokens[0, 3].tolist() == [10, 26, 11, 27, 14, 30, 15, 31]


def test_unpatchify_inverts_patchify():
    latents = torch.randn(3, 16, 6, 10)
    tokens = patchify_latents(latents)
    assert tokens.shape == (3, 15, 64)
    assert torch.equal(unpatchify_latents(tokens, 3, 5), latents)
    assert torch.equal(unpatchify_latents(tokens, 3, 5, channels=16), latents)
    with pytest.raises(ValueError, match="5x3"):
        unpatchify_latents(tokens, 5, 3, channels=8)
    with pytest.raises(ValueError, match="not divisible"):
        patchify_latents(torch.zeros(1, 4, 5, 4))


# ---------------------------------------------------------------- PIL helpers


def test_image_tensor_round_trip_and_range():
    image = Image.new("RGB", (3, 2), (0, 128, 255))
    image.putpixel((1, 1), (7, 200, 31))
    tensor = image_to_tensor([image, image])
    assert tensor.shape == (2, 3, 2, 3)
    assert tensor[0, 0, 0, 0].item() == -1.0 and tensor[0, 2, 0, 0].item() == 1.0
    back = tensor_to_pil(tensor)
    assert len(back) == 2 and list(back[0].getdata()) == list(image.getdata())
    assert list(tensor_to_pil(tensor[0])[0].getdata()) == list(image.getdata())
    with pytest.raises(ValueError, match="one size"):
        image_to_tensor([image, Image.new("RGB", (4, 4))])
