"""BAGEL's small embedding modules, with its exact parameter names.

- ``MLPConnector``: ViT features -> LLM hidden size (checkpoint keys ``connector.fc{1,2}.*``).
- ``PositionEmbedding``: frozen 2-D sin-cos table indexed by ``row * max_side + col``
  (``vit_pos_embed.pos_embed``, ``latent_pos_embed.pos_embed``).
- ``TimestepEmbedder``: sinusoid of the raw flow time t in [0, 1] followed by an MLP
  (``time_embedder.mlp.{0,2}.*``); the result is added to latent tokens, no AdaLN.
"""

import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding
from torch import nn
from transformers.activations import ACT2FN


class MLPConnector(nn.Module):
    """Two Linear layers with an activation between them (BAGEL's ``MLPconnector``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, act: str = "gelu_pytorch_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class PositionEmbedding(nn.Module):
    """Frozen MAE 2-D sin-cos embedding of a ``max_num_patch_per_side`` square grid.

    Row ``r * side + c`` holds ``[sin, cos](c * omega)`` in the first half of the channels and
    ``[sin, cos](r * omega)`` in the second. It is a Parameter (not a buffer) because BAGEL
    stores it in the checkpoint under ``pos_embed``.
    """

    def __init__(self, max_num_patch_per_side: int, hidden_size: int):
        super().__init__()
        self.max_num_patch_per_side = max_num_patch_per_side
        # base_size = grid size and no interpolation scale keep the grid coordinates raw integers.
        table = get_2d_sincos_pos_embed(
            hidden_size, max_num_patch_per_side, base_size=max_num_patch_per_side, interpolation_scale=1.0
        )
        self.pos_embed = nn.Parameter(table.float(), requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """Sinusoid ``[cos(t*f), sin(t*f)]`` with ``f = 10000**(-i/half)`` of the raw t, then Linear-SiLU-Linear.

    Generic over what the scalar means: the same module embeds CFG guidance scales.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def frequency_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Float32 sinusoid ``[N, frequency_embedding_size]`` of ``t [N]`` (not scaled by 1000)."""
        return get_timestep_embedding(
            t, self.frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=0
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        frequencies = self.frequency_embedding(t).to(self.mlp[0].weight.dtype)
        return self.mlp(frequencies)
