"""Training-time test (EAGLE-3): K chained draft steps over a whole packed batch in one parallel pass.

Decoding runs the draft on its own outputs: after the target has processed the context up to position
i, the draft writes its cache entry for i (step 0, fed the target's feature) and then chains steps
1, 2, ..., each fed its previous hidden state and the token it just drafted. Training-time test trains
exactly that situation for every position of a pack at once. Step 0 runs over all S positions with the
target's features; step j >= 1 runs over all S positions again, position i taking the draft's own
hidden state of step j-1 at i, the token at i + 1 + j and the RoPE id of i plus j (the j-th drafted
token after i). Its queries attend to the keys of all earlier steps with EAGLE-3's mask:

    keys:   [ step 0 (S) | step 1 (S) | ... | step j (S) ]
    query i [ pack mask row i | e_i | ... | e_i ]          (e_i: only position i itself)

so position i sees the real context up to i (step 0, the pack's causal / sample / image-block mask)
and only its own chain (the diagonal of every later step), which is what its chain would see in
decoding. `TTTCache` computes exactly that attention without building the identity blocks (see there).
Position i of step j predicts the token at i + 2 + j.

Loss per step j on loss-bearing positions: KL(p_target || p_draft) over the draft vocabulary (the
target's distribution at i + 1 + j restricted to the draft vocabulary and renormalised, as EAGLE-3
does) + lambda * CE(draft, argmax target), weighted 0.8^j. Positions whose target argmax lies outside
the draft vocabulary are left out of the loss (EAGLE-3's rule: the draft can never propose that
token) but count as misses in the accuracy, so the accuracy is what chain drafting would accept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hyperbagel.backbone.packing import PackedSequence
from hyperbagel.speculative.vocab import draft_to_target, target_to_draft


class TTTCache:
    """The draft's keys/values of the steps run so far; computes each step's attention itself.

    A query of step 0 attends over step 0's keys under the pack's mask. A query of step j >= 1 sees the
    same step-0 keys plus, of every step 1..j, only its own position's key (EAGLE-3's identity blocks),
    so those are per-position dot products here instead of S x S blocks of a (j + 1) S wide mask: step j
    costs one S x S attention instead of j + 1 of them. Keys are kept in lists (an in-place write into a
    preallocated buffer would break autograd). The draft's attention calls `attend` instead of SDPA.
    """

    def __init__(self) -> None:
        self.context: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.chain: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Attention output [B, heads, S, hd] of this step's q [B, heads, S, hd] (k/v may have fewer heads,
        GQA); `mask` [B, 1, S, S] is the pack's mask over the step-0 keys."""
        groups = q.shape[1] // k.shape[1]
        if layer not in self.context:
            # Later steps read these keys with one key/value head per query head.
            self.context[layer] = (k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1))
            self.chain[layer] = []
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)
        self.chain[layer].append((k, v))
        k0, v0 = self.context[layer]
        own_k = torch.stack([c[0] for c in self.chain[layer]]).repeat_interleave(groups, dim=2)
        own_v = torch.stack([c[1] for c in self.chain[layer]]).repeat_interleave(groups, dim=2)
        scale = q.shape[-1] ** -0.5
        context_scores = (q @ k0.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
        own_scores = (q.unsqueeze(0) * own_k).sum(-1).permute(1, 2, 3, 0) * scale  # [B, heads, S, j]
        weights = torch.cat([context_scores, own_scores], dim=-1).float().softmax(-1).to(q.dtype)
        seq = k0.shape[2]
        own = (weights[..., seq:].permute(3, 0, 1, 2).unsqueeze(-1) * own_v).sum(0)
        return weights[..., :seq] @ v0 + own


def shift_left(x: torch.Tensor, offset: int, fill: int = 0) -> torch.Tensor:
    """x [B, S] moved `offset` positions left along the sequence, the vacated tail set to `fill`."""
    shifted = torch.full_like(x, fill)
    if offset < x.shape[1]:
        shifted[:, : x.shape[1] - offset] = x[:, offset:]
    return shifted


def ttt_steps(
    draft: nn.Module,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    block_mask: torch.Tensor,
    num_steps: int,
) -> Iterator[torch.Tensor]:
    """Yield the draft-vocabulary logits [B, S, Vd] of steps 0..num_steps-1 (one parallel pass each).

    features: the fused target features F_in [B, S, H] of every position; input_ids / position_ids: the
    pack's token ids and RoPE ids [B, S]; block_mask: the pack's attention mask [B, S, S]. Position i of
    step j reads the token at i + 1 + j (0 past the end: such positions never carry a loss).
    """
    cache = TTTCache()
    mask = block_mask.unsqueeze(1)
    hidden = features
    for step in range(num_steps):
        logits, hidden = draft(
            hidden, shift_left(input_ids, step + 1), position_ids + step, cache=cache, attention_mask=mask
        )
        yield logits


def loss_positions(packed: PackedSequence, num_steps: int) -> torch.Tensor:
    """[num_steps, B, S] True where step j at position i carries a loss.

    That is: i lies in a text block that carries a loss (an answer) and the token step j predicts,
    i + 2 + j, lies in the same block (its closing `<|im_end|>` included), so every input of the chain
    is a real token of the answer and the target's distribution for it is defined.
    """
    split = packed.split_ids
    rows, seq = split.shape
    loss_split = torch.zeros(packed.split_kinds.numel(), dtype=torch.bool, device=split.device)
    if packed.ce_index.numel():
        loss_split[split.reshape(-1)[packed.ce_index.to(split.device)]] = True
    in_answer = (split >= 0) & loss_split[split.clamp(min=0)]
    steps = []
    for step in range(num_steps):
        ahead = step + 2
        same = torch.zeros(rows, seq, dtype=torch.bool, device=split.device)
        if ahead < seq:
            same[:, : seq - ahead] = split[:, ahead:] == split[:, : seq - ahead]
        steps.append(in_answer & same)
    return torch.stack(steps)


@dataclass
class DraftVocabulary:
    """The draft vocabulary as index maps: `draft_to_target` [Vd] target ids in draft order,
    `target_to_draft` [V] draft id of each target id (-1 outside the draft vocabulary)."""

    draft_to_target: torch.Tensor
    target_to_draft: torch.Tensor

    @classmethod
    def from_maps(cls, d2t: torch.Tensor, t2d: torch.Tensor) -> DraftVocabulary:
        """From a draft head's EAGLE-3 maps (`d2t` offsets [Vd], `t2d` mask [V])."""
        return cls(
            draft_to_target(torch.arange(d2t.numel(), device=d2t.device), d2t),
            target_to_draft(torch.arange(t2d.numel(), device=t2d.device), t2d),
        )


@dataclass
class TargetPredictions:
    """The target's view of the tokens to predict, at the positions `row_of` points into."""

    restricted_logits: torch.Tensor  # [N, Vd] float32, the target's logits over the draft vocabulary
    argmax: torch.Tensor  # [N] target ids, argmax over the FULL target vocabulary
    row_of: torch.Tensor  # [B * S] row of each flat position in the two tensors above, -1 if none


def target_predictions(
    head: Callable[[torch.Tensor], torch.Tensor],
    last_hidden: torch.Tensor,
    valid: torch.Tensor,
    vocab: DraftVocabulary,
    chunk_size: int = 4096,
) -> TargetPredictions:
    """Apply the target's head once at every position some (step j, position i) needs (i + 1 + j).

    head: [n, H] final pre-norm hidden states -> [n, V] target logits; last_hidden [B, S, H]. Chunks of
    `chunk_size` rows bound the [n, V] full-vocabulary logits held at once.
    """
    rows, seq = last_hidden.shape[:2]
    needed = torch.zeros(rows, seq, dtype=torch.bool, device=valid.device)
    for step in range(valid.shape[0]):
        shifted = step + 1
        needed[:, shifted:] |= valid[step, :, : seq - shifted]
    flat = needed.reshape(-1).nonzero().squeeze(1)
    hidden = last_hidden.reshape(rows * seq, -1)[flat]
    restricted, argmax = [], []
    for start in range(0, flat.numel(), chunk_size):
        logits = head(hidden[start : start + chunk_size]).float()
        argmax.append(logits.argmax(dim=-1))
        restricted.append(logits[:, vocab.draft_to_target])
    row_of = torch.full((rows * seq,), -1, dtype=torch.long, device=valid.device)
    row_of[flat] = torch.arange(flat.numel(), device=valid.device)
    vd = vocab.draft_to_target.numel()
    empty = last_hidden.new_zeros(0, vd, dtype=torch.float32)
    return TargetPredictions(
        restricted_logits=torch.cat(restricted) if restricted else empty,
        argmax=torch.cat(argmax) if argmax else torch.zeros(0, dtype=torch.long, device=valid.device),
        row_of=row_of,
    )


@dataclass
class StepResult:
    """Loss terms and counts of one TTT step."""

    kl: torch.Tensor  # mean over the step's loss positions (0 when there are none)
    ce: torch.Tensor
    correct: int  # positions where the draft's argmax equals the target's
    count: int  # loss-bearing positions of the step (accuracy denominator)


def step_result(
    logits: torch.Tensor,
    valid: torch.Tensor,
    step: int,
    target: TargetPredictions,
    vocab: DraftVocabulary,
) -> StepResult:
    """KL, CE and accuracy of step `step`'s draft logits [B, S, Vd] at its loss positions valid [B, S]."""
    flat = valid.reshape(-1).nonzero().squeeze(1)
    draft_logits = logits.reshape(-1, logits.shape[-1])[flat].float()
    rows = target.row_of[flat + step + 1]  # i + 1 + j stays in the row: valid requires i + 2 + j < S
    target_ids = target.argmax[rows]
    correct = (
        int((vocab.draft_to_target[draft_logits.argmax(dim=-1)] == target_ids).sum()) if rows.numel() else 0
    )
    labels = vocab.target_to_draft[target_ids]
    keep = labels >= 0
    zero = logits.sum() * 0.0  # an empty step stays in the graph (DDP expects every parameter to get a grad)
    if not bool(keep.any()):
        return StepResult(kl=zero, ce=zero, correct=correct, count=int(flat.numel()))
    log_q = F.log_softmax(draft_logits[keep], dim=-1)
    log_p = F.log_softmax(target.restricted_logits[rows[keep]], dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    ce = F.nll_loss(log_q, labels[keep])
    return StepResult(kl=kl, ce=ce, correct=correct, count=int(flat.numel()))


def step_weights(num_steps: int, decay: float = 0.8) -> list[float]:
    """EAGLE-3's step weights decay^j."""
    return [decay**step for step in range(num_steps)]


def acceptance_length(accuracies: Sequence[float]) -> float:
    """Expected tokens committed per target forward under chain drafting, from per-step accuracies.

    Step j is accepted when it and every earlier step are right; the TTT accuracy of step j is measured
    with the true tokens as inputs, i.e. given that the earlier steps were right. So the expected
    accepted prefix is sum_k prod_{j <= k} acc_j, plus the target's own (bonus) token.
    """
    expected, survive = 1.0, 1.0
    for accuracy in accuracies:
        survive *= accuracy
        expected += survive
    return expected


@dataclass
class TTTResult:
    """The weighted TTT loss and each step's terms and counts."""

    loss: torch.Tensor
    steps: list[StepResult]
    ce_weight: float

    def terms(self) -> dict[str, torch.Tensor]:
        """Named scalars for logging: loss, then per step j its unweighted loss_j = kl_j + ce_weight *
        ce_j, kl_j, ce_j and acc_j (the accuracy of a step without loss positions reads 0)."""
        terms = {"loss": self.loss}
        for j, step in enumerate(self.steps):
            terms[f"loss_{j}"] = (step.kl + self.ce_weight * step.ce).detach()
            terms[f"kl_{j}"] = step.kl.detach()
            terms[f"ce_{j}"] = step.ce.detach()
            terms[f"acc_{j}"] = torch.tensor(step.correct / max(step.count, 1))
        return terms


def ttt_loss(
    draft: nn.Module,
    target_hidden_states: Sequence[torch.Tensor],
    packed: PackedSequence,
    target_head: Callable[[torch.Tensor], torch.Tensor],
    vocab: DraftVocabulary,
    num_steps: int = 7,
    decay: float = 0.8,
    ce_weight: float = 0.1,
) -> TTTResult:
    """sum_j decay^j (KL_j + ce_weight * CE_j) of a pack.

    target_hidden_states: the target's L + 1 hidden states [B, S, H] of the pack, which the draft fuses
    into its step-0 features (with the pack's mask); the last one also gives the target's predictions
    through `target_head` (see `target_predictions`). Each step's loss is taken as soon as the step
    has run, so only its loss-position logits stay alive for backward, not the [B, S, Vd] ones.
    """
    valid = loss_positions(packed, num_steps)
    target = target_predictions(target_head, target_hidden_states[-1], valid, vocab)
    block_mask = packed.block_mask()
    features = draft.fuse(target_hidden_states, packed.position_ids, attention_mask=block_mask[:, None])
    steps, total = [], features.sum() * 0.0
    logits_of_steps = ttt_steps(draft, features, packed.input_ids, packed.position_ids, block_mask, num_steps)
    for j, (weight, logits) in enumerate(zip(step_weights(num_steps, decay), logits_of_steps)):
        result = step_result(logits, valid[j], j, target, vocab)
        steps.append(result)
        total = total + weight * (result.kl + ce_weight * result.ce)
    return TTTResult(loss=total, steps=steps, ce_weight=ce_weight)
