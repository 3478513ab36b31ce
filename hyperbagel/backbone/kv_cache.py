"""A preallocated key/value cache with per-sample lengths, multi-token append and rollback.

Speculative decoding appends a whole draft in one forward and then rolls rejected tokens back; image
generation queries the cached context many times with a noisy latent block that must never be stored.
Both are served by one mechanism: a forward always *writes* its keys and values just past each sample's
committed length, and only `commit` makes them part of the context. Lengths and RoPE cursors live on the
host as Python ints so the bookkeeping never forces a device synchronisation.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values of shape [layers, batch, kv_heads, capacity, head_dim], grown on demand."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * batch_size
        self.rope_cursor = [0] * batch_size

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def reserve(self, num_new: int) -> None:
        """Make room for `num_new` tokens past the longest sample, doubling the buffer when needed."""
        needed = max(self.lengths) + num_new
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = old.new_zeros(*old.shape[:3], new_capacity, old.shape[4])
            grown[:, :, :, : old.shape[3]] = old
            setattr(self, name, grown)

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new [batch, kv_heads, S, head_dim] keys/values past each length; return the visible span.

        The span returned covers `max(lengths) + S` positions; the attention mask built by `attention_mask`
        hides whatever in it does not belong to a sample.
        """
        num_new = keys.shape[2]
        start = self.lengths[0]
        if all(length == start for length in self.lengths):
            self.keys[layer, :, :, start : start + num_new] = keys
            self.values[layer, :, :, start : start + num_new] = values
        else:
            for b, length in enumerate(self.lengths):
                self.keys[layer, b, :, length : length + num_new] = keys[b]
                self.values[layer, b, :, length : length + num_new] = values[b]
        span = max(self.lengths) + num_new
        return self.keys[layer, :, :, :span], self.values[layer, :, :, :span]

    def attention_mask(
        self, num_new: int, block_mask: torch.Tensor | None = None, valid_new: list[int] | None = None
    ) -> torch.Tensor | None:
        """Boolean mask [batch, 1, num_new, span] for `num_new` query tokens written by `write`.

        A query sees its sample's committed context plus the new tokens that `block_mask` ([S, S] or
        [batch, S, S], True = visible) allows; `valid_new[b]` new tokens of sample b are real, the rest is
        padding that nobody sees. Returns None when no masking is needed (one new token, equal lengths),
        which keeps plain decoding on the fastest attention kernel.
        """
        uniform = all(length == self.lengths[0] for length in self.lengths)
        if num_new == 1 and uniform and valid_new is None and block_mask is None:
            return None
        device = self.device
        span = max(self.lengths) + num_new
        lengths = torch.tensor(self.lengths, device=device)[:, None, None]
        valid = torch.tensor(
            valid_new if valid_new is not None else [num_new] * self.batch_size, device=device
        )[:, None, None]
        key_pos = torch.arange(span, device=device)[None, None, :]
        offset = key_pos - lengths  # index of a key inside the new block, negative for context
        in_context = offset < 0
        in_new = (offset >= 0) & (offset < valid)
        if block_mask is None:
            block_mask = torch.ones(num_new, num_new, dtype=torch.bool, device=device).tril()
        if block_mask.dim() == 2:
            block_mask = block_mask.expand(self.batch_size, num_new, num_new)
        gather_index = offset.clamp(0, num_new - 1).expand(self.batch_size, num_new, span)
        new_visible = torch.gather(block_mask, 2, gather_index)
        return (in_context | (in_new & new_visible)).unsqueeze(1)

    def commit(self, num_new: int | list[int], rope_advance: int | list[int]) -> None:
        """Make the last written tokens part of the context and move each sample's RoPE cursor."""
        counts = num_new if isinstance(num_new, list) else [num_new] * self.batch_size
        advances = rope_advance if isinstance(rope_advance, list) else [rope_advance] * self.batch_size
        self.lengths = [length + n for length, n in zip(self.lengths, counts)]
        self.rope_cursor = [rope + a for rope, a in zip(self.rope_cursor, advances)]

    def rollback(self, lengths: int | list[int], rope_cursor: int | list[int] | None = None) -> None:
        """Forget everything past `lengths` (the stale tensors are simply overwritten later)."""
        new_lengths = lengths if isinstance(lengths, list) else [lengths] * self.batch_size
        if any(n > old or n < 0 for n, old in zip(new_lengths, self.lengths)):
            raise ValueError(f"cannot roll back to {new_lengths}: current lengths are {self.lengths}")
        if rope_cursor is None:
            rope_cursor = [
                rope - (old - n) for rope, old, n in zip(self.rope_cursor, self.lengths, new_lengths)
            ]
        self.lengths = new_lengths
        self.rope_cursor = rope_cursor if isinstance(rope_cursor, list) else [rope_cursor] * self.batch_size

    def move_tokens(self, start: int, source_offsets: torch.Tensor) -> None:
        """Copy tokens at `start + source_offsets` to `start, start+1, ...` in all layers (tree pruning)."""
        positions = start + source_offsets.to(self.device)
        count = positions.numel()
        self.keys[:, :, :, start : start + count] = self.keys[:, :, :, positions]
        self.values[:, :, :, start : start + count] = self.values[:, :, :, positions]

    def narrow(self, start: int, length: int) -> KVCache:
        """A cache over batch rows [start, start + length) sharing this one's storage (no copy).

        Safe for uncommitted queries (e.g. the conditional rows of a CFG batch); do not grow it.
        """
        view = KVCache.__new__(KVCache)
        view.keys, view.values = self.keys[:, start : start + length], self.values[:, start : start + length]
        view.lengths = self.lengths[start : start + length]
        view.rope_cursor = self.rope_cursor[start : start + length]
        return view

    def clone(self) -> KVCache:
        other = KVCache.__new__(KVCache)
        other.keys, other.values = self.keys.clone(), self.values.clone()
        other.lengths, other.rope_cursor = list(self.lengths), list(self.rope_cursor)
        return other

    @classmethod
    def stack(cls, caches: list[KVCache]) -> KVCache:
        """Join single- or multi-sample caches along the batch (e.g. the three CFG contexts of one prompt)."""
        span = max(max(c.lengths) for c in caches)
        capacity = max(span + 64, max(c.capacity for c in caches))
        pad = torch.nn.functional.pad
        parts_k = [pad(c.keys, (0, 0, 0, capacity - c.capacity)) for c in caches]
        parts_v = [pad(c.values, (0, 0, 0, capacity - c.capacity)) for c in caches]
        stacked = cls.__new__(cls)
        stacked.keys, stacked.values = torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1)
        stacked.lengths = [n for c in caches for n in c.lengths]
        stacked.rope_cursor = [r for c in caches for r in c.rope_cursor]
        return stacked
