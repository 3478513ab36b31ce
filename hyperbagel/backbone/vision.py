"""SigLIP NaViT image encoder with BAGEL's parameter names.

BAGEL feeds the ViT images at their native resolution: every image is cut into patches,
the patches of all images are concatenated into ONE packed sequence, and attention is
restricted to the patches of the same image. Patches are embedded by a Linear layer (not
SigLIP's Conv2d) and get a learned position embedding indexed by ``row * max_side + col``,
so a small image reuses the top-left corner of the position table instead of interpolating.
The transformer layers are transformers' own ``SiglipEncoderLayer``, so the parameter names
below ``vision_model.encoder.layers.{i}`` are SigLIP's and a BAGEL checkpoint loads as is.
"""

import copy

import torch
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer


def patchify_image(image: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut ``[C, H, W]`` into ``[H/p * W/p, p*p*C]`` patches, row-major, channel last inside a patch.

    This is BAGEL's order; it matches a Conv2d patch weight converted by ``conv_patch_weight_to_linear``.
    """
    channels, height, width = image.shape
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width} is not a multiple of the ViT patch size {patch}")
    grid = image.reshape(channels, height // patch, patch, width // patch, patch)
    grid = torch.einsum("chpwq->hwpqc", grid)
    return grid.reshape(-1, patch * patch * channels)


def conv_patch_weight_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """Turn a SigLIP Conv2d patch weight ``[D, C, p, p]`` into the Linear weight ``[D, p*p*C]``
    that acts on ``patchify_image`` output (used when loading original SigLIP checkpoints)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def flattened_position_ids(grid_h: int, grid_w: int, max_per_side: int) -> torch.Tensor:
    """Position ids ``row * max_per_side + col`` of a ``grid_h x grid_w`` patch grid, row-major.

    Indexing a square ``max_per_side`` table keeps every (row, col) at the same entry whatever the
    image size (BAGEL's ``get_flattened_position_ids_extrapolate``).
    """
    if grid_h > max_per_side or grid_w > max_per_side:
        raise ValueError(f"patch grid {grid_h}x{grid_w} exceeds the maximum of {max_per_side} per side")
    rows = torch.arange(grid_h)[:, None]
    cols = torch.arange(grid_w)[None, :]
    return (rows * max_per_side + cols).flatten()


def block_diagonal_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Boolean ``[1, 1, N, N]`` mask letting each packed image attend (both ways) only to itself."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    image_index = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    return (image_index[:, None] == image_index[None, :])[None, None]


class NaViTEmbeddings(nn.Module):
    """Linear patch embedding plus learned position embedding over the ``max_side**2`` table."""

    def __init__(self, config: SiglipVisionConfig, max_num_patch_per_side: int):
        super().__init__()
        patch_dim = config.num_channels * config.patch_size**2
        self.patch_embedding = nn.Linear(patch_dim, config.hidden_size)
        self.position_embedding = nn.Embedding(max_num_patch_per_side**2, config.hidden_size)

    def forward(self, packed_pixel_values: torch.Tensor, packed_position_ids: torch.Tensor) -> torch.Tensor:
        patches = packed_pixel_values.to(self.patch_embedding.weight.dtype)
        return self.patch_embedding(patches) + self.position_embedding(packed_position_ids)


class NaViTEncoder(nn.Module):
    """SigLIP encoder layers run over one packed sequence with a per-image attention mask."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        # A single image needs no mask, which keeps SDPA free to pick its fastest kernel.
        mask = block_diagonal_mask(cu_seqlens) if len(cu_seqlens) > 2 else None
        hidden_states = hidden_states[None]
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask)
        return hidden_states[0]


class NaViTTransformer(nn.Module):
    """Embeddings, encoder and final LayerNorm; SigLIP's pooling head is not part of BAGEL."""

    def __init__(self, config: SiglipVisionConfig, max_num_patch_per_side: int):
        super().__init__()
        self.embeddings = NaViTEmbeddings(config, max_num_patch_per_side)
        self.encoder = NaViTEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, packed_pixel_values: torch.Tensor, packed_position_ids: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        hidden_states = self.embeddings(packed_pixel_values, packed_position_ids)
        return self.post_layernorm(self.encoder(hidden_states, cu_seqlens))


class SiglipNaViT(nn.Module):
    """BAGEL's native-resolution SigLIP encoder (held by the Bagel model as ``vit_model``).

    ``max_num_patch_per_side`` sizes the position table (70 for BAGEL-7B-MoT: 980 px / 14).
    The config is copied and switched to SDPA attention so it runs without flash-attn.
    """

    def __init__(self, config: SiglipVisionConfig, max_num_patch_per_side: int):
        super().__init__()
        config = copy.deepcopy(config)
        config._attn_implementation = "sdpa"
        self.config = config
        self.max_num_patch_per_side = max_num_patch_per_side
        self.vision_model = NaViTTransformer(config, max_num_patch_per_side)

    def forward(
        self, packed_pixel_values: torch.Tensor, packed_position_ids: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        """Encode packed patches ``[N, 3*p*p]`` (images bounded by ``cu_seqlens``) to ``[N, hidden]``."""
        return self.vision_model(packed_pixel_values, packed_position_ids, cu_seqlens)

    def pack_images(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patchify ``[3, H, W]`` images and pack them: ``(pixels [N, 3*p*p], cu_seqlens, position_ids)``."""
        if not images:
            raise ValueError("pack_images needs at least one image")
        patch = self.config.patch_size
        pixels, position_ids, lengths = [], [], [0]
        for image in images:
            patches = patchify_image(image, patch)
            pixels.append(patches)
            grid_h, grid_w = image.shape[1] // patch, image.shape[2] // patch
            position_ids.append(flattened_position_ids(grid_h, grid_w, self.max_num_patch_per_side))
            lengths.append(len(patches))
        cu_seqlens = torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return torch.cat(pixels), cu_seqlens, torch.cat(position_ids)

    def encode_images(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patchify, pack and encode ``[3, H, W]`` images: ``(features, cu_seqlens, position_ids)``."""
        device = self.vision_model.embeddings.patch_embedding.weight.device
        pixels, cu_seqlens, position_ids = self.pack_images(images)
        pixels, cu_seqlens, position_ids = pixels.to(device), cu_seqlens.to(device), position_ids.to(device)
        return self(pixels, position_ids, cu_seqlens), cu_seqlens, position_ids
