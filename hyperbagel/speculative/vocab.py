"""The draft vocabulary: which target tokens the draft head can propose, and the maps between id spaces.

A draft head spends most of its compute on the LM head when the target vocabulary is large (152k for
BAGEL-7B), while the answers it accelerates use a small part of it. Like EAGLE-3, the draft predicts over
the `Vd` most frequent loss-bearing target tokens (plus BAGEL's special tokens, so it can always end an
answer). Draft ids are the chosen target ids in ascending order, which gives EAGLE-3's two maps:

    d2t [Vd] int64: target_id = draft_id + d2t[draft_id]   (offsets, as SGLang / vLLM read them)
    t2d [V] bool:   True where a target id is in the draft vocabulary
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch


def count_tokens(sources: Iterable[Any], vocab_size: int) -> torch.Tensor:
    """Frequencies [vocab_size] int64 of loss-bearing target tokens.

    Each source is a packed batch (`PackedSequence`, counted over its `ce_labels`, i.e. the tokens the
    target is trained to predict), anything with a `.packed` attribute (a `TrainingPack`), or a plain list
    / tensor of token ids (e.g. answers the target regenerated).
    """
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for number, source in enumerate(sources):
        source = getattr(source, "packed", source)
        ids = getattr(source, "ce_labels", source)
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
        if ids.numel() == 0:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"source {number} holds token id {bad}, outside the vocabulary [0, {vocab_size})"
            )
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def select_draft_vocab(
    vocab_size: int,
    draft_vocab_size: int | None = None,
    counts: torch.Tensor | None = None,
    special_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Target ids [Vd] of the draft vocabulary, ascending: every special id, then the most frequent ids
    by `counts` (ties go to the lower id). `draft_vocab_size` None or equal to `vocab_size` keeps all."""
    if draft_vocab_size is None or draft_vocab_size == vocab_size:
        return torch.arange(vocab_size)
    if not 0 < draft_vocab_size < vocab_size:
        raise ValueError(
            f"draft_vocab_size {draft_vocab_size} must lie in [1, target vocabulary {vocab_size}]"
        )
    if counts is None:
        raise ValueError(
            f"draft_vocab_size {draft_vocab_size} < target vocabulary {vocab_size} needs token counts "
            "(see hyperbagel.speculative.vocab.count_tokens)"
        )
    if tuple(counts.shape) != (vocab_size,):
        raise ValueError(
            f"token counts have shape {tuple(counts.shape)}; the target vocabulary needs ({vocab_size},)"
        )
    specials = sorted(set(int(i) for i in special_ids))
    if any(not 0 <= i < vocab_size for i in specials):
        raise ValueError(f"special ids {specials} fall outside the vocabulary [0, {vocab_size})")
    if len(specials) > draft_vocab_size:
        raise ValueError(
            f"draft_vocab_size {draft_vocab_size} cannot hold the {len(specials)} special ids {specials}"
        )
    order = torch.sort(counts.detach().cpu().to(torch.float64), descending=True, stable=True).indices
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[specials] = False
    frequent = order[keep[order]][: draft_vocab_size - len(specials)]
    return torch.cat([torch.tensor(specials, dtype=torch.long), frequent]).sort().values


def vocab_maps(draft_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t [Vd] int64 offsets, t2d [V] bool mask) of ascending, distinct target ids `draft_ids`."""
    draft_ids = draft_ids.to(torch.long)
    if draft_ids.numel() and (draft_ids.diff() <= 0).any():
        raise ValueError("draft ids must be distinct target ids in ascending order")
    if draft_ids.numel() and not (0 <= int(draft_ids[0]) and int(draft_ids[-1]) < vocab_size):
        raise ValueError(f"draft ids fall outside the target vocabulary [0, {vocab_size})")
    d2t = draft_ids - torch.arange(draft_ids.numel(), device=draft_ids.device)
    t2d = torch.zeros(vocab_size, dtype=torch.bool, device=draft_ids.device)
    t2d[draft_ids] = True
    return d2t, t2d


def check_maps(d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """Raise unless d2t and t2d describe the same ascending draft vocabulary (e.g. after loading)."""
    if d2t.dtype != torch.long or t2d.dtype != torch.bool:
        raise ValueError(f"d2t must be int64 and t2d bool, not {d2t.dtype} and {t2d.dtype}")
    expected_d2t, expected_t2d = vocab_maps(
        draft_to_target(torch.arange(d2t.numel()), d2t.cpu()), t2d.numel()
    )
    if not torch.equal(expected_t2d, t2d.cpu()) or not torch.equal(expected_d2t, d2t.cpu()):
        raise ValueError(f"d2t ({d2t.numel()} draft ids) and t2d ({int(t2d.sum())} marked ids) disagree")


def draft_to_target(draft_ids: torch.Tensor, d2t: torch.Tensor) -> torch.Tensor:
    """Target ids of draft ids (any shape)."""
    return draft_ids + d2t[draft_ids]


def target_to_draft(target_ids: torch.Tensor, t2d: torch.Tensor) -> torch.Tensor:
    """Draft ids of target ids (any shape); -1 where the target id is not in the draft vocabulary."""
    index = t2d.cumsum(0) - 1
    return torch.where(t2d[target_ids], index[target_ids], torch.full_like(target_ids, -1))
