"""EAGLE-2's dynamic draft tree: drafting it, its verification mask, and accepting a path of it.

Drafting (`draft_tree`): the root is the pending token (sampled by the target, not yet run through it).
Its children are the top_k tokens of the draft's distribution at the last committed draft position.
Each further depth expands the top_k nodes of the previous depth with the best cumulative draft log-prob
(their top_k children each), so the draft runs one forward of top_k queries per depth. Those queries
attend to the committed context plus their own ancestors' entries of the earlier depths, which stay in
the draft's cache (committed there for the duration of the tree, then rolled back): an explicit mask per
depth instead of recomputing the tree. Each query takes its parent's draft hidden state as its feature
and the RoPE id of its depth, exactly the chain a training-time-test step sees. Finally all candidates
are reranked by cumulative log-prob and the best ones are kept (`select_tree`).

Verification: the target runs the whole tree in one forward with positions cursor + depth and the
ancestor mask (a node sees the committed context, its ancestors and itself), so every root-to-node path
is computed exactly as if it had been decoded alone.

Acceptance: greedy takes the deepest node whose every token equals the target's argmax at its parent.
Sampling walks from the root: at each node the children are tried in order, each accepted with the
current residual target probability of its token; a rejected token's probability is zeroed and the rest
renormalised, and when no child is accepted the bonus token is drawn from that residual. This is
SpecInfer's recursive multi-candidate rejection (accept with min(1, p/q), residual max(p - q, 0)) with
q = a point mass on each candidate, which is what the draft's proposal is: the tree's tokens are chosen
deterministically (top-k), not sampled, so using the draft's probabilities as q would bias the output.
With point masses the answer follows the target's distribution exactly for any set of distinct children
(EAGLE's evaluation does the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hyperbagel.backbone.kv_cache import KVCache

if TYPE_CHECKING:
    from hyperbagel.speculative.draft_head import DraftHead


@dataclass
class DraftTree:
    """T nodes in parents-first order; node 0 is the root (the pending token)."""

    tokens: torch.Tensor  # [T] target ids
    parents: torch.Tensor  # [T] parent node (the root is its own parent)
    depths: torch.Tensor  # [T] distance from the root
    ancestors: torch.Tensor  # [T, T] bool, True where column j is node i itself or one of its ancestors

    @property
    def size(self) -> int:
        return self.tokens.numel()

    @classmethod
    def root_only(cls, token: torch.Tensor) -> DraftTree:
        """The tree of a round without drafts (a plain decoding step)."""
        zero = torch.zeros(1, dtype=torch.long, device=token.device)
        return cls(token.reshape(1), zero, zero, torch.ones(1, 1, dtype=torch.bool, device=token.device))


def ancestor_mask(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """[T, T] bool: node i sees itself and its ancestors, found by following parent pointers."""
    size = parents.numel()
    rows = torch.arange(size, device=parents.device)
    mask = torch.zeros(size, size, dtype=torch.bool, device=parents.device)
    node = rows
    for _ in range(max_depth + 1):
        mask[rows, node] = True
        node = parents[node]
    return mask


def select_tree(
    root_token: torch.Tensor,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    depths: torch.Tensor,
    scores: torch.Tensor,
    num_nodes: int,
) -> DraftTree:
    """Keep the `num_nodes` candidates with the best cumulative log-prob, plus the root.

    Candidates [C] come parents-first (a candidate's parent, given as a candidate index or -1 for the
    root, has a smaller index). A child's score never exceeds its parent's (log-probs are <= 0), and a
    stable sort breaks ties by index, so every kept node's parent is kept too.
    """
    order = torch.sort(scores, descending=True, stable=True).indices[:num_nodes]
    keep = order.sort().values
    node_of = torch.zeros(tokens.numel(), dtype=torch.long, device=tokens.device)
    node_of[keep] = torch.arange(1, keep.numel() + 1, device=tokens.device)
    kept_parents = parents[keep]
    node_parents = torch.where(kept_parents < 0, 0, node_of[kept_parents.clamp(min=0)])
    zero = torch.zeros(1, dtype=torch.long, device=tokens.device)
    all_parents = torch.cat([zero, node_parents])
    max_depth = int(depths.max()) if depths.numel() else 0
    return DraftTree(
        tokens=torch.cat([root_token.reshape(1), tokens[keep]]),
        parents=all_parents,
        depths=torch.cat([zero, depths[keep]]),
        ancestors=ancestor_mask(all_parents, max_depth),
    )


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)


@torch.no_grad()
def draft_tree(
    draft: DraftHead,
    cache: KVCache,
    root_token: torch.Tensor,
    root_logits: torch.Tensor,
    root_hidden: torch.Tensor,
    root_position: int,
    depth: int,
    top_k: int,
    num_nodes: int,
    temperature: float = 0.0,
) -> DraftTree:
    """Draft a tree of at most `num_nodes` nodes below the root, `depth` tokens deep at most.

    root_logits [Vd] / root_hidden [1, 1, H]: the draft's output at its last committed position
    (RoPE id `root_position`), which pairs with the root token. The cache is left as it was found.
    Scores are the draft's log-probs at `temperature` (plain log-softmax when 0).
    """
    device = root_logits.device
    scores, ids = _log_probs(root_logits, temperature).topk(top_k)
    tokens = draft.to_target_ids(ids)
    frontier = torch.arange(top_k, device=device)  # candidate indexes of the nodes to expand next
    candidates = {
        "tokens": [tokens],
        "parents": [torch.full((top_k,), -1, dtype=torch.long, device=device)],
        "depths": [torch.ones(top_k, dtype=torch.long, device=device)],
        "scores": [scores],
    }
    features = root_hidden.expand(1, top_k, -1)
    ancestry = torch.zeros(top_k, 0, dtype=torch.bool, device=device)  # over the tree entries cached so far
    eye = torch.eye(top_k, dtype=torch.bool, device=device)
    lengths, cursor = list(cache.lengths), list(cache.rope_cursor)
    context = torch.ones(top_k, lengths[0], dtype=torch.bool, device=device)
    count = top_k
    for level in range(1, depth):
        mask = torch.cat([context, ancestry, eye], dim=1)[None, None]
        positions = torch.full((1, top_k), root_position + level, dtype=torch.long, device=device)
        logits, hidden = draft(features, tokens[None], positions, cache, mask)
        cache.commit(top_k, 0)
        child_scores, child_ids = _log_probs(logits[0], temperature).topk(top_k, dim=-1)
        cumulative = (scores[:, None] + child_scores).flatten()
        child_tokens = draft.to_target_ids(child_ids).flatten()
        candidates["tokens"].append(child_tokens)
        candidates["parents"].append(frontier.repeat_interleave(top_k))
        candidates["depths"].append(torch.full_like(child_tokens, level + 1))
        candidates["scores"].append(cumulative)
        best = cumulative.topk(top_k).indices
        rows = best // top_k  # the frontier entry each new frontier node hangs from
        scores, tokens, frontier = cumulative[best], child_tokens[best], count + best
        features = hidden[:, rows]
        ancestry = torch.cat([ancestry[rows], eye[rows]], dim=1)
        count += top_k * top_k
    cache.rollback(lengths, cursor)
    flat = {name: torch.cat(parts) for name, parts in candidates.items()}
    return select_tree(
        root_token,
        flat["tokens"],
        flat["parents"],
        flat["depths"],
        flat["scores"],
        min(num_nodes, flat["tokens"].numel()),
    )


def greedy_path(tree: DraftTree, target_argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted nodes root first [n], bonus token): the deepest node whose path matches the target.

    target_argmax [T]: the target's greedy token after each node. Siblings hold distinct tokens, so the
    matching nodes form one path."""
    correct = tree.tokens == target_argmax[tree.parents]
    correct[0] = True
    accepted = ~(tree.ancestors & ~correct[None]).any(dim=1)
    best = torch.where(accepted, tree.depths, -1).argmax()
    return tree.ancestors[best].nonzero().squeeze(1), target_argmax[best]


def sample_path(
    tree: DraftTree, probs: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[list[int], int]:
    """(accepted nodes root first, bonus token) by recursive rejection with point-mass proposals.

    probs [T, V]: the target's (warped) next-token distribution after each node."""
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    children: list[list[int]] = [[] for _ in tokens]
    for node in range(1, len(tokens)):
        children[parents[node]].append(node)
    node, path = 0, [0]
    while True:
        residual = probs[node].to("cpu", torch.float32, copy=True)
        for child in children[node]:
            token = tokens[child]
            mass = residual.sum()
            if float(torch.rand(1, generator=generator)) * mass < residual[token]:
                node = child
                path.append(child)
                break
            residual[token] = 0.0
        else:
            return path, int(torch.multinomial(residual, 1, generator=generator))
