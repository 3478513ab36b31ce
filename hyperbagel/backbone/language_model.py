"""BAGEL's language model: Qwen2 with QK-norm and a Mixture-of-Transformers (MoT).

Every layer holds two experts, *understanding* (text and ViT tokens) and *generation* (VAE latent
tokens), each with its own projections, norms and MLP; all tokens meet in ONE attention over the whole
mixed sequence. Parameter names follow BAGEL's checkpoint (`q_proj` / `q_proj_moe_gen`, ...), so a
state dict loads without renaming. Tokens are routed by a boolean `gen_mask`; when it is None every
token takes the understanding expert without any gather/scatter, which is the text-decoding hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)

from hyperbagel.backbone.kv_cache import KVCache
from hyperbagel.backbone.segmented_attention import SampleSegments


def head_dim_of(config: Qwen2Config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass
class Routing:
    """Which flat token positions ([batch*seq]) go to which expert; built once per forward."""

    und_index: torch.Tensor
    gen_index: torch.Tensor

    @classmethod
    def from_mask(cls, gen_mask: torch.Tensor | None) -> Routing | None:
        if gen_mask is None or not bool(gen_mask.any()):
            return None
        flat = gen_mask.reshape(-1)
        return cls(und_index=(~flat).nonzero().squeeze(1), gen_index=flat.nonzero().squeeze(1))

    def apply(
        self,
        x: torch.Tensor,
        und_fn: Callable[[torch.Tensor], torch.Tensor],
        gen_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Run each expert on its tokens of x [batch, seq, dim] and put results back in order."""
        batch, seq = x.shape[:2]
        flat = x.reshape(batch * seq, *x.shape[2:])
        gen_out = gen_fn(flat.index_select(0, self.gen_index))
        out = gen_out.new_zeros(batch * seq, *gen_out.shape[1:]).index_copy(0, self.gen_index, gen_out)
        if self.und_index.numel():
            und_out = und_fn(flat.index_select(0, self.und_index)).to(out.dtype)
            out = out.index_copy(0, self.und_index, und_out)
        return out.reshape(batch, seq, *gen_out.shape[1:])


def route(
    x: torch.Tensor,
    routing: Routing | None,
    und_fn: Callable[[torch.Tensor], torch.Tensor],
    gen_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    return und_fn(x) if routing is None else routing.apply(x, und_fn, gen_fn)


class MoTAttention(nn.Module):
    """Grouped-query attention with per-expert q/k/v/o projections and per-expert QK RMSNorm."""

    def __init__(self, config: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim_of(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        hidden, q_dim, kv_dim = (
            config.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(hidden, q_dim, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(hidden, kv_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(hidden, kv_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(q_dim, hidden, bias=False))
            setattr(self, f"q_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps))

    def _qkv(self, x: torch.Tensor, suffix: str) -> torch.Tensor:
        """Project, split heads and QK-normalise one expert's tokens x [n, hidden] -> [n, heads_total, hd]."""
        n = x.shape[0]
        q = getattr(self, f"q_norm{suffix}")(getattr(self, f"q_proj{suffix}")(x).view(n, self.num_heads, -1))
        k = getattr(self, f"k_norm{suffix}")(
            getattr(self, f"k_proj{suffix}")(x).view(n, self.num_kv_heads, -1)
        )
        v = getattr(self, f"v_proj{suffix}")(x).view(n, self.num_kv_heads, -1)
        return torch.cat([q, k, v], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | SampleSegments | None,
        routing: Routing | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        if routing is None:
            qkv = self._qkv(x.reshape(batch * seq, -1), "").view(batch, seq, -1, self.head_dim)
        else:
            qkv = routing.apply(x, lambda t: self._qkv(t, ""), lambda t: self._qkv(t, "_moe_gen"))
        q, k, v = qkv.transpose(1, 2).split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        cos, sin = rope
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v)
        enable_gqa = self.num_kv_heads != self.num_heads
        if isinstance(attention_mask, SampleSegments):
            out = attention_mask.attend(q, k, v, enable_gqa)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attention_mask,
                enable_gqa=enable_gqa,
                is_causal=attention_mask is None and cache is None and seq > 1,
            )
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return route(out, routing, self.o_proj, self.o_proj_moe_gen)


class MoTDecoderLayer(nn.Module):
    """Pre-norm transformer layer whose norms, attention projections and MLP exist once per expert."""

    def __init__(self, config: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MoTAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.mlp_moe_gen = Qwen2MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=eps)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | SampleSegments | None,
        routing: Routing | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        normed = route(x, routing, self.input_layernorm, self.input_layernorm_moe_gen)
        x = x + self.self_attn(normed, rope, attention_mask, routing, cache)
        mlp_und = lambda t: self.mlp(self.post_attention_layernorm(t))  # noqa: E731
        mlp_gen = lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t))  # noqa: E731
        return x + route(x, routing, mlp_und, mlp_gen)


@dataclass
class LanguageModelOutput:
    last_hidden_state: torch.Tensor
    hidden_states: list[torch.Tensor] | None = None


class Qwen2MoTModel(nn.Module):
    """The decoder stack: embedding, MoT layers, one final norm per expert, shared RoPE."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | SampleSegments | None = None,
        gen_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
    ) -> LanguageModelOutput:
        """Run [batch, seq, hidden] embeddings through the stack.

        attention_mask: boolean [batch or 1, 1, seq, keys] (True = may attend), or `SampleSegments` of a
        cache-free pack (one attention per sample); None means causal attention (over the committed cache
        plus the new tokens when a cache is given).
        gen_mask: [batch, seq] True for tokens of the generation expert (noisy or clean latent tokens).
        cache: new keys/values are written past each sample's committed length; the caller commits.
        output_hidden_states: also return the input of every layer and the final (pre-norm) output,
        indexed like transformers' `output_hidden_states` (index i = input of layer i).
        """
        routing = Routing.from_mask(gen_mask)
        if attention_mask is None and cache is not None:
            attention_mask = cache.attention_mask(inputs_embeds.shape[1])
        rope = self.rotary_emb(inputs_embeds, position_ids)
        x = inputs_embeds
        hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, rope, attention_mask, routing, cache, use_reentrant=False)
            else:
                x = layer(x, rope, attention_mask, routing, cache)
        if hidden_states is not None:
            hidden_states.append(x)
        x = route(x, routing, self.norm, self.norm_moe_gen)
        return LanguageModelOutput(last_hidden_state=x, hidden_states=hidden_states)


class Qwen2MoTForCausalLM(nn.Module):
    """`model` + untied `lm_head`, named as in BAGEL (`language_model.model.*`, `language_model.lm_head`)."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2MoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return head_dim_of(self.config)

    def new_cache(
        self,
        batch_size: int = 1,
        capacity: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        weight = self.lm_head.weight
        return KVCache(
            self.num_layers,
            batch_size,
            self.num_kv_heads,
            self.head_dim,
            capacity,
            dtype=dtype or weight.dtype,
            device=device or weight.device,
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Logits for text-only input (understanding expert, causal); used by tests and draft training."""
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        out = self.model(inputs_embeds, position_ids, **kwargs)
        return self.lm_head(out.last_hidden_state)
