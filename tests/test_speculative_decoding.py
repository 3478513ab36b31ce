"""Speculative decoding against plain decoding: greedy identity, acceptance lengths, trees, caches and
the distribution of sampled answers."""

import math

import pytest
import torch
from PIL import Image
from torch import nn
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.config import SpecialTokenIds, tiny_config
from hyperbagel.backbone.image_transforms import vit_input
from hyperbagel.backbone.inference import BagelInferencer, generate_text, prefill
from hyperbagel.backbone.kv_cache import KVCache
from hyperbagel.backbone.packing import TextBlock, VitImage, pack
from hyperbagel.speculative.decoding import (
    SpeculativeConfig,
    SpeculativeGenerator,
    SpeculativeSession,
    accept_chain_sampled,
    speculative_generate,
)
from hyperbagel.speculative.draft_head import DraftHead, DraftHeadConfig
from hyperbagel.speculative.tree import DraftTree, draft_tree, greedy_path, sample_path, select_tree

CHAIN = SpeculativeConfig(mode="chain", num_steps=3)
CHAIN_STOPPING = SpeculativeConfig(mode="chain", num_steps=3, chain_min_prob=0.5)
TREE = SpeculativeConfig(mode="tree", tree_depth=3, tree_top_k=3, tree_total_tokens=9)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and leave the other core alone)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ScriptedDraft(nn.Module):
    """A drafter with DraftHead's API whose proposals come from a table keyed by RoPE id: its output at
    position id r is `table[r + 2]` (the pairing rule: it predicts the token two positions on). With a
    real `head`, features, hidden states and caches are the head's (so cache handling is exercised);
    without, it is a pure stand-in that writes no cache."""

    def __init__(self, target: Bagel, table: torch.Tensor, head: DraftHead | None = None) -> None:
        super().__init__()
        llm = target.config.llm
        self.head = head
        self.hidden_size, self.target_vocab_size = llm.hidden_size, llm.vocab_size
        self.num_target_layers, self.draft_vocab_size = llm.num_hidden_layers, llm.vocab_size
        self.register_buffer("d2t", torch.zeros(llm.vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(llm.vocab_size, dtype=torch.bool))
        self.table = table
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input ids, position ids) per forward

    def check_target(self, target: Bagel) -> None:
        assert target.config.llm.hidden_size == self.hidden_size

    def new_cache(self, capacity: int, batch_size: int = 1) -> KVCache:
        if self.head is not None:
            return self.head.new_cache(capacity, batch_size)
        return KVCache(1, batch_size, 1, 1, capacity)

    def new_fusion_cache(self, capacity: int, batch_size: int = 1) -> KVCache | None:
        return self.head.new_fusion_cache(capacity, batch_size) if self.head is not None else None

    def fuse(self, states, position_ids, cache=None, attention_mask=None) -> torch.Tensor:
        if self.head is not None:
            return self.head.fuse(states, position_ids, cache, attention_mask)
        return states[-1]

    def forward(self, features, input_ids, position_ids, cache=None, attention_mask=None):
        self.calls.append((input_ids, position_ids))
        hidden = features
        if self.head is not None:
            _, hidden = self.head(features, input_ids, position_ids, cache, attention_mask)
        rows = (position_ids + 2).clamp(0, self.table.shape[0] - 1)
        return self.table[rows].float(), hidden

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]


def _script(vocab: int, cursor: int, sequence: list[int], hits: list[bool]) -> torch.Tensor:
    """Draft logits by RoPE id for an answer `sequence` starting at RoPE id `cursor`: a hit puts the
    token far ahead (the draft proposes it), a miss far behind (it never proposes it)."""
    table = torch.zeros(cursor + len(sequence) + 8, vocab)
    for offset, (token, hit) in enumerate(zip(sequence, hits)):
        table[cursor + offset, token] = 10.0 if hit else -1e4
    return table


def _reference(target: Bagel, sample, max_new_tokens: int) -> tuple[list[int], KVCache, int]:
    """Plain greedy decoding: the answer, the cache it leaves, and the answer's first RoPE id."""
    cache = prefill(target, [sample], capacity_margin=max_new_tokens + 2)
    cursor = cache.rope_cursor[0]
    return generate_text(target, cache, max_new_tokens)[0], cache, cursor


