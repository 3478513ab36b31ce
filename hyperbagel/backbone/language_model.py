"""BAGEL's language model: Qwen2 with QK-norm and a Mixture-of-Transformers (MoT).

Every layer holds two experts, *understanding* (text and ViT tokens) and *generation* (VAE latent
tokens), each with its own projections, norms and MLP; all tokens meet in ONE attention over the whole
mixed sequence. Parameter names follow BAGEL's checkpoint (`q_proj` / `q_proj_moe_gen`, ...), so a
state dict loads without renaming. Tokens are routed by a boolean `gen_mask`; when it is None every
token takes the understanding expert without any gather/scatter, which is the text-decoding hot path.
Norms call torch's `rms_norm` (see `RMSNorm`): at the demo scale a denoising step's time is mostly
per-operation overhead, so operations per layer count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)

from hyperbagel.backbone.kv_cache import KVCache
from hyperbagel.backbone.segmented_attention import SampleSegments


class RMSNorm(nn.RMSNorm):
    """Qwen2's RMSNorm as torch's `rms_norm` (same `weight` key; fewer operations a call).

    Under autocast a bf16 input meets the float32 weight: it is normalised in float32 (the weight's dtype),
    where Qwen2RMSNorm also normalises, instead of taking torch's slow mixed-dtype path with a warning.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


def head_dim_of(config: Qwen2Config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass
class Routing:
    """Which flat token positions ([batch*seq]) belong to which expert; built once per forward.

    Between attentions every operation is per token, so the residual stream is held split by expert
    (understanding rows, generation rows) through the whole stack: tokens are merged into sequence order
    only for attention (its q/k/v) and split again after it, which is two gathers and one scatter per layer
    instead of a gather/scatter round trip around every norm, projection and MLP.
    """

    und_index: torch.Tensor
    gen_index: torch.Tensor
    batch: int
    seq: int

    @classmethod
    def from_mask(cls, gen_mask: torch.Tensor | None) -> Routing | None:
        if gen_mask is None or not bool(gen_mask.any()):
            return None
        flat = gen_mask.reshape(-1)
        return cls(
            und_index=(~flat).nonzero().squeeze(1),
            gen_index=flat.nonzero().squeeze(1),
            batch=gen_mask.shape[0],
            seq=gen_mask.shape[1],
        )

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [batch, seq, ...] -> (understanding rows [n_und, ...], generation rows [n_gen, ...])."""
        flat = x.reshape(self.batch * self.seq, *x.shape[2:])
        return flat.index_select(0, self.und_index), flat.index_select(0, self.gen_index)

    def merge(self, und: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
        """The inverse of `split`: both experts' rows back in sequence order, [batch, seq, ...]."""
        out = gen.new_zeros(self.batch * self.seq, *gen.shape[1:]).index_copy(0, self.gen_index, gen)
        out = out.index_copy(0, self.und_index, und.to(out.dtype))
        return out.view(self.batch, self.seq, *gen.shape[1:])


def split_stream(x: torch.Tensor, routing: Routing | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The residual stream by expert; without routing every token is the understanding expert's."""
    return (x, None) if routing is None else routing.split(x)


def merge_stream(und: torch.Tensor, gen: torch.Tensor | None, routing: Routing | None) -> torch.Tensor:
    return und if routing is None else routing.merge(und, gen)


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
            setattr(self, f"q_norm{suffix}", RMSNorm(self.head_dim, eps=config.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(self.head_dim, eps=config.rms_norm_eps))

    def qkv(self, x: torch.Tensor, suffix: str) -> torch.Tensor:
        """Project, split heads, QK-normalise one expert's tokens: [..., hidden] -> [..., heads_total, hd]."""
        lead = x.shape[:-1]
        q = getattr(self, f"q_norm{suffix}")(
            getattr(self, f"q_proj{suffix}")(x).view(*lead, self.num_heads, self.head_dim)
        )
        k = getattr(self, f"k_norm{suffix}")(
            getattr(self, f"k_proj{suffix}")(x).view(*lead, self.num_kv_heads, self.head_dim)
        )
        v = getattr(self, f"v_proj{suffix}")(x).view(*lead, self.num_kv_heads, self.head_dim)
        return torch.cat([q, k, v], dim=-2)

    def attend(
        self,
        qkv: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | SampleSegments | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """Attention over all tokens: qkv [batch, seq, heads_total, hd] -> [batch, seq, heads * hd]."""
        batch, seq = qkv.shape[:2]
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
        return out.transpose(1, 2).reshape(batch, seq, -1)


class MoTDecoderLayer(nn.Module):
    """Pre-norm transformer layer whose norms, attention projections and MLP exist once per expert."""

    def __init__(self, config: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MoTAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.mlp_moe_gen = Qwen2MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.input_layernorm_moe_gen = RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(config.hidden_size, eps=eps)

    def forward(
        self,
        und: torch.Tensor,
        gen: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | SampleSegments | None,
        routing: Routing | None,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer over the expert-split residual stream (see `Routing`); returns the updated stream."""
        attn = self.self_attn
        qkv_und = attn.qkv(self.input_layernorm(und), "")
        qkv_gen = None if gen is None else attn.qkv(self.input_layernorm_moe_gen(gen), "_moe_gen")
        out_und, out_gen = split_stream(
            attn.attend(merge_stream(qkv_und, qkv_gen, routing), rope, attention_mask, cache), routing
        )
        und = und + attn.o_proj(out_und)
        und = und + self.mlp(self.post_attention_layernorm(und))
        if gen is not None:
            gen = gen + attn.o_proj_moe_gen(out_gen)
            gen = gen + self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(gen))
        return und, gen


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
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
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
        und, gen = split_stream(inputs_embeds, routing)
        hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(merge_stream(und, gen, routing))
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                und, gen = checkpoint(
                    layer, und, gen, rope, attention_mask, routing, cache, use_reentrant=False
                )
            else:
                und, gen = layer(und, gen, rope, attention_mask, routing, cache)
        if hidden_states is not None:
            hidden_states.append(merge_stream(und, gen, routing))
        und = self.norm(und)
        x = merge_stream(und, None if gen is None else self.norm_moe_gen(gen), routing)
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
