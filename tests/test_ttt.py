"""Training-time test: EAGLE-3's mask, loss positions, the loss terms, and the parallel pass against a
sequential reference that drafts position by position exactly as decoding does."""

import dataclasses
import math

import pytest
import torch

from hyperbagel.backbone.packing import TextBlock, VitImage, pack
from hyperbagel.speculative.draft_head import DraftHead, DraftHeadConfig
from hyperbagel.speculative.ttt import (
    DraftVocabulary,
    TTTCache,
    acceptance_length,
    loss_positions,
    step_result,
    target_predictions,
    ttt_loss,
    ttt_steps,
)
from hyperbagel.speculative.vocab import vocab_maps

NUM_STEPS = 4


def _pack(tiny_bagel, rows):
    return pack(rows, tiny_bagel.config)


def _samples():
    image = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    a = [VitImage(image), TextBlock([10, 11, 12]), TextBlock([20, 21, 22, 23, 24], loss=True)]
    b = [TextBlock([13, 14]), TextBlock([25, 26, 27], loss=True)]
    c = [TextBlock([15, 16, 17, 18]), VitImage(image), TextBlock([28, 29, 30, 31], loss=True)]
    return a, b, c


VARIANTS = {
    "meta_query": DraftHeadConfig(aggregation="meta_query", num_layers=2),
    "eagle3": DraftHeadConfig(aggregation="eagle3", num_layers=1),
    "eagle3_compatible": DraftHeadConfig(
        aggregation="eagle3", num_layers=1, zero_init=False, eagle3_compatible=True
    ),
}


def _draft(target, config: DraftHeadConfig) -> DraftHead:
    """A draft head with a reduced vocabulary and every weight non-zero (zero init would hide the fusion
    paths from the comparisons)."""
    torch.manual_seed(0)
    vocab = target.config.llm.vocab_size
    config = dataclasses.replace(config, zero_init=False, draft_vocab_size=vocab - 12)
    counts = torch.randint(0, 100, (vocab,), generator=torch.Generator().manual_seed(3))
    return DraftHead.from_target(target, config, counts).eval()


@pytest.fixture(params=list(VARIANTS))
def setup(request, tiny_bagel):
    return tiny_bagel, _draft(tiny_bagel, VARIANTS[request.param])


class ConcatenatingCache:
    """The plainest autograd-safe cache: keys/values of every call concatenated (the chained reference)."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        if layer in self.keys:
            keys = torch.cat([self.keys[layer], keys], dim=2)
            values = torch.cat([self.values[layer], values], dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values


def test_ttt_cache_attention_equals_eagle3s_mask_over_every_step() -> None:
    """Step j of TTTCache equals one SDPA over the keys of steps 0..j under EAGLE-3's hand-written mask."""
    block = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)[None]  # 0-1: an image block
    eagle3_mask = torch.tensor(  # step 2: [step 0 | step 1 | step 2] keys
        [
            [1, 1, 0, 1, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0, 0, 1, 0],
            [1, 1, 1, 0, 0, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )[None, None]
    torch.manual_seed(0)
    q = [torch.randn(1, 4, 3, 8) for _ in range(3)]  # 4 query heads over 2 key/value heads (GQA)
    k = [torch.randn(1, 2, 3, 8) for _ in range(3)]
    v = [torch.randn(1, 2, 3, 8) for _ in range(3)]
    cache = TTTCache()
    outputs = [cache.attend(0, q[j], k[j], v[j], block[:, None]) for j in range(3)]
    keys, values = torch.cat(k, dim=2), torch.cat(v, dim=2)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[2], keys, values, attn_mask=eagle3_mask, enable_gqa=True
    )
    torch.testing.assert_close(outputs[2], expected)
    first = torch.nn.functional.scaled_dot_product_attention(
        q[0], k[0], v[0], attn_mask=block[:, None], enable_gqa=True
    )
    torch.testing.assert_close(outputs[0], first)


def test_loss_positions_are_the_answer_tokens_whose_target_lies_in_the_block(tiny_bagel) -> None:
    # tokens: <s> 10 11 </s> <s> 20 21 22 </s>   (positions 0-3 question, 4-8 answer)
    packed = _pack(tiny_bagel, [[[TextBlock([10, 11]), TextBlock([20, 21, 22], loss=True)]]])
    valid = loss_positions(packed, 4)[:, 0].int()
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 1, 1, 1, 0, 0],  # step 0: i + 2 <= 8
            [0, 0, 0, 0, 1, 1, 0, 0, 0],  # step 1: i + 3 <= 8
            [0, 0, 0, 0, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )
    assert torch.equal(valid, expected)


