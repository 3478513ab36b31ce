"""Packed interleaved sequences with BAGEL's block rules.

A *sample* is a list of blocks: text, ViT images and VAE images (clean conditioning or noisy, to be
denoised). `pack` lays one or more samples per row into index tensors that `Bagel.forward_packed` fills
with embeddings, and records for each token its sample, its *split* (one per block) and the split's kind,
from which `block_attention_mask` derives BAGEL's mask:

    allowed = (causal or same full/noise split) and not (key in a noise split and query outside it)
              and same sample

RoPE ids: +1 per text token; one shared id per image block, +1 after it, except a noisy VAE block,
which does not advance the id. The same packer serves training (several samples in one row) and
inference (one sample per row, rows of different lengths, RoPE continuing from a KV cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from hyperbagel.backbone.config import BagelConfig
from hyperbagel.backbone.vision import flattened_position_ids

CAUSAL, FULL, NOISE = 0, 1, 2


@dataclass
class TextBlock:
    """`<|im_start|> ids <|im_end|>`; with `loss`, the block is trained to predict `ids + <|im_end|>`."""

    ids: Sequence[int]
    loss: bool = False


@dataclass
class VitImage:
    """An image seen through the ViT (understanding): `[3, H, W]` in [-1, 1], sides multiples of the patch."""

    pixels: torch.Tensor


@dataclass
class VaeImage:
    """An image in VAE latent space: clean (conditioning) or noisy (denoised, velocity loss in training).

    Give `pixels` `[3, H, W]` in [-1, 1] (sides multiples of the image stride), or precomputed normalised
    `latents` `[C, h, w]` to skip the autoencoder.
    """

    pixels: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    noisy: bool = False

    def __post_init__(self) -> None:
        if (self.pixels is None) == (self.latents is None):
            raise ValueError("a VaeImage needs exactly one of pixels or latents")


Block = TextBlock | VitImage | VaeImage
Sample = list[Block]


@dataclass
class PackedSequence:
    """Index tensors of a packed batch [rows, seq]; flat indexes address `row * seq + position`."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    gen_mask: torch.Tensor
    sample_ids: torch.Tensor
    split_ids: torch.Tensor
    split_kinds: torch.Tensor
    valid_lengths: list[int]
    rope_advance: list[int]
    vit_images: list[torch.Tensor] = field(default_factory=list)
    vit_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    vae_images: list[VaeImage] = field(default_factory=list)
    vae_grids: list[tuple[int, int]] = field(default_factory=list)
    vae_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    vae_position_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    ce_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    ce_labels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    @property
    def vae_noisy(self) -> torch.Tensor:
        """[num VAE images] True for images to denoise."""
        return torch.tensor([image.noisy for image in self.vae_images], dtype=torch.bool)

    @property
    def vae_token_image(self) -> torch.Tensor:
        """[num VAE tokens] index of the VAE image each latent token belongs to."""
        counts = torch.tensor([h * w for h, w in self.vae_grids], dtype=torch.long)
        return torch.repeat_interleave(torch.arange(len(counts)), counts)

    def block_mask(self) -> torch.Tensor:
        """Boolean [rows, seq, seq] attention mask of the packed tokens (True = may attend)."""
        return block_attention_mask(self.sample_ids, self.split_ids, self.split_kinds)

    def to(self, device: torch.device | str) -> PackedSequence:
        """Move the index tensors (images stay where they are until embedded)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return PackedSequence(**moved)


def block_attention_mask(
    sample_ids: torch.Tensor, split_ids: torch.Tensor, split_kinds: torch.Tensor
) -> torch.Tensor:
    """BAGEL's rule on [rows, seq] token labels; padding (sample -1) sees only itself so no row is empty."""
    seq = sample_ids.shape[1]
    position = torch.arange(seq, device=sample_ids.device)
    causal = position[None, :, None] >= position[None, None, :]
    kinds = split_kinds[split_ids.clamp(min=0)]
    same_split = split_ids[:, :, None] == split_ids[:, None, :]
    bidirectional = same_split & (kinds != CAUSAL)[:, :, None]
    hidden_noise = (kinds == NOISE)[:, None, :] & ~same_split
    same_sample = (sample_ids[:, :, None] == sample_ids[:, None, :]) & (sample_ids >= 0)[:, :, None]
    allowed = (causal | bidirectional) & ~hidden_noise & same_sample
    return allowed | torch.eye(seq, dtype=torch.bool, device=sample_ids.device)[None]


class _RowBuilder:
    """Accumulates the tokens of one row, block by block."""

    def __init__(self, rope_start: int) -> None:
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.gen: list[bool] = []
        self.samples: list[int] = []
        self.splits: list[int] = []
        self.rope = rope_start
        self.rope_start = rope_start

    def add(self, ids: list[int], positions: list[int], gen: list[bool], sample: int, split: int) -> int:
        """Append tokens; return the in-row index of the first one."""
        start = len(self.ids)
        self.ids += ids
        self.positions += positions
        self.gen += gen
        self.samples += [sample] * len(ids)
        self.splits += [split] * len(ids)
        return start