def _picture(color: str) -> Image.Image:
    image = Image.new("RGB", (16, 16), color)
    image.paste("white", (4, 4, 10, 12))
    return image


def _head(target: Bagel, **config) -> DraftHead:
    torch.manual_seed(3)
    return DraftHead.from_target(target, DraftHeadConfig(**config)).eval()


TEXT = [TextBlock([10, 11, 12, 13])]


@pytest.mark.parametrize("config", [CHAIN, CHAIN_STOPPING, TREE], ids=["chain", "chain_min_prob", "tree"])
@pytest.mark.parametrize("drafter", ["oracle", "wrong"])
def test_greedy_is_plain_greedy_and_tau_is_exact(tiny_bagel, config, drafter):
    """The scripted oracle is sure of every token, the wrong drafter unsure of all: with chain_min_prob
    the latter drafts nothing, so the draft only runs to extend its cache."""
    steps = config.num_steps if config.mode == "chain" else config.tree_depth
    max_new = 3 * (steps + 1)
    answer, _, cursor = _reference(tiny_bagel, TEXT, max_new)
    assert len(answer) == max_new  # the window holds no <|im_end|>, so every round is a full one
    specials = tiny_bagel.config.special_tokens
    sequence = [specials.im_start, *answer, specials.im_end]
    vocab = tiny_bagel.config.llm.vocab_size
    draft = ScriptedDraft(tiny_bagel, _script(vocab, cursor, sequence, [drafter == "oracle"] * len(sequence)))
    with torch.no_grad():
        answers, stats = speculative_generate(tiny_bagel, draft, [TEXT], config, max_new)
    assert answers == [answer]
    assert stats.new_tokens == max_new
    expected_forwards = 3 if drafter == "oracle" else max_new
    assert stats.target_forwards == expected_forwards
    assert stats.acceptance_length == (steps + 1 if drafter == "oracle" else 1.0)
    assert stats.target_time_s > 0 and stats.draft_time_s > 0
    if config.chain_min_prob and drafter == "wrong":
        assert len(draft.calls) == max_new  # the start, then one extension after every round but the last


@pytest.mark.parametrize("min_prob", [-0.1, 1.0])
def test_chain_min_prob_must_be_a_probability_below_one(min_prob):
    with pytest.raises(ValueError, match="chain_min_prob"):
        SpeculativeConfig(chain_min_prob=min_prob)


@pytest.mark.parametrize("config", [CHAIN, TREE], ids=["chain", "tree"])
@pytest.mark.parametrize("aggregation", ["meta_query", "eagle3"])
def test_chat_over_a_vit_image_equals_plain_chat(tiny_bagel, shapes_tokenizer, config, aggregation):
    """A real draft head (random, so it is mostly wrong) behind the user-facing API."""
    head = _head(tiny_bagel, aggregation=aggregation, num_layers=1, zero_init=False)
    generator = SpeculativeGenerator(tiny_bagel, head, shapes_tokenizer, config)
    prompt, image = "what color is the circle ?", _picture("red")
    plain = BagelInferencer(tiny_bagel, shapes_tokenizer).chat([prompt], [[image]], max_new_tokens=20)
    assert generator.chat(prompt, [[image]], max_new_tokens=20) == plain
    assert generator.chat(prompt, image, max_new_tokens=20) == plain
    assert generator.last_stats.new_tokens >= 1
    sample = [VitImage(vit_input(image, tiny_bagel.config)), TextBlock(shapes_tokenizer.encode(prompt))]
    answer, _, _ = _reference(tiny_bagel, sample, 20)
    assert generator.generate(sample, max_new_tokens=20)[0] == answer