def test_acceptance_length_from_step_accuracies() -> None:
    assert acceptance_length([]) == 1.0
    assert acceptance_length([1.0, 1.0, 1.0]) == 4.0
    assert acceptance_length([0.5, 0.5]) == pytest.approx(1.75)
    assert acceptance_length([0.8, 0.5, 0.0, 1.0]) == pytest.approx(1 + 0.8 + 0.4)


def test_step_loss_terms_by_hand() -> None:
    """KL over the renormalised draft vocabulary, CE on the target argmax; an argmax outside the draft
    vocabulary leaves the loss but counts as a miss."""
    vocab = DraftVocabulary.from_maps(*vocab_maps(torch.tensor([0, 2, 3]), 5))  # draft ids 0, 1, 2
    assert vocab.target_to_draft.tolist() == [0, -1, 1, 2, -1]
    target_hidden = torch.zeros(1, 4, 5)
    target_hidden[0, 1] = torch.tensor([2.0, 0.0, 1.0, -1.0, 0.0])  # argmax 0 (in the draft vocab)
    target_hidden[0, 2] = torch.tensor([0.0, 0.0, 1.0, 0.5, 3.0])  # argmax 4 (outside)
    valid = torch.tensor([[[1, 1, 0, 0]]], dtype=torch.bool)  # step 0 at positions 0 and 1
    target = target_predictions(lambda h: h, target_hidden, valid, vocab)
    draft = torch.zeros(1, 4, 3)
    draft[0, 0] = torch.tensor([0.5, 1.0, 0.0])  # argmax draft 1 = target 2: wrong
    draft[0, 1] = torch.tensor([0.0, 0.0, 2.0])  # argmax target 3, target says 4: wrong
    result = step_result(draft, valid[0], 0, target, vocab)
    p = torch.softmax(torch.tensor([2.0, 1.0, -1.0]), 0)
    q = torch.softmax(torch.tensor([0.5, 1.0, 0.0]), 0)
    assert result.kl.item() == pytest.approx(float((p * (p / q).log()).sum()), abs=1e-6)
    assert result.ce.item() == pytest.approx(-math.log(q[0]), abs=1e-6)
    assert (result.correct, result.count) == (0, 2)
    draft[0, 0] = torch.tensor([3.0, 1.0, 0.0])
    assert step_result(draft, valid[0], 0, target, vocab).correct == 1


def _sequential_reference(draft, features, packed, num_steps):
    """Decoding's order on a one-sample pack: the draft cache grows over the real context (an image block
    in one forward, text one token at a time); after each text token, chain steps then roll back."""
    ids, pos = packed.input_ids, packed.position_ids
    block = packed.block_mask()[0]
    seq = ids.shape[1]
    cache = draft.new_cache(capacity=seq + num_steps)
    split, kinds = packed.split_ids[0], packed.split_kinds
    reference = {}
    i = 0
    while i < seq:
        if kinds[split[i]] != 0:  # an image block enters at once, as in a prefill
            chunk = (split == split[i]).nonzero().squeeze(1)
        else:
            chunk = torch.tensor([i])
        next_ids = torch.cat([ids[:, 1:], ids.new_zeros(1, 1)], dim=1)
        mask = cache.attention_mask(chunk.numel(), block_mask=block[chunk][:, chunk])
        logits, hidden = draft(features[:, chunk], next_ids[:, chunk], pos[:, chunk], cache, mask)
        cache.commit(chunk.numel(), 1)
        if chunk.numel() == 1 and i + 1 < seq:  # (the last token has no next token to read)
            reference[(i, 0)] = logits[0, -1]
            h = hidden[:, -1:]
            for j in range(1, num_steps):
                if i + 1 + j >= seq:
                    break
                logits, h = draft(h, ids[:, i + 1 + j : i + 2 + j], pos[:, i : i + 1] + j, cache)
                cache.commit(1, 1)
                reference[(i, j)] = logits[0, -1]
            cache.rollback(i + 1)
        i += chunk.numel()
    return reference


