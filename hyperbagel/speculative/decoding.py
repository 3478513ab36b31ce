"""Lossless speculative decoding of BAGEL's text answers: a draft head proposes, the target verifies.

Geometry (the draft head's pairing rule): the draft's entry at position i pairs the feature of position i
with the token at i + 1 and predicts the token at i + 2. The target's cache holds every committed token
except the *pending* one (the last token the target chose, which no forward has read yet); the draft's
caches hold one entry per position of the target's cache, and its last entry pairs with the pending
token, so the draft's output there proposes the first token after it.

Start (`SpeculativeSession.start`): the target prefills the packed context exactly as `prefill` does,
keeping its per-layer hidden states; the draft fuses them and runs over every context position (with the
pack's block mask, so image blocks stay bidirectional), its last position pairing with `<|im_start|>`,
the pending token of a fresh answer.

One round:
- chain: up to k draft steps from the last entry (each fed the previous step's hidden state and drafted
  token; entries are committed to the draft cache while drafting and rolled back afterwards; with
  `chain_min_prob` drafting stops early where the draft is unsure), then ONE target
  forward over [pending, d_1..d_k] (commit=False). The longest prefix the target agrees with is accepted
  and the target's token after it (the bonus) becomes the new pending token;
- tree: EAGLE-2's dynamic tree (`hyperbagel.speculative.tree`), verified in one forward with tree
  positions and the ancestor mask; the accepted path's keys/values are moved into place.
The target commits the pending token and the accepted drafts (rejected entries are simply never
committed), and the draft is extended with the fused target features of exactly those positions: the
features of rejected positions never reach the draft's caches.

Acceptance: greedy (temperature 0) accepts a draft token iff it is the target's argmax, which makes the
output identical to `generate_text`'s. Sampling warps target and draft logits with generate_text's
transformers warpers (temperature, then top-p) and accepts chain drafts with min(1, p/q), drawing the
bonus from max(p - q, 0) after a rejection or from p after full acceptance (speculative sampling);
trees use the recursive multi-candidate rule (see tree.py). Either way the answer follows exactly the
distribution of plain sampling.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.image_transforms import vit_input
from hyperbagel.backbone.inference import prefill_packed
from hyperbagel.backbone.kv_cache import KVCache
from hyperbagel.backbone.packing import Sample, TextBlock, VitImage
from hyperbagel.speculative.tree import DraftTree, draft_tree, greedy_path, sample_path

if TYPE_CHECKING:
    from hyperbagel.speculative.draft_head import DraftHead


@dataclass
class SpeculativeConfig:
    """How to draft and how to accept.

    num_steps: most chain drafts per round. chain_min_prob: a chain round stops drafting at the first
    step whose most likely token has draft probability below this, so that rounds run long through
    predictable text and the target does not verify likely rejections; 0 always drafts num_steps. The
    stop is decided from the draft's distribution before a token is drawn, so acceptance stays exact.
    tree_depth: most drafted tokens on one path; tree_top_k: children per expanded node and nodes
    expanded per depth; tree_total_tokens: tokens verified per target forward, the pending token
    included (EAGLE's total_token). temperature 0 = greedy (exactly lossless); > 0 samples, with
    nucleus top_p, like `generate_text`."""

    mode: Literal["chain", "tree"] = "chain"
    num_steps: int = 5
    chain_min_prob: float = 0.0
    tree_depth: int = 5
    tree_top_k: int = 4
    tree_total_tokens: int = 24
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("chain", "tree"):
            raise ValueError(f"mode must be 'chain' or 'tree', not {self.mode!r}")
        for name in ("num_steps", "tree_depth", "tree_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.tree_total_tokens < 2:
            raise ValueError(
                f"tree_total_tokens counts the pending token and must be >= 2, not {self.tree_total_tokens}"
            )
        if not 0 <= self.chain_min_prob < 1:
            raise ValueError(f"chain_min_prob must lie in [0, 1), not {self.chain_min_prob}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], not {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class SpeculativeStats:
    """One answer's decoding: target forwards of the rounds (the prefill not counted), the tokens they
    produced (a closing `<|im_end|>` counted, tokens past the answer's end not), and host wall time spent
    in the target and in the draft, prefill included (CUDA is synchronised at each switch)."""

    target_forwards: int = 0
    new_tokens: int = 0
    target_time_s: float = 0.0
    draft_time_s: float = 0.0

    @property
    def acceptance_length(self) -> float:
        """tau: tokens committed per target forward, the bonus token counted (1.0 for plain decoding)."""
        return self.new_tokens / max(self.target_forwards, 1)


class _Clock:
    """Splits wall time between phases; synchronises CUDA so that queued kernels land in their phase."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def warped_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling distribution [N, V] of logits [N, V], warped exactly like `generate_text` warps."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.float())
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(dim=-1)


def accept_chain_sampled(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """(accepted drafts, bonus token) by speculative sampling.

    drafts [k] sampled from draft_probs [k, V]; target_probs [k + 1, V] the target's distributions after
    the pending token and after each draft. Draft i is accepted with min(1, p_i(d_i) / q_i(d_i)); at the
    first rejection the bonus is drawn from max(p_i - q_i, 0), after k acceptances from p_k."""
    k = drafts.numel()
    accepted = 0
    if k:
        steps = torch.arange(k, device=drafts.device)
        ratio = (target_probs[steps, drafts] / draft_probs[steps, drafts]).cpu()
        passed = torch.rand(k, generator=generator) < ratio
        accepted = int(passed.int().cumprod(0).sum())
    residual = target_probs[accepted]
    if accepted < k:
        residual = (residual - draft_probs[accepted]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p <= q everywhere only through rounding: the rejection was noise
            residual = target_probs[accepted]
    return accepted, int(torch.multinomial(residual.float().cpu(), 1, generator=generator))


@dataclass
class _Verified:
    """What one round committed: the new tokens (accepted drafts, then the bonus) and, for the draft's
    extension, the target's hidden states [1, n, H] at the n committed positions and the first one's
    RoPE id."""

    tokens: list[int]
    hidden_states: list[torch.Tensor]
    position: int


class SpeculativeSession:
    """One answer decoded speculatively (batch 1): the target's and the draft's caches, the pending
    token and the draft's output at its last entry. Build with `start`, then `decode` once."""

    def __init__(
        self,
        target: Bagel,
        draft: DraftHead,
        config: SpeculativeConfig,
        target_cache: KVCache,
        draft_cache: KVCache,
        fusion_cache: KVCache | None,
        root_logits: torch.Tensor,
        root_hidden: torch.Tensor,
        stats: SpeculativeStats,
    ) -> None:
        self.target, self.draft, self.config = target, draft, config
        self.target_cache, self.draft_cache, self.fusion_cache = target_cache, draft_cache, fusion_cache
        self.root_logits, self.root_hidden = root_logits, root_hidden
        self.stats = stats
        self.pending = torch.tensor([target.config.special_tokens.im_start], device=target.device)
        self.draft_target_ids = draft.to_target_ids(
            torch.arange(draft.draft_vocab_size, device=root_logits.device)
        )
        self.finished = False

    @classmethod
    @torch.no_grad()
    def start(
        cls,
        target: Bagel,
        draft: DraftHead,
        sample: Sample,
        config: SpeculativeConfig | None = None,
        capacity_margin: int = 320,
    ) -> SpeculativeSession:
        """Prefill the target on the context and the draft on the target's hidden states."""
        config = config or SpeculativeConfig()
        draft.check_target(target)
        if config.mode == "tree" and config.tree_top_k > draft.draft_vocab_size:
            raise ValueError(
                f"tree_top_k {config.tree_top_k} exceeds the draft vocabulary ({draft.draft_vocab_size})"
            )
        stats, clock = SpeculativeStats(), _Clock(target.device)
        target_cache, packed, output = prefill_packed(
            target, [sample], capacity_margin, output_hidden_states=True
        )
        if output is None:
            raise ValueError("speculative decoding needs a non-empty context (the sample has no blocks)")
        stats.target_time_s += clock.lap()
        packed = packed.to(target.device)
        length = packed.shape[1]
        draft_cache = draft.new_cache(target_cache.capacity)
        fusion_cache = draft.new_fusion_cache(target_cache.capacity)
        mask = draft_cache.attention_mask(length, block_mask=packed.block_mask())
        im_start = packed.input_ids.new_full((1, 1), target.config.special_tokens.im_start)
        next_ids = torch.cat([packed.input_ids[:, 1:], im_start], dim=1)
        features = draft.fuse(output.hidden_states, packed.position_ids, fusion_cache, mask)
        logits, hidden = draft(features, next_ids, packed.position_ids, draft_cache, mask)
        for cache in (draft_cache, fusion_cache):
            if cache is not None:
                cache.commit(packed.valid_lengths, packed.rope_advance)
        stats.draft_time_s += clock.lap()
        return cls(
            target,
            draft,
            config,
            target_cache,
            draft_cache,
            fusion_cache,
            logits[0, -1],
            hidden[:, -1:],
            stats,
        )

    def clone(self) -> SpeculativeSession:
        """An independent copy (caches cloned), e.g. to draw several answers from one prefill."""
        other = SpeculativeSession.__new__(SpeculativeSession)
        other.__dict__.update(self.__dict__)
        other.target_cache, other.draft_cache = self.target_cache.clone(), self.draft_cache.clone()
        other.fusion_cache = self.fusion_cache.clone() if self.fusion_cache is not None else None
        other.stats = dataclasses.replace(self.stats)
        return other

    @torch.no_grad()
    def decode(
        self, max_new_tokens: int = 256, generator: torch.Generator | None = None
    ) -> tuple[list[int], SpeculativeStats]:
        """The answer's ids (without the markers, at most max_new_tokens, stopping at `<|im_end|>`, as
        `generate_text` returns them) and the stats. Afterwards the target's cache holds what
        generate_text's would: the context, `<|im_start|>` and every chosen token but the last; the
        draft's caches end at their last extension (the final round's positions are not added)."""
        if self.finished:
            raise RuntimeError("a session decodes one answer; clone() it before decoding to draw again")
        self.finished = True
        im_end = self.target.config.special_tokens.im_end
        context_length = self.target_cache.lengths[0]
        clock = _Clock(self.target.device)
        produced: list[int] = []
        chain = self.config.mode == "chain"
        size, run_round = (
            (self.config.num_steps, self._chain) if chain else (self.config.tree_depth, self._tree)
        )
        while len(produced) < max_new_tokens and im_end not in produced:
            verified = run_round(min(size, max_new_tokens - len(produced) - 1), clock, generator)
            produced += verified.tokens
            if im_end in verified.tokens or len(produced) >= max_new_tokens:
                break
            self._extend(verified)
            self.stats.draft_time_s += clock.lap()
        chosen = produced[: max_new_tokens if im_end not in produced else produced.index(im_end) + 1]
        self.target_cache.rollback(context_length + len(chosen))
        self.stats.new_tokens += len(chosen)
        return [token for token in chosen if token != im_end], self.stats

    def _warp(self, logits: torch.Tensor) -> torch.Tensor:
        return warped_probs(logits, self.config.temperature, self.config.top_p)

    def _target_logits(
        self,
        ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        block_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The target's logits [n, V] after each of ids [1, n] (left uncommitted) and its hidden states."""
        out = self.target.forward_tokens(
            ids, self.target_cache, position_ids, block_mask, commit=False, output_hidden_states=True
        )
        self.stats.target_forwards += 1
        return self.target.language_model.lm_head(out.hidden[0]), out.hidden_states

    def _chain(self, steps: int, clock: _Clock, generator: torch.Generator | None) -> _Verified:
        position = self.target_cache.rope_cursor[0]
        drafts, draft_probs = self._draft_chain(steps, position - 1, generator)
        self.stats.draft_time_s += clock.lap()
        ids = torch.cat([self.pending, drafts])[None]
        logits, states = self._target_logits(ids)
        drafted = drafts.numel()
        if self.config.greedy:
            best = logits.argmax(dim=-1)
            accepted = (drafts == best[:drafted]).int().cumprod(0).sum()
            values = torch.cat([ids[0, 1:], best, accepted[None]]).tolist()
            count = values[-1]
            tokens = values[:count] + [values[drafted + count]]
        else:
            q = draft_probs.new_zeros(drafted, logits.shape[-1])
            q[:, self.draft_target_ids] = draft_probs
            count, bonus = accept_chain_sampled(drafts, q, self._warp(logits), generator)
            tokens = drafts[:count].tolist() + [bonus]
        self.target_cache.commit(count + 1, count + 1)
        self.stats.target_time_s += clock.lap()
        return _Verified(tokens, [h[:, : count + 1] for h in states], position)

    def _draft_chain(
        self, steps: int, root_position: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafted target ids [<= steps] and, when sampling, their draft distributions [<= steps, Vd];
        fewer than `steps` where the draft's top probability falls below `chain_min_prob`."""
        cache = self.draft_cache
        lengths, cursor = list(cache.lengths), list(cache.rope_cursor)
        logits, hidden = self.root_logits, self.root_hidden
        min_prob = self.config.chain_min_prob
        tokens, probs = [], []
        for step in range(steps):
            q = None if self.config.greedy else self._warp(logits[None])[0]
            if min_prob and float((logits.softmax(dim=-1) if q is None else q).max()) < min_prob:
                break  # decided before drawing: a stop that looked at the drawn token would bias it
            if q is None:
                choice = logits.argmax(dim=-1, keepdim=True)
            else:
                probs.append(q)
                choice = torch.multinomial(q.cpu(), 1, generator=generator).to(q.device)
            tokens.append(self.draft.to_target_ids(choice))
            if step + 1 < steps:
                position = torch.full((1, 1), root_position + step + 1, device=hidden.device)
                step_logits, hidden = self.draft(hidden, tokens[-1][None], position, cache)
                logits = step_logits[0, -1]
                cache.commit(1, 1)
        cache.rollback(lengths, cursor)
        empty = self.pending.new_zeros(0)
        drafts = torch.cat(tokens) if tokens else empty
        return drafts, torch.stack(probs) if probs else self.root_logits.new_zeros(0, logits.shape[-1])

    def _tree(self, depth: int, clock: _Clock, generator: torch.Generator | None) -> _Verified:
        position = self.target_cache.rope_cursor[0]
        start = self.target_cache.lengths[0]
        config = self.config
        if depth == 0:
            tree = DraftTree.root_only(self.pending)
        else:
            tree = draft_tree(
                self.draft,
                self.draft_cache,
                self.pending,
                self.root_logits,
                self.root_hidden,
                position - 1,
                depth,
                config.tree_top_k,
                config.tree_total_tokens - 1,
                config.temperature,
            )
        self.stats.draft_time_s += clock.lap()
        logits, states = self._target_logits(
            tree.tokens[None], position_ids=(position + tree.depths)[None], block_mask=tree.ancestors
        )
        if config.greedy:
            path, bonus = greedy_path(tree, logits.argmax(dim=-1))
            tokens = torch.cat([tree.tokens[path[1:]], bonus[None]]).tolist()
        else:
            nodes, token = sample_path(tree, self._warp(logits), generator)
            path = torch.tensor(nodes, device=tree.tokens.device)
            tokens = tree.tokens[path[1:]].tolist() + [token]
        self.target_cache.move_tokens(start, path)
        self.target_cache.commit(len(tokens), len(tokens))
        self.stats.target_time_s += clock.lap()
        return _Verified(tokens, [h[:, path] for h in states], position)

    def _extend(self, verified: _Verified) -> None:
        """Run the draft over the newly committed positions (the fused target features, each paired with
        the token after it) and commit them; its last position pairs with the new pending token."""
        count = len(verified.tokens)
        device = self.pending.device
        positions = (verified.position + torch.arange(count, device=device))[None]
        ids = torch.tensor([verified.tokens], device=device)
        features = self.draft.fuse(verified.hidden_states, positions, self.fusion_cache)
        logits, hidden = self.draft(features, ids, positions, self.draft_cache)
        for cache in (self.draft_cache, self.fusion_cache):
            if cache is not None:
                cache.commit(count, count)
        self.root_logits, self.root_hidden = logits[0, -1], hidden[:, -1:]
        self.pending = ids[0, -1:]


@torch.no_grad()
def speculative_generate(
    target: Bagel,
    draft: DraftHead,
    samples: Sequence[Sample],
    config: SpeculativeConfig | None = None,
    max_new_tokens: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], SpeculativeStats]:
    """`generate_text`'s answers (one row: batch 1) for the context `samples[0]`, with the stats."""
    if len(samples) != 1:
        raise ValueError(
            f"speculative decoding runs one prompt at a time (batch 1), got {len(samples)} samples; "
            "loop over them, or use generate_text for batched plain decoding"
        )
    config = config or SpeculativeConfig()
    width = max(config.num_steps, config.tree_total_tokens) + 2
    session = SpeculativeSession.start(target, draft, samples[0], config, max_new_tokens + width)
    answer, stats = session.decode(max_new_tokens, generator)
    return [answer], stats


class SpeculativeGenerator:
    """Chat over images like `BagelInferencer.chat`, decoded speculatively with a draft head (batch 1)."""

    def __init__(
        self,
        target: Bagel,
        draft: DraftHead,
        tokenizer: PreTrainedTokenizerBase,
        config: SpeculativeConfig | None = None,
    ) -> None:
        draft.check_target(target)
        self.target = target.eval()
        self.draft = draft.eval()
        self.tokenizer = tokenizer
        self.config = config or SpeculativeConfig()
        self.last_stats: SpeculativeStats | None = None

    def sample(self, prompt: str, images: Image.Image | Sequence[Image.Image] = ()) -> Sample:
        """The context BagelInferencer.chat builds: the images' ViT blocks, then the question."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        blocks = [VitImage(vit_input(image, self.target.config)) for image in images]
        return [*blocks, TextBlock(self.tokenizer.encode(prompt, add_special_tokens=False))]

    def generate(
        self,
        sample: Sample,
        max_new_tokens: int = 256,
        seed: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> tuple[list[int], SpeculativeStats]:
        """One answer's ids for a context, and the decoding stats; temperature / top_p override the
        config's for this call."""
        overrides = {"temperature": temperature, "top_p": top_p}
        config = dataclasses.replace(
            self.config, **{name: value for name, value in overrides.items() if value is not None}
        )
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        answers, stats = speculative_generate(
            self.target, self.draft, [sample], config, max_new_tokens, generator
        )
        self.last_stats = stats
        return answers[0], stats

    def chat(
        self,
        prompts: str | Sequence[str],
        images: Image.Image | Sequence[Image.Image | Sequence[Image.Image]] | None = None,
        max_new_tokens: int = 256,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """Answer ONE prompt about its image(s), with BagelInferencer.chat's arguments (`images[0]`: the
        prompt's image or images; a bare image is accepted too). The call's stats go to `last_stats`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != 1:
            raise ValueError(
                f"SpeculativeGenerator.chat answers one prompt at a time (batch 1), got {len(prompts)}; "
                "call it per prompt, or use BagelInferencer.chat for batched plain decoding"
            )
        if images is None or isinstance(images, Image.Image):
            pictures = images or ()
        elif len(images) == 1:
            pictures = images[0]
        else:
            raise ValueError(f"got images for {len(images)} prompts but one prompt")
        sample = self.sample(prompts[0], pictures)
        answer, _ = self.generate(sample, max_new_tokens, seed, temperature, top_p)
        return [self.tokenizer.decode(answer)]