def test_batch_and_configuration_errors(tiny_bagel, shapes_tokenizer):
    head = _head(tiny_bagel, num_layers=1)
    generator = SpeculativeGenerator(tiny_bagel, head, shapes_tokenizer)
    with pytest.raises(ValueError, match="batch 1"):
        generator.chat(["a", "b"], max_new_tokens=2)
    with pytest.raises(ValueError, match="batch 1"):
        speculative_generate(tiny_bagel, head, [TEXT, TEXT])
    with pytest.raises(ValueError, match="non-empty context"):
        speculative_generate(tiny_bagel, head, [[]])
    with pytest.raises(ValueError, match="mode"):
        SpeculativeConfig(mode="beam")
    with pytest.raises(ValueError, match="tree_total_tokens"):
        SpeculativeConfig(tree_total_tokens=1)
    other = tiny_config(vocab_size=tiny_bagel.config.llm.vocab_size + 1)
    with pytest.raises(ValueError, match="vocab_size"):
        SpeculativeGenerator(Bagel(other), head, shapes_tokenizer)


def test_max_new_tokens_and_im_end_cut_the_answer_like_generate_text(tiny_bagel):
    answer, _, cursor = _reference(tiny_bagel, TEXT, 7)
    specials = tiny_bagel.config.special_tokens
    # the oracle proposes <|im_end|> where the target will not: rejected, the answer runs on
    sequence = [specials.im_start, *answer[:4], specials.im_end]
    vocab = tiny_bagel.config.llm.vocab_size
    draft = ScriptedDraft(tiny_bagel, _script(vocab, cursor, sequence, [True] * len(sequence)))
    with torch.no_grad():
        for max_new in (0, 1, 5, 7):
            got, stats = speculative_generate(tiny_bagel, draft, [TEXT], CHAIN, max_new)
            assert got == [answer[:max_new]] and stats.new_tokens == max_new
    with torch.no_grad():  # now the target ends the answer: <|im_end|> is always the argmax
        tiny_bagel.language_model.lm_head.weight.zero_()
        tiny_bagel.language_model.lm_head.weight[specials.im_end] = 1.0
        for config in (CHAIN, TREE):
            got, stats = speculative_generate(tiny_bagel, draft, [TEXT], config, 5)
            assert got == [[]] and stats.new_tokens == 1 and stats.target_forwards == 1


@pytest.mark.parametrize("config", [CHAIN, TREE], ids=["chain", "tree"])
def test_answer_ending_inside_a_round_leaves_generate_texts_cache(tiny_bagel, config):
    """The target is nudged to say <|im_end|> where its 5th token was; the oracle drafts it as the first
    token of round 2, so the tokens after it are drafted and committed too and must be rolled back."""
    answer, _, cursor = _reference(tiny_bagel, TEXT, 8)
    assert answer[4] not in answer[:4]
    im_start, im_end = tiny_bagel.config.special_tokens.im_start, tiny_bagel.config.special_tokens.im_end
    with torch.no_grad():
        cache = prefill(tiny_bagel, [TEXT])
        hidden = tiny_bagel.forward_tokens(torch.tensor([[im_start, *answer[:4]]]), cache).hidden[0, -1]
        head = tiny_bagel.language_model.lm_head.weight
        head[im_end] = head[answer[4]] + 0.01 * hidden / hidden.square().sum()
    ended, plain_cache, _ = _reference(tiny_bagel, TEXT, 8)
    assert ended == answer[:4]
    sequence = [im_start, *ended, im_end]
    vocab = tiny_bagel.config.llm.vocab_size
    draft = ScriptedDraft(tiny_bagel, _script(vocab, cursor, sequence, [True] * len(sequence)))
    with torch.no_grad():
        session = SpeculativeSession.start(tiny_bagel, draft, TEXT, config)
        got, stats = session.decode(8)
    assert got == ended and stats.target_forwards == 2 and stats.new_tokens == 5
    cache = session.target_cache
    assert cache.lengths == plain_cache.lengths and cache.rope_cursor == plain_cache.rope_cursor
    end = cache.lengths[0]
    torch.testing.assert_close(cache.keys[..., :end, :], plain_cache.keys[..., :end, :], rtol=0, atol=1e-5)


def _hand_tree() -> DraftTree:
    """Candidates (parents first):      root
                                         /    \\
                                     c0:21    c1:22
                                     /   \\       \\
                                 c2:31  c3:32    c4:33
                                   |
                                 c5:41
    c3 (score -3.0) is dropped when 5 nodes are kept."""
    tokens = torch.tensor([21, 22, 31, 32, 33, 41])
    parents = torch.tensor([-1, -1, 0, 0, 1, 2])
    depths = torch.tensor([1, 1, 2, 2, 2, 3])
    scores = torch.tensor([-0.1, -0.5, -0.3, -3.0, -0.9, -0.4])
    return select_tree(torch.tensor(7), tokens, parents, depths, scores, num_nodes=5)