@torch.no_grad()
def test_parallel_pass_equals_sequential_drafting(setup) -> None:
    target, draft = setup
    a, b, c = _samples()
    packed = _pack(target, [[a, b], [c]])  # two rows, two samples in the first, padding in the second
    states = target.forward_packed(packed, output_hidden_states=True).hidden_states
    features = draft.fuse(states, packed.position_ids)
    parallel = list(
        ttt_steps(draft, features, packed.input_ids, packed.position_ids, packed.block_mask(), NUM_STEPS)
    )
    compared = 0
    for row, row_samples in enumerate([[a, b], [c]]):
        offset = 0
        for sample in row_samples:
            alone = _pack(target, [[sample]])
            length = alone.shape[1]
            reference = _sequential_reference(
                draft, features[row : row + 1, offset : offset + length], alone, NUM_STEPS
            )
            for (i, j), logits in reference.items():
                torch.testing.assert_close(parallel[j][row, offset + i], logits, rtol=0, atol=1e-5)
                compared += 1
            offset += length
    assert compared > 60


def test_gradients_through_the_concatenating_cache(setup) -> None:
    """Gradients of the parallel pass equal those of per-position chains run on a concatenating cache."""
    target, draft = setup
    a, _, _ = _samples()
    packed = _pack(target, [[a]])
    with torch.no_grad():
        states = target.forward_packed(packed, output_hidden_states=True).hidden_states
    block = packed.block_mask()
    ids, pos = packed.input_ids, packed.position_ids
    seq = ids.shape[1]
    positions = [seq - 8, seq - 6, seq - 5]
    weights = torch.randn(NUM_STEPS, len(positions), draft.lm_head.out_features)

    def parallel_objective():
        features = draft.fuse(states, pos)
        steps = ttt_steps(draft, features, ids, pos, block, NUM_STEPS)
        return sum((logits[0, positions] * weights[j]).sum() for j, logits in enumerate(steps))

    def chained_objective():
        features = draft.fuse(states, pos)
        total = 0.0
        for k, i in enumerate(positions):
            cache = ConcatenatingCache()
            prefix = slice(0, i + 1)
            next_ids = torch.cat([ids[:, 1:], ids.new_zeros(1, 1)], dim=1)
            mask = block[:, prefix, prefix][:, None]
            logits, h = draft(features[:, prefix], next_ids[:, prefix], pos[:, prefix], cache, mask)
            total = total + (logits[0, -1] * weights[0, k]).sum()
            h = h[:, -1:]
            for j in range(1, NUM_STEPS):
                mask = torch.ones(1, 1, 1, i + 1 + j, dtype=torch.bool)
                logits, h = draft(h, ids[:, i + 1 + j : i + 2 + j], pos[:, i : i + 1] + j, cache, mask)
                total = total + (logits[0, -1] * weights[j, k]).sum()
        return total

    grads = []
    for objective in (parallel_objective, chained_objective):
        draft.zero_grad()
        objective().backward()
        grads.append({n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None})
    trainable = {name for name, p in draft.named_parameters() if p.requires_grad}
    assert set(grads[0]) == set(grads[1]) == trainable
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5)


def test_ttt_loss_trains_the_draft_towards_the_target(tiny_bagel) -> None:
    """The weighted loss falls under a few optimizer steps; empty packs give a zero loss in the graph."""
    target, draft = tiny_bagel, _draft(tiny_bagel, VARIANTS["meta_query"])
    draft.train()
    a, b, c = _samples()
    packed = _pack(target, [[a, b, c]])
    with torch.no_grad():
        states = target.forward_packed(packed, output_hidden_states=True).hidden_states
    vocab = DraftVocabulary.from_maps(draft.d2t, draft.t2d)

    def head(h):
        return target.language_model.lm_head(target.language_model.model.norm(h))

    optimizer = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        result = ttt_loss(draft, states, packed, head, vocab, 3)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        losses.append(result.loss.item())
    assert losses[-1] < 0.8 * losses[0]
    terms = result.terms()
    assert {"loss", "loss_1", "kl_0", "ce_2", "acc_2"} <= set(terms)
    for j in range(3):
        assert terms[f"loss_{j}"].item() == pytest.approx((terms[f"kl_{j}"] + 0.1 * terms[f"ce_{j}"]).item())
    weighted = sum(0.8**j * terms[f"loss_{j}"] for j in range(3))
    assert result.loss.item() == pytest.approx(weighted.item(), rel=1e-6)
    assert [s.count for s in result.steps] == [5 + 3 + 4, 4 + 2 + 3, 3 + 1 + 2]  # answers of 5, 3, 4 tokens

    no_answer = _pack(target, [[[TextBlock([10, 11])]]])
    with torch.no_grad():
        states = target.forward_packed(no_answer, output_hidden_states=True).hidden_states
    empty = ttt_loss(draft, states, no_answer, head, vocab, 3)
    assert empty.loss.item() == 0.0 and empty.loss.requires_grad
