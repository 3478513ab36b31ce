"""The draft head against the target it is cut from, its caches, its errors, and the draft vocabulary."""

import pytest
import torch

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.kv_cache import KVCache
from hyperbagel.backbone.packing import TextBlock, pack
from hyperbagel.speculative.draft_head import DraftHead, DraftHeadConfig, default_tap_layers
from hyperbagel.speculative.vocab import (
    check_maps,
    count_tokens,
    draft_to_target,
    select_draft_vocab,
    target_to_draft,
    vocab_maps,
)

LAYERS = 6
COMPATIBLE = dict(aggregation="eagle3", num_layers=1, zero_init=False, eagle3_compatible=True)


@pytest.fixture
def target(tiny_bagel_config) -> Bagel:
    """The tiny preset with 6 layers (EAGLE-3's taps need depth) and non-trivial norms."""
    config = tiny_bagel_config.copy()
    config.llm.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    model = Bagel(config).eval()
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _counts(vocab: int) -> torch.Tensor:
    return torch.randint(0, 100, (vocab,), generator=torch.Generator().manual_seed(1))


def _states(
    target: Bagel, ids: torch.Tensor, positions: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The target's hidden states (index i = input of layer i) and its logits, text-only."""
    lm = target.language_model
    with torch.no_grad():
        out = lm.model(lm.model.embed_tokens(ids), positions, output_hidden_states=True)
        return out.hidden_states, lm.lm_head(out.last_hidden_state)


def _inputs(vocab: int, batch: int = 2, seq: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([0, 1, 2, 3, 3, 3, 3, 4, 5][:seq])  # an image block shares one RoPE id
    return ids, positions[None].expand(batch, -1)


@pytest.mark.parametrize(("aggregation", "num_layers"), [("eagle3", 2), ("meta_query", 2), ("meta_query", 1)])
def test_zero_init_head_is_the_target_tail(target, aggregation, num_layers):
    vocab = target.config.llm.vocab_size
    config = DraftHeadConfig(aggregation=aggregation, num_layers=num_layers, draft_vocab_size=20)
    head = DraftHead.from_target(target, config, _counts(vocab)).eval()
    ids, positions = _inputs(vocab)
    states, target_logits = _states(target, ids, positions)
    with torch.no_grad():
        features = head.fuse(states, positions)
        logits, hidden = head(features, ids, positions)
    exact = dict(rtol=0.0, atol=1e-6)
    torch.testing.assert_close(features, states[LAYERS - num_layers], **exact)
    torch.testing.assert_close(hidden, states[LAYERS], **exact)
    draft_ids = torch.arange(20) + head.d2t
    torch.testing.assert_close(logits, target_logits[..., draft_ids], **exact)

    config.zero_init = False  # the same head without zero init is not the target's tail
    other = DraftHead.from_target(target, config, _counts(vocab)).eval()
    with torch.no_grad():
        _, hidden = other(other.fuse(states, positions), ids, positions)
    assert (hidden - states[LAYERS]).abs().max() > 1e-3


def test_shapes_vocabulary_and_trainable_parts(target):
    vocab, hidden_size = target.config.llm.vocab_size, target.config.hidden_size
    head = DraftHead.from_target(target, DraftHeadConfig(draft_vocab_size=12), _counts(vocab))
    assert (head.hidden_size, head.target_vocab_size, head.draft_vocab_size, head.num_target_layers) == (
        hidden_size,
        vocab,
        12,
        LAYERS,
    )
    assert head.d2t.dtype == torch.long and head.d2t.shape == (12,)
    assert head.t2d.dtype == torch.bool and head.t2d.shape == (vocab,) and int(head.t2d.sum()) == 12
    specials = list(target.config.special_tokens.to_dict().values())
    assert head.t2d[specials].all()
    draft_ids = head.to_target_ids(torch.arange(12))
    assert torch.equal(head.lm_head.weight, target.language_model.lm_head.weight[draft_ids])
    assert torch.equal(head.to_draft_ids(draft_ids), torch.arange(12))
    assert not head.embed_tokens.weight.requires_grad
    assert torch.equal(head.embed_tokens.weight, target.language_model.model.embed_tokens.weight)
    assert head.tap_layers == (2, 3, 3)

    ids, positions = _inputs(vocab, batch=3, seq=7)
    states, _ = _states(target, ids, positions)
    features = head.fuse(states, positions)
    logits, out = head(features, ids, positions)
    assert features.shape == out.shape == (3, 7, hidden_size)
    assert logits.shape == (3, 7, 12) and logits.dtype == torch.float32
    logits.logsumexp(-1).sum().backward()
    for name in ("fc1", "fc2", "dec.self_attn.o_proj", "dec.mlp.down_proj"):  # zero-init yet learning
        assert head.get_submodule(name).weight.grad.abs().sum() > 0, name
    assert head.embed_tokens.weight.grad is None


def test_default_taps_are_eagle3s():
    assert default_tap_layers(28) == (2, 14, 25)
    assert default_tap_layers(2) == (2, 1, 0)


class ConcatCache:
    """A training-time cache that concatenates (keeps autograd), as the trainer may pass."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.kv:
            k, v = torch.cat([self.kv[layer][0], k], 2), torch.cat([self.kv[layer][1], v], 2)
        self.kv[layer] = (k, v)
        return k, v


@pytest.mark.parametrize(
    "config",
    [dict(aggregation="eagle3", zero_init=False), dict(zero_init=False), COMPATIBLE],
    ids=["eagle3", "meta_query", "eagle3_compatible"],
)
def test_cached_incremental_forward_equals_full(target, config):
    vocab = target.config.llm.vocab_size
    head = DraftHead.from_target(target, DraftHeadConfig(**config)).eval()
    ids, positions = _inputs(vocab)
    states, _ = _states(target, ids, positions)
    with torch.no_grad():
        full_features = head.fuse(states, positions)
        full_logits, full_hidden = head(full_features, ids, positions)
        fusion_cache, cache = head.new_fusion_cache(4, 2), head.new_cache(4, 2)  # small: caches grow
        parts = []
        for start, end in [(0, 5), (5, 6), (6, 7), (7, 9)]:
            window = slice(start, end)
            features = head.fuse([s[:, window] for s in states], positions[:, window], fusion_cache)
            logits, hidden = head(features, ids[:, window], positions[:, window], cache)
            for c in (fusion_cache, cache):
                if c is not None:
                    c.commit(end - start, end - start)
            parts.append((features, logits, hidden))
    for full, got in zip((full_features, full_logits, full_hidden), zip(*parts)):
        torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=0.0, atol=1e-5)

    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].expand(2, 1, 9, 9)
    with torch.no_grad():
        features = head.fuse(states, positions, ConcatCache(), causal)
        logits, hidden = head(features, ids, positions, ConcatCache(), causal)
    torch.testing.assert_close(features, full_features, rtol=0.0, atol=1e-5)
    torch.testing.assert_close(hidden, full_hidden, rtol=0.0, atol=1e-5)
    with pytest.raises(ValueError, match="explicit attention_mask"):
        head(features, ids, positions, ConcatCache())


def test_caches_follow_the_architecture(target):
    head = DraftHead.from_target(target, DraftHeadConfig(num_layers=2))
    fusion, cache = head.new_fusion_cache(8, 3), head.new_cache(8, 3)
    kv_heads, head_dim = target.config.llm.num_key_value_heads, target.config.llm.head_dim
    assert isinstance(fusion, KVCache) and fusion.keys.shape == (1, 3, kv_heads, 8, head_dim)
    assert cache.keys.shape == (2, 3, kv_heads, 8, head_dim)
    assert DraftHead.from_target(target, DraftHeadConfig(aggregation="eagle3")).new_fusion_cache(8) is None


def test_mismatches_are_named(target, tiny_bagel_config):
    vocab = target.config.llm.vocab_size
    head = DraftHead.from_target(target, DraftHeadConfig())
    ids, positions = _inputs(vocab)
    states, _ = _states(target, ids, positions)
    with pytest.raises(ValueError, match="fuse got 6 hidden states; a 6-layer target gives 7"):
        head.fuse(states[:-1], positions)
    with pytest.raises(ValueError, match="hidden states have size 16"):
        head.fuse([s[..., :16] for s in states], positions)
    with pytest.raises(ValueError, match="disagree"):
        head(states[0], ids[:, :3], positions)

    wider = tiny_bagel_config.copy()
    wider.llm.hidden_size, wider.llm.vocab_size = 48, vocab + 4
    with pytest.raises(
        ValueError, match=r"hidden_size: draft 32 vs target 48, vocab_size: .*num_hidden_layers: draft 6"
    ):
        head.check_target(Bagel(wider))
    head.check_target(target)

    with pytest.raises(ValueError, match="num_layers 7 exceeds the target's 6 layers"):
        DraftHead.from_target(target, DraftHeadConfig(num_layers=7))
    with pytest.raises(ValueError, match=r"tap_layers \(2, 3, 7\)"):
        DraftHead.from_target(target, DraftHeadConfig(tap_layers=(2, 3, 7)))
    with pytest.raises(ValueError, match="needs token counts"):
        DraftHead.from_target(target, DraftHeadConfig(draft_vocab_size=10))
    with pytest.raises(ValueError, match=rf"shape \(5,\); the target vocabulary needs \({vocab},\)"):
        DraftHead.from_target(target, DraftHeadConfig(draft_vocab_size=10), torch.ones(5))
    with pytest.raises(ValueError, match="draft_vocab_size 999"):
        DraftHead.from_target(target, DraftHeadConfig(draft_vocab_size=999), _counts(vocab))
    with pytest.raises(ValueError, match="eagle3_compatible needs"):
        DraftHeadConfig(eagle3_compatible=True)
    with pytest.raises(ValueError, match="num_queries must be >= 3"):
        DraftHeadConfig(num_queries=2)


# --- the draft vocabulary ---------------------------------------------------------------------------
def test_count_tokens_from_packs_and_id_lists(tiny_bagel_config):
    packed = pack([[[TextBlock([10, 11, 10], loss=True), TextBlock([12], loss=False)]]], tiny_bagel_config)
    im_end = tiny_bagel_config.special_tokens.im_end  # the loss-bearing labels: 10 11 10 <|im_end|>
    counts = count_tokens([packed, [12, 12], torch.tensor([[11]])], vocab_size=20)
    expected = torch.zeros(20, dtype=torch.long)
    expected[[10, 11, 12, im_end]] = torch.tensor([2, 2, 2, 1])
    assert torch.equal(counts, expected)
    with pytest.raises(ValueError, match="source 1 holds token id 20"):
        count_tokens([[1], [20]], vocab_size=20)


def test_draft_vocabulary_choice_and_maps_round_trip():
    counts = torch.tensor([5, 0, 9, 9, 1, 3])
    assert select_draft_vocab(6, 3, counts, special_ids=[1]).tolist() == [1, 2, 3]  # tie 2/3: both fit
    assert select_draft_vocab(6, 2, counts, special_ids=[1]).tolist() == [1, 2]  # tie goes to the lower id
    assert select_draft_vocab(6, 4, counts, special_ids=[1]).tolist() == [0, 1, 2, 3]
    assert select_draft_vocab(6, None).tolist() == list(range(6))
    with pytest.raises(ValueError, match="cannot hold the 2 special ids"):
        select_draft_vocab(6, 1, counts, special_ids=[0, 5])

    d2t, t2d = vocab_maps(torch.tensor([1, 2, 3, 5]), 6)
    assert d2t.tolist() == [1, 1, 1, 2]
    assert t2d.tolist() == [False, True, True, True, False, True]
    draft = torch.tensor([[0, 3], [2, 1]])
    assert draft_to_target(draft, d2t).tolist() == [[1, 5], [3, 2]]
    assert torch.equal(target_to_draft(draft_to_target(draft, d2t), t2d), draft)
    assert target_to_draft(torch.tensor([0, 4, 5]), t2d).tolist() == [-1, -1, 3]
    check_maps(d2t, t2d)
    with pytest.raises(ValueError, match="disagree"):
        check_maps(d2t, t2d.logical_not())
    with pytest.raises(ValueError, match="ascending"):
        vocab_maps(torch.tensor([2, 1]), 6)