def test_tree_selection_mask_and_positions_by_hand():
    tree = _hand_tree()
    assert tree.tokens.tolist() == [7, 21, 22, 31, 33, 41]
    assert tree.parents.tolist() == [0, 0, 0, 1, 2, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 0, 1, 0, 1, 0],
            [1, 1, 0, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tree.ancestors, expected)
    # the target's greedy tokens after each node: 21 after the root, 31 after 21, then 99 after 31
    path, bonus = greedy_path(tree, torch.tensor([21, 31, 0, 99, 0, 0]))
    assert path.tolist() == [0, 1, 3] and int(bonus) == 99
    path, bonus = greedy_path(tree, torch.tensor([22, 0, 33, 0, 5, 0]))
    assert path.tolist() == [0, 2, 4] and int(bonus) == 5
    path, bonus = greedy_path(tree, torch.tensor([8, 31, 33, 41, 0, 0]))  # root's child wrong
    assert path.tolist() == [0] and int(bonus) == 8
    ties = select_tree(  # equal scores: parents still come first
        torch.tensor(7),
        torch.tensor([1, 2, 3]),
        torch.tensor([-1, 0, 1]),
        torch.tensor([1, 2, 3]),
        torch.zeros(3),
        num_nodes=2,
    )
    assert ties.parents.tolist() == [0, 0, 1]


def test_tree_verification_equals_decoding_each_path_alone(tiny_bagel):
    tree = _hand_tree()
    tokens = tree.tokens.clone()
    tokens[1:] = torch.tensor([20, 21, 30, 31, 40])
    cache = prefill(tiny_bagel, [TEXT])
    length, cursor = cache.lengths[0], cache.rope_cursor[0]
    with torch.no_grad():
        tree_hidden = tiny_bagel.forward_tokens(
            tokens[None], cache, (cursor + tree.depths)[None], tree.ancestors, commit=False
        ).hidden[0]
        assert cache.lengths == [length] and cache.rope_cursor == [cursor]
        for node in range(tree.size):
            path = tree.ancestors[node].nonzero().squeeze(1)
            alone = prefill(tiny_bagel, [TEXT])
            hidden = tiny_bagel.forward_tokens(tokens[path][None], alone).hidden[0, -1]
            torch.testing.assert_close(tree_hidden[node], hidden, rtol=0.0, atol=1e-5)


class Recorder(nn.Module):
    """Passes a draft head through, keeping the logits of every forward."""

    def __init__(self, head: DraftHead) -> None:
        super().__init__()
        self.head = head
        self.logits: list[torch.Tensor] = []

    def forward(self, *args):
        logits, hidden = self.head(*args)
        self.logits.append(logits[0])
        return logits, hidden

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return self.head.to_target_ids(draft_ids)


def _naive_tree(head, cache, root_token, root_logits, root_hidden, root_position, depth, top_k, nodes):
    """EAGLE-2's expansion with every node's draft distribution recomputed as a chain from scratch;
    also returns the draft logits of each expanded depth ([top_k, Vd] per depth below the root)."""

    def chain_logits(path: list[int]) -> torch.Tensor:
        logits, hidden, scratch = root_logits, root_hidden, cache.clone()
        for step, token in enumerate(path):
            position = torch.tensor([[root_position + step + 1]])
            out, hidden = head(hidden, torch.tensor([[token]]), position, scratch)
            scratch.commit(1, 1)
            logits = out[0, -1]
        return logits

    tokens, parents, depths, scores, expanded = [], [], [], [], []
    frontier = [(-1, [], 0.0)]  # (candidate index, token path, cumulative log-prob)
    for level in range(1, depth + 1):
        children, level_logits = [], []
        for index, path, score in frontier:
            level_logits.append(chain_logits(path))
            values, ids = level_logits[-1].log_softmax(-1).topk(top_k)
            for value, token in zip(values.tolist(), ids.tolist()):
                children.append((len(tokens), path + [token], score + value))
                tokens.append(token)
                parents.append(index)
                depths.append(level)
                scores.append(score + value)
        if level > 1:
            expanded.append(torch.stack(level_logits))
        frontier = sorted(children, key=lambda child: -child[2])[:top_k]
    tree = select_tree(
        root_token,
        torch.tensor(tokens),
        torch.tensor(parents),
        torch.tensor(depths),
        torch.tensor(scores),
        nodes,
    )
    return tree, expanded


