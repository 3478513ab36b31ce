"""Attention over packed rows as one batched attention over their samples.

A training pack holds several samples that never attend to each other, so BAGEL's block mask is
block-diagonal: one square block per sample (padding tokens see only themselves). Attending a whole row
at once costs seq^2 whatever the mask. Gathering samples of similar length into padded batches
[samples, longest] costs about the sum of the samples' squared lengths, in a few kernel calls, with
identical results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BUCKET_RATIO = 0.7  # a sample joins a bucket while at least this share of the bucket's longest


@dataclass(frozen=True)
class LengthBucket:
    """Samples of similar length attended as one padded batch.

    gather: [samples, longest] flat token index (row * seq + position) of each batch slot (0 in padding);
    mask: [samples, 1, longest, longest] the block mask of each sample, padding slots seeing themselves.
    """

    gather: torch.Tensor
    mask: torch.Tensor

    def batched(self, flat: torch.Tensor) -> torch.Tensor:
        """[heads, tokens, dim] -> this bucket's [samples, heads, longest, dim]."""
        picked = flat.index_select(1, self.gather.reshape(-1))
        return picked.view(flat.shape[0], *self.gather.shape, flat.shape[-1]).transpose(0, 1)


@dataclass(frozen=True)
class SampleSegments:
    """The packed rows' samples in length buckets, and `scatter`: [rows * seq] the slot of each token in
    the buckets' concatenated outputs (bucket by bucket, sample by sample, position by position)."""

    buckets: list[LengthBucket]
    scatter: torch.Tensor

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, sample_ids: torch.Tensor) -> SampleSegments:
        """Cut `block_mask` [rows, seq, seq] into the diagonal blocks of the runs of `sample_ids` [rows, seq].

        Raises if a sample's tokens are not contiguous (its block would not be diagonal)."""
        rows, seq = sample_ids.shape
        runs = []
        for row, ids in enumerate(sample_ids.tolist()):
            starts = [0] + [i for i in range(1, seq) if ids[i] != ids[i - 1]]
            run_ids = [ids[s] for s in starts if ids[s] >= 0]
            if len(run_ids) != len(set(run_ids)):
                raise ValueError(f"row {row}: a sample's tokens are not contiguous; cannot attend per sample")
            runs += [(row, s, e) for s, e in zip(starts, [*starts[1:], seq])]
        runs.sort(key=lambda run: run[2] - run[1], reverse=True)
        grouped: list[list[tuple[int, int, int]]] = []
        for run in runs:
            if not grouped or run[2] - run[1] < BUCKET_RATIO * (grouped[-1][0][2] - grouped[-1][0][1]):
                grouped.append([])
            grouped[-1].append(run)
        buckets, scatter, slot = [], torch.empty(rows * seq, dtype=torch.long), 0
        for members in grouped:
            longest = members[0][2] - members[0][1]
            gather = torch.zeros(len(members), longest, dtype=torch.long)
            mask = torch.eye(longest, dtype=torch.bool).repeat(len(members), 1, 1, 1)
            for n, (row, s, e) in enumerate(members):
                tokens = torch.arange(row * seq + s, row * seq + e)
                gather[n, : e - s] = tokens
                scatter[tokens] = torch.arange(slot + n * longest, slot + n * longest + e - s)
                mask[n, 0, : e - s, : e - s] = block_mask[row, s:e, s:e]
            slot += len(members) * longest
            buckets.append(LengthBucket(gather.to(block_mask.device), mask.to(block_mask.device)))
        return cls(buckets, scatter.to(block_mask.device))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
        """Scaled dot-product attention of q [rows, heads, seq, dim] (k, v alike) within each sample."""
        rows, heads, seq, dim = q.shape
        flat_q, flat_k, flat_v = (x.transpose(0, 1).reshape(x.shape[1], rows * seq, dim) for x in (q, k, v))
        outputs = []
        for bucket in self.buckets:
            out = F.scaled_dot_product_attention(
                bucket.batched(flat_q),
                bucket.batched(flat_k),
                bucket.batched(flat_v),
                attn_mask=bucket.mask,
                enable_gqa=enable_gqa,
            )
            outputs.append(out.transpose(0, 1).reshape(heads, -1, dim))
        flat = torch.cat(outputs, dim=1).index_select(1, self.scatter)
        return flat.reshape(heads, rows, seq, dim).transpose(0, 1)
