"""BAGEL's packing rules: masks, RoPE ids, routing, labels, and no cross-talk in real forwards."""

import pytest
import torch
import torch.nn.functional as F

from hyperbagel.backbone.packing import (
    CAUSAL,
    FULL,
    NOISE,
    TextBlock,
    VaeImage,
    VitImage,
    pack,
    sample_length,
)
from hyperbagel.backbone.segmented_attention import SampleSegments


def _image(side: int = 16) -> torch.Tensor:
    return torch.rand(3, side, side) * 2 - 1


def _spans(packed, row: int = 0) -> list[tuple[int, int]]:
    """[start, end) of each split in a row, in order."""
    splits = packed.split_ids[row].tolist()
    spans = []
    for split in dict.fromkeys(s for s in splits if s >= 0):
        positions = [i for i, s in enumerate(splits) if s == split]
        spans.append((positions[0], positions[-1] + 1))
    return spans


def test_rope_ids_routing_and_labels(tiny_bagel_config) -> None:
    cfg = tiny_bagel_config
    sample = [
        VaeImage(pixels=_image()),  # clean, 4x4 tokens
        VitImage(_image(8)),  # 16 patches
        TextBlock([10, 11], loss=True),
        VaeImage(pixels=_image(), noisy=True),
        TextBlock([12]),
    ]
    packed = pack([[sample]], cfg)
    assert packed.shape == (1, sample_length(sample, cfg)) == (1, 18 + 18 + 4 + 18 + 3)
    positions = packed.position_ids[0].tolist()
    assert positions[:18] == [0] * 18 and positions[18:36] == [1] * 18
    assert positions[36:40] == [2, 3, 4, 5]
    assert positions[40:58] == [6] * 18  # noisy block shares the next id ...
    assert positions[58:] == [6, 7, 8]  # ... and does not advance it
    assert packed.split_kinds.tolist() == [FULL, FULL, CAUSAL, NOISE, CAUSAL]
    gen = packed.gen_mask[0]
    assert gen[1:17].all() and not gen[0] and not gen[17] and not gen[18:40].any() and gen[41:57].all()
    specials = cfg.special_tokens
    assert packed.ce_labels.tolist() == [10, 11, specials.im_end]
    assert packed.ce_index.tolist() == [36, 37, 38]
    assert packed.input_ids[0, 36].item() == specials.im_start
    assert packed.vae_noisy.tolist() == [False, True]
    assert packed.rope_advance == [9]


def test_mask_rules(tiny_bagel_config) -> None:
    sample_a = [TextBlock([1, 2]), VitImage(_image(8)), VaeImage(pixels=_image(), noisy=True), TextBlock([3])]
    sample_b = [TextBlock([4, 5, 6])]
    packed = pack([[sample_a, sample_b]], tiny_bagel_config)
    mask = packed.block_mask()[0]
    text1, vit, noise, text2, other = _spans(packed)
    # causal text
    assert mask[text1[0] + 1, text1[0]] and not mask[text1[0], text1[0] + 1]
    # image blocks are bidirectional and see the earlier text
    assert mask[vit[0], vit[1] - 1] and mask[vit[1] - 1, vit[0]] and mask[vit[0], text1[0]]
    assert mask[noise[0], noise[1] - 1] and mask[noise[1] - 1, noise[0]] and mask[noise[0], vit[0]]
    # nothing after a noisy block sees it, but it sees the clean blocks before it
    assert not mask[text2[0] : text2[1], noise[0] : noise[1]].any()
    assert mask[text2[0], vit[0] : vit[1]].all()
    # the second sample of the pack sees only itself
    assert not mask[other[0] : other[1], : other[0]].any()
    assert not mask[: other[0], other[0] : other[1]].any()
    assert mask[other[1] - 1, other[0] : other[1]].all()


def test_packed_samples_do_not_interact(tiny_bagel) -> None:
    """A sample's outputs in a pack equal its outputs alone; noisy latents never reach later tokens."""
    cfg = tiny_bagel.config
    a = [TextBlock([7, 8, 9]), VaeImage(pixels=_image(), noisy=True), TextBlock([10, 11])]
    b = [VitImage(_image(8)), TextBlock([12, 13], loss=True)]
    together, alone_b = pack([[a, b]], cfg), pack([[b]], cfg)
    tokens = torch.randn(16, cfg.latent_token_dim)
    t = torch.full((16,), 0.7)
    with torch.no_grad():
        out_together = tiny_bagel.forward_packed(together, tokens, t).hidden[0]
        out_b = tiny_bagel.forward_packed(alone_b).hidden[0]
        start_b = together.valid_lengths[0] - alone_b.valid_lengths[0]
        torch.testing.assert_close(out_together[start_b:], out_b, atol=1e-5, rtol=1e-5)
        other_noise = tiny_bagel.forward_packed(together, torch.randn(16, cfg.latent_token_dim), t).hidden[0]
    text2 = _spans(together)[2]
    torch.testing.assert_close(other_noise[text2[0] : text2[1]], out_together[text2[0] : text2[1]])
    assert not torch.allclose(other_noise[5:21], out_together[5:21])  # the noisy block itself does change


def test_rows_are_padded_and_rope_can_continue(tiny_bagel_config) -> None:
    packed = pack(
        [[[TextBlock([1, 2, 3])]], [[TextBlock([4])]], [[]]], tiny_bagel_config, rope_start=[5, 0, 2]
    )
    assert packed.shape == (3, 5) and packed.valid_lengths == [5, 3, 0]
    assert packed.position_ids[0].tolist() == [5, 6, 7, 8, 9]
    assert packed.sample_ids[1].tolist() == [1, 1, 1, -1, -1]
    mask = packed.block_mask()
    assert mask[1, 3].tolist() == [False, False, False, True, False]  # padding sees only itself
    assert packed.rope_advance == [5, 3, 0]


def test_per_sample_attention_equals_block_mask_attention(tiny_bagel_config) -> None:
    """Attending each sample alone (length-bucketed padded batches) gives the block-mask attention's
    outputs and gradients."""
    a = [TextBlock([1, 2]), VitImage(_image(8)), VaeImage(pixels=_image(), noisy=True), TextBlock([3])]
    b = [TextBlock([4, 5, 6])]
    packed = pack([[a, b], [b]], tiny_bagel_config)  # row 1 is padded
    block_mask = packed.block_mask()
    segments = SampleSegments.from_block_mask(block_mask, packed.sample_ids)
    assert len(segments.buckets) > 1  # long and short samples are batched apart
    rows, seq = packed.shape
    q = torch.randn(rows, 4, seq, 8, requires_grad=True)
    k, v = torch.randn(rows, 2, seq, 8, requires_grad=True), torch.randn(rows, 2, seq, 8, requires_grad=True)
    weights = torch.randn(rows, 4, seq, 8)
    per_sample = segments.attend(q, k, v, enable_gqa=True)
    grads = torch.autograd.grad((per_sample * weights).sum(), (q, k, v))
    whole = F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask[:, None], enable_gqa=True)
    torch.testing.assert_close(per_sample, whole)
    for got, expected in zip(grads, torch.autograd.grad((whole * weights).sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, expected)


def test_per_sample_attention_refuses_a_split_sample(tiny_bagel_config) -> None:
    packed = pack([[[TextBlock([1, 2])], [TextBlock([3])]]], tiny_bagel_config)
    sample_ids = packed.sample_ids.clone()
    sample_ids[0, -1] = 0  # sample 0 again after sample 1
    with pytest.raises(ValueError, match="not contiguous"):
        SampleSegments.from_block_mask(packed.block_mask(), sample_ids)