@pytest.mark.parametrize("aggregation", ["meta_query", "eagle3"])
def test_draft_tree_reuses_the_cache_exactly(tiny_bagel, aggregation):
    """Each depth's draft outputs equal those of the node's path drafted alone as a chain."""
    head = _head(tiny_bagel, aggregation=aggregation, num_layers=2, zero_init=False)
    session = SpeculativeSession.start(tiny_bagel, head, TEXT, TREE)
    cache = session.draft_cache
    lengths, cursor = list(cache.lengths), list(cache.rope_cursor)
    before = cache.keys[:, :, :, : lengths[0]].clone()
    position = session.target_cache.rope_cursor[0] - 1
    args = (session.pending, session.root_logits, session.root_hidden, position, 4, 3, 20)
    recorder = Recorder(head)
    with torch.no_grad():
        tree = draft_tree(recorder, cache, *args)
        reference, expanded = _naive_tree(head, cache, *args)
    assert cache.lengths == lengths and cache.rope_cursor == cursor
    assert torch.equal(cache.keys[:, :, :, : lengths[0]], before)
    assert len(recorder.logits) == len(expanded) == 3
    for got, want in zip(recorder.logits, expanded):
        torch.testing.assert_close(got, want, rtol=0.0, atol=1e-5)
    for name in ("tokens", "parents", "depths", "ancestors"):
        assert torch.equal(getattr(tree, name), getattr(reference, name)), name
    assert tree.size == 21