def vae_token_grid(image: VaeImage, config: BagelConfig) -> tuple[int, int]:
    """Latent-token grid (rows, cols) of a VAE image, validated against the model's geometry."""
    if image.latents is not None:
        h, w = image.latents.shape[-2:]
        patch = config.latent_patch_size
        if h % patch or w % patch:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the latent patch {patch}")
        grid = (h // patch, w // patch)
    else:
        height, width = image.pixels.shape[-2:]
        stride = config.image_stride
        if height % stride or width % stride:
            raise ValueError(
                f"VAE image size {height}x{width} is not a multiple of the image stride {stride}"
            )
        grid = (height // stride, width // stride)
    if max(grid) > config.max_latent_size:
        raise ValueError(f"latent grid {grid} exceeds max_latent_size {config.max_latent_size} per side")
    return grid


def vit_token_count(image: VitImage, config: BagelConfig) -> int:
    height, width = image.pixels.shape[-2:]
    patch = config.vit_patch_size
    if height % patch or width % patch:
        raise ValueError(f"ViT image size {height}x{width} is not a multiple of the ViT patch {patch}")
    return (height // patch) * (width // patch)


def sample_length(sample: Sample, config: BagelConfig) -> int:
    """Tokens a sample occupies once packed (markers included); used for packing budgets."""
    total = 0
    for block in sample:
        if isinstance(block, TextBlock):
            total += len(block.ids) + 2
        elif isinstance(block, VitImage):
            total += vit_token_count(block, config) + 2
        else:
            h, w = vae_token_grid(block, config)
            total += h * w + 2
    return total


def pack(
    rows: Sequence[Sequence[Sample]],
    config: BagelConfig,
    rope_start: Sequence[int] | None = None,
    pad_to: int | None = None,
) -> PackedSequence:
    """Pack `rows[r]` (a list of samples) into row r; RoPE of every sample starts at `rope_start[r]`."""
    specials = config.special_tokens
    rope_start = list(rope_start) if rope_start is not None else [0] * len(rows)
    builders: list[_RowBuilder] = []
    split_kinds: list[int] = []
    vit_images, vit_rows_index = [], []
    vae_images, vae_grids, vae_rows_index, vae_positions = [], [], [], []
    ce_rows_index, ce_labels = [], []
    sample_counter = 0
    for row_number, row_samples in enumerate(rows):
        row = _RowBuilder(rope_start[row_number])
        for sample in row_samples:
            row.rope = row.rope_start
            for block in sample:
                split = len(split_kinds)
                if isinstance(block, TextBlock):
                    ids = [specials.im_start, *[int(i) for i in block.ids], specials.im_end]
                    positions = list(range(row.rope, row.rope + len(ids)))
                    start = row.add(ids, positions, [False] * len(ids), sample_counter, split)
                    split_kinds.append(CAUSAL)
                    row.rope += len(ids)
                    if block.loss:
                        ce_rows_index += [(row_number, start + k) for k in range(len(ids) - 1)]
                        ce_labels += ids[1:]
                    continue
                if isinstance(block, VitImage):
                    count = vit_token_count(block, config)
                    kind, gen = FULL, False
                    vit_images.append(block.pixels)
                else:
                    h, w = vae_token_grid(block, config)
                    count = h * w
                    kind, gen = (NOISE if block.noisy else FULL), True
                    vae_images.append(block)
                    vae_grids.append((h, w))
                    vae_positions.append(flattened_position_ids(h, w, config.max_latent_size))
                ids = [specials.vision_start] + [0] * count + [specials.vision_end]
                start = row.add(
                    ids, [row.rope] * len(ids), [False] + [gen] * count + [False], sample_counter, split
                )
                target = vit_rows_index if isinstance(block, VitImage) else vae_rows_index
                target += [(row_number, start + 1 + k) for k in range(count)]
                split_kinds.append(kind)
                if kind != NOISE:
                    row.rope += 1
            sample_counter += 1
        builders.append(row)
    return _assemble(
        builders,
        split_kinds,
        vit_images,
        vit_rows_index,
        vae_images,
        vae_grids,
        vae_rows_index,
        vae_positions,
        ce_rows_index,
        ce_labels,
        pad_to,
    )


def _assemble(
    builders,
    split_kinds,
    vit_images,
    vit_rows_index,
    vae_images,
    vae_grids,
    vae_rows_index,
    vae_positions,
    ce_rows_index,
    ce_labels,
    pad_to,
) -> PackedSequence:
    """Turn row builders into padded [rows, seq] tensors and flat indexes."""
    lengths = [len(b.ids) for b in builders]
    seq = max([*lengths, pad_to or 0, 1])

    def padded(attr: str, fill: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([getattr(b, attr) + [fill] * (seq - len(b.ids)) for b in builders], dtype=dtype)

    def flat(pairs: list[tuple[int, int]]) -> torch.Tensor:
        return torch.tensor([r * seq + p for r, p in pairs], dtype=torch.long)

    return PackedSequence(
        input_ids=padded("ids", 0, torch.long),
        position_ids=padded("positions", 0, torch.long),
        gen_mask=padded("gen", False, torch.bool),
        sample_ids=padded("samples", -1, torch.long),
        split_ids=padded("splits", -1, torch.long),
        split_kinds=torch.tensor(split_kinds or [CAUSAL], dtype=torch.long),
        valid_lengths=lengths,
        rope_advance=[b.rope - b.rope_start for b in builders],
        vit_images=vit_images,
        vit_index=flat(vit_rows_index),
        vae_images=vae_images,
        vae_grids=vae_grids,
        vae_index=flat(vae_rows_index),
        vae_position_ids=torch.cat(vae_positions) if vae_positions else torch.zeros(0, dtype=torch.long),
        ce_index=flat(ce_rows_index),
        ce_labels=torch.tensor(ce_labels, dtype=torch.long),
    )