def test_compiled_head_drafts_like_the_eager_head(tiny_bagel, shapes_tokenizer):
    """`DraftHead.compile` (dynamo with dynamic shapes; the aot_eager backend, so no C++ toolchain is
    needed) over every kind of draft call: a context with an image block (masked prefill), extensions
    of several lengths, single chain steps and tree steps. The same drafts mean the same acceptance."""
    eager = _head(tiny_bagel, num_layers=1, zero_init=False)
    compiled = _head(tiny_bagel, num_layers=1, zero_init=False)
    compiled.compile(backend="aot_eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    image = VitImage(vit_input(_picture("blue"), tiny_bagel.config))
    sample = [image, TextBlock(shapes_tokenizer.encode("describe the image ."))]
    for config in (CHAIN, TREE):
        sessions = [SpeculativeSession.start(tiny_bagel, h, sample, config, 40) for h in (eager, compiled)]
        torch.testing.assert_close(sessions[1].root_logits, sessions[0].root_logits)
        (want, want_stats), (got, got_stats) = (session.decode(30) for session in sessions)
        assert got == want
        assert got_stats.target_forwards == want_stats.target_forwards
        torch.testing.assert_close(sessions[1].root_logits, sessions[0].root_logits)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs + 2  # fuse and forward


@pytest.mark.parametrize("config", [CHAIN, TREE], ids=["chain", "tree"])
def test_caches_after_rollback_match_plain_decoding(tiny_bagel, config):
    """A drafter right about 2 in 3 tokens (partial acceptances, non-contiguous tree paths) over a real
    head's caches, after a context with an image: the target's cache ends as generate_text leaves it,
    and the draft's caches hold exactly the entries of one draft pass over the committed sequence
    (under the pack's block mask, as in training)."""
    max_new = 17
    context = [VitImage(vit_input(_picture("blue"), tiny_bagel.config)), *TEXT]
    answer, plain_cache, cursor = _reference(tiny_bagel, context, max_new)
    specials = tiny_bagel.config.special_tokens
    sequence = [specials.im_start, *answer, specials.im_end]
    hits = [k % 3 != 2 for k in range(len(sequence))]
    head = _head(tiny_bagel, aggregation="meta_query", num_layers=2, zero_init=False)
    vocab = tiny_bagel.config.llm.vocab_size
    draft = ScriptedDraft(tiny_bagel, _script(vocab, cursor, sequence, hits), head)
    with torch.no_grad():
        session = SpeculativeSession.start(tiny_bagel, draft, context, config)
        got, stats = session.decode(max_new)
    assert got == answer and 1.0 < stats.acceptance_length < 4.0
    cache = session.target_cache
    assert cache.lengths == plain_cache.lengths and cache.rope_cursor == plain_cache.rope_cursor
    end = cache.lengths[0]
    for name in ("keys", "values"):
        torch.testing.assert_close(
            getattr(cache, name)[..., :end, :], getattr(plain_cache, name)[..., :end, :], rtol=0, atol=1e-5
        )
    drafted = session.draft_cache.lengths[0]
    assert end - 4 <= drafted <= end
    for draft_cache in (session.draft_cache, session.fusion_cache):
        assert draft_cache.lengths == [drafted]
        assert draft_cache.rope_cursor[0] - drafted == cache.rope_cursor[0] - end  # text: +1 per token
    full = pack([[[*context, TextBlock(answer)]]], tiny_bagel.config)
    window = slice(0, drafted)
    with torch.no_grad():
        states = tiny_bagel.forward_packed(full, output_hidden_states=True).hidden_states
        mask = full.block_mask()[:, None, window, window]
        fusion, reference = head.new_fusion_cache(256), head.new_cache(256)
        positions = full.position_ids[:, window]
        features = head.fuse([s[:, window] for s in states], positions, fusion, mask)
        head(features, full.input_ids[:, 1 : drafted + 1], positions, reference, mask)
    for got_cache, want in ((session.draft_cache, reference), (session.fusion_cache, fusion)):
        for name in ("keys", "values"):
            torch.testing.assert_close(
                getattr(got_cache, name)[..., :drafted, :],
                getattr(want, name)[..., :drafted, :],
                rtol=0,
                atol=1e-5,
            )


# --- sampling ------------------------------------------------------------------------------------------
def _chi2_bound(df: int, z: float = 3.09) -> float:
    """Upper 0.999 quantile of chi-square with df degrees of freedom (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _check_counts(counts: dict, expected: dict, draws: int) -> None:
    """Outcomes of probability 0 never occur; the rest passes a chi-square test at level 0.001."""
    assert not set(counts) - set(expected), f"impossible outcomes {set(counts) - set(expected)}"
    big = [o for o, p in expected.items() if p * draws >= 5]
    rest_p = 1.0 - sum(expected[o] for o in big)
    cells = [(counts.get(o, 0), expected[o] * draws) for o in big]
    cells.append((draws - sum(c for c, _ in cells), rest_p * draws))
    cells = [(c, e) for c, e in cells if e > 0]
    statistic = sum((c - e) ** 2 / e for c, e in cells)
    assert statistic < _chi2_bound(len(cells) - 1), (statistic, len(cells))


def test_chain_acceptance_preserves_the_target_distribution():
    """Speculative sampling of two drafts on fixed distributions (p_1 the same whatever came first): the
    first two tokens follow p_0 x p_1, a round that ends early continuing with plain sampling from p_1."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.1, 0.2, 0.6], [0.7, 0.1, 0.1, 0.1]])
    counts: dict = {}
    draws = 6000
    for _ in range(draws):
        drafts = torch.cat([torch.multinomial(q[i], 1, generator=generator) for i in range(2)])
        accepted, bonus = accept_chain_sampled(drafts, q, p, generator)
        tokens = drafts[:accepted].tolist() + [bonus]
        if len(tokens) == 1:
            tokens.append(int(torch.multinomial(p[1], 1, generator=generator)))
        counts[tuple(tokens[:2])] = counts.get(tuple(tokens[:2]), 0) + 1
    law = {(a, b): float(p[0, a] * p[1, b]) for a in range(4) for b in range(4) if p[0, a] > 0}
    _check_counts(counts, law, draws)


def test_tree_acceptance_preserves_the_target_distribution():
    """Recursive rejection over a hand tree: the two-token outcome follows the target's joint law."""
    generator = torch.Generator().manual_seed(1)
    tree = _hand_tree()  # root children 21, 22; 21 -> 31; 22 -> 33; 31 -> 41 (vocab of 50)
    probs = torch.rand(tree.size, 50, generator=generator) ** 4
    probs[:, [21, 22, 31, 33, 41]] += 0.5
    probs /= probs.sum(-1, keepdim=True)
    counts: dict = {}
    draws = 6000
    for _ in range(draws):
        path, bonus = sample_path(tree, probs, generator)
        tokens = tree.tokens[path[1:]].tolist() + [bonus]
        first = tokens[0]
        counts[first] = counts.get(first, 0) + 1
    _check_counts(counts, dict(enumerate(probs[0].tolist())), draws)


@pytest.fixture
def small_vocab_bagel() -> Bagel:
    """8 tokens: the joint law of two sampled tokens has few enough outcomes to test by counting."""
    specials = SpecialTokenIds(im_start=2, im_end=3, vision_start=4, vision_end=5)
    torch.manual_seed(4)
    model = Bagel(tiny_config(vocab_size=8, special_tokens=specials)).eval()
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(2.0)  # ~20 likely two-token answers, some cut by top-p
    return model


def _plain_sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """What generate_text samples from: transformers' temperature, then top-p warper, then softmax."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.float())
    return TopPLogitsWarper(top_p)(None, scores).softmax(dim=-1)


def _exact_two_token_law(target: Bagel, temperature: float, top_p: float) -> dict:
    """P(answer) of plain sampling with at most two new tokens, from the target's distributions."""
    im_start, im_end = target.config.special_tokens.im_start, target.config.special_tokens.im_end
    law: dict = {}
    with torch.no_grad():
        cache = prefill(target, [[TextBlock([0, 1, 6])]])
        first = _plain_sampling_probs(
            target.language_model.lm_head(target.forward_tokens(torch.tensor([[im_start]]), cache).hidden[0]),
            temperature,
            top_p,
        )[0]
        for x in range(8):
            if first[x] == 0:
                continue
            if x == im_end:
                law[()] = float(first[x])
                continue
            step = cache.clone()
            hidden = target.forward_tokens(torch.tensor([[x]]), step).hidden[0]
            second = _plain_sampling_probs(target.language_model.lm_head(hidden), temperature, top_p)[0]
            for y in range(8):
                if second[y] > 0:
                    outcome = (x,) if y == im_end else (x, y)
                    law[outcome] = float(first[x] * second[y])
    return law


@pytest.mark.parametrize(
    "config",
    [
        SpeculativeConfig(mode="chain", num_steps=2, temperature=0.9, top_p=0.9),
        SpeculativeConfig(mode="chain", num_steps=2, chain_min_prob=0.99, temperature=0.9, top_p=0.9),
        SpeculativeConfig(
            mode="tree", tree_depth=2, tree_top_k=2, tree_total_tokens=5, temperature=0.9, top_p=0.9
        ),
    ],
    ids=["chain", "chain_min_prob", "tree"],
)
def test_sampled_answers_follow_plain_sampling(small_vocab_bagel, config):
    """A deliberately bad drafter (confident random proposals) over thousands of seeded draws: the
    two-token answers follow the exact law of plain sampling with the same temperature and top-p."""
    target = small_vocab_bagel
    table = torch.randn(32, 8, generator=torch.Generator().manual_seed(5)) * 3.0
    draft = ScriptedDraft(target, table)
    law = _exact_two_token_law(target, config.temperature, config.top_p)
    with torch.no_grad():
        session = SpeculativeSession.start(target, draft, [TextBlock([0, 1, 6])], config)
        generator = torch.Generator().manual_seed(6)
        counts: dict = {}
        draws = 800
        forwards = 0
        for _ in range(draws):
            answer, stats = session.clone().decode(2, generator)
            counts[tuple(answer)] = counts.get(tuple(answer), 0) + 1
            forwards += stats.target_forwards
    _check_counts(counts, law, draws)
    if config.chain_min_prob:  # no draft is sure enough: every token costs its own target forward
        assert forwards == sum(n * (len(answer) + (len(answer) < 2)) for answer, n in counts.items())
    else:
        assert draws < forwards < 2 * draws  # some drafts accepted, some rejected
