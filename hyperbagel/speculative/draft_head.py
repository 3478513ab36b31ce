"""The speculative draft head: EAGLE-3's and Hyper-Bagel's, one class.

Two stages, as the decoders and the trainer call them:

`fuse(target_hidden_states)` turns the target's hidden states (`hidden_states[i]` = input of layer i,
`hidden_states[L]` = last layer's pre-norm output) into draft input features F_in [B, S, H]:
- `eagle3`:     F_in = h_base + fc(concat(h_low, h_mid, h_high))
- `meta_query`: c_q  = h_tap(q) + o_proj(CrossAttn(f_q; keys/values = h_1..h_L of this token))
                F_in = Dec(h_base + fc1(flatten(c_1..c_Q)))
`forward(features, ids)` runs one draft step:
                x    = features + fc2(concat(norm(embed(ids)), norm(features)));  x -> N draft layers

Where the residuals go (our reading of the paper's "skip connections carry EAGLE-3's low/mid/high
features" and "at step 0 the draft behaves like the tail of the target"):
- query q's residual stream starts from tap q (low, mid, high = `hidden_states` indices
  `tap_layers`, EAGLE-3's (2, L//2, L-3)); queries beyond the third start from zero. At zero init the
  flattened cross-attention output is therefore exactly EAGLE-3's concatenation, and fc1 plays the role
  of EAGLE-3's fc;
- `h_base` = `hidden_states[L - N]`, the input of the first target layer the N draft layers are copied
  from. With fc / fc1, fc2 and the last projections (cross-attention `o_proj`, Dec's `o_proj` and
  `down_proj`) at zero, Dec is the identity, F_in = h_base, x = F_in, and the draft layers compute the
  target's last N layers on the target's own input: forward(fuse(states)) equals the target's logits
  (rows of the draft vocabulary) at every position, and the returned hidden equals `hidden_states[L]`.
  Training then moves the head from "repeat the target" towards "predict one token further".
Dec and the draft layers are single-expert copies of the target's understanding expert (Qwen2 with
QK-norm and qkv bias, the target's RoPE); Dec starts as a copy of target layer L - N because its input at
init is that layer's input. Cross-attention keys get a learned per-layer embedding (otherwise attention
over the L layer states could not tell layers apart) and all states pass one RMSNorm first (layer states
differ in scale by orders of magnitude).

`eagle3_compatible=True` is plain EAGLE-3 as SGLang / vLLM run `LlamaForCausalLMEagle3`:
F_in = fc(concat(low, mid, high)) without residual, and one Llama midlayer whose q/k/v read
[input_layernorm(embed); hidden_norm(feature)] (2H inputs, no bias, no QK-norm). It cannot start as the
target's tail, so it trains from a random init (zero_init must be off); it exports bit-exactly
(`hyperbagel.speculative.export`).

Contexts with images: the target gives a whole image block one RoPE id and routes clean latent tokens to
its generation expert. The draft takes the fused target features at those positions like anywhere else
(they are part of the context its attention reads) under the same RoPE ids, but runs only the
understanding expert, and it is never asked to predict inside an image block: it drafts text only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)

from hyperbagel.backbone.kv_cache import KVCache
from hyperbagel.backbone.language_model import RMSNorm, head_dim_of
from hyperbagel.speculative.vocab import draft_to_target, select_draft_vocab, target_to_draft, vocab_maps

if TYPE_CHECKING:
    from hyperbagel.backbone.bagel import Bagel

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DraftHeadConfig:
    """Architecture of a draft head (its dimensions come from the target)."""

    aggregation: Literal["eagle3", "meta_query"] = "meta_query"
    num_layers: int = 2  # draft decoder layers, initialised from the target's last num_layers
    num_queries: int = 3  # meta_query only; queries 0, 1, 2 carry the low / mid / high skip connections
    zero_init: bool = True  # fc / fc1, fc2, last projections of the cross-attention and Dec start at zero
    draft_vocab_size: int | None = None  # None = full target vocabulary
    tap_layers: tuple[int, int, int] | None = None  # None = EAGLE-3's (2, L//2, L-3), clamped to [0, L]
    eagle3_compatible: bool = False  # plain EAGLE-3 (eagle3 aggregation, one Llama midlayer): exports as-is

    def __post_init__(self) -> None:
        if self.aggregation not in ("eagle3", "meta_query"):
            raise ValueError(f"aggregation must be 'eagle3' or 'meta_query', not {self.aggregation!r}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, not {self.num_layers}")
        if self.aggregation == "meta_query" and self.num_queries < 3:
            raise ValueError(
                f"num_queries must be >= 3 (queries 0-2 carry the low/mid/high skip connections), "
                f"not {self.num_queries}"
            )
        if self.tap_layers is not None:
            if len(self.tap_layers) != 3:
                raise ValueError(f"tap_layers needs three hidden_states indices, not {self.tap_layers}")
            self.tap_layers = tuple(int(i) for i in self.tap_layers)
        if self.eagle3_compatible:
            wrong = {
                name: value
                for name, value, wanted in (
                    ("aggregation", self.aggregation, "eagle3"),
                    ("num_layers", self.num_layers, 1),
                    ("zero_init", self.zero_init, False),
                )
                if value != wanted
            }
            if wrong:
                raise ValueError(
                    f"eagle3_compatible needs aggregation='eagle3', num_layers=1, zero_init=False "
                    f"(EAGLE-3 has no residual for zero init to preserve); got {wrong}"
                )


def default_tap_layers(num_target_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's taps (2, L//2, L-3), clamped into [0, L] so that shallow test models work too."""
    layers = num_target_layers
    return (min(2, layers), layers // 2, max(layers - 3, 0))


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: Rope,
    layer_idx: int,
    cache: KVCache | None,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """RoPE, cache write and attention of [B, heads, S, hd] q/k/v, as in the target's MoTAttention
    (training-time test's cache computes its own attention: `ttt.TTTCache.attend`)."""
    q, k = apply_rotary_pos_emb(q, k, *rope)
    if hasattr(cache, "attend"):
        return cache.attend(layer_idx, q, k, v, attention_mask).transpose(1, 2).flatten(2)
    if cache is not None:
        k, v = cache.write(layer_idx, k, v)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attention_mask,
        enable_gqa=k.shape[1] != q.shape[1],
        is_causal=attention_mask is None and cache is None and q.shape[2] > 1,
    )
    return out.transpose(1, 2).flatten(2)


class DraftAttention(nn.Module):
    """Self-attention of a draft layer: the target's understanding expert (qkv bias, QK-norm) or, with
    `eagle3=True`, EAGLE-3's midlayer attention (q/k/v over 2H inputs, no bias, no QK-norm)."""

    def __init__(self, config: Qwen2Config, layer_idx: int, eagle3: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim_of(config)
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        hidden = config.hidden_size
        inputs = 2 * hidden if eagle3 else hidden
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(inputs, q_dim, bias=not eagle3)
        self.k_proj = nn.Linear(inputs, kv_dim, bias=not eagle3)
        self.v_proj = nn.Linear(inputs, kv_dim, bias=not eagle3)
        self.o_proj = nn.Linear(q_dim, hidden, bias=False)
        if not eagle3:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.qk_norm = not eagle3

    def forward(
        self, x: torch.Tensor, rope: Rope, cache: KVCache | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = _attend(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            rope,
            self.layer_idx,
            cache,
            attention_mask,
        )
        return self.o_proj(out)


class DraftDecoderLayer(nn.Module):
    """A single-expert copy of the target's MoT layer (parameter names of its understanding expert)."""

    def __init__(self, config: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DraftAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: Rope, cache: KVCache | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle3MidLayer(nn.Module):
    """EAGLE-3's `midlayer` exactly as SGLang's / vLLM's `LlamaForCausalLMEagle3` compute it."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = DraftAttention(config, 0, eagle3=True)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.hidden_norm = RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        rope: Rope,
        cache: KVCache | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        x = hidden + self.self_attn(x, rope, cache, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class MetaQueryCrossAttention(nn.Module):
    """Q learnable queries attend, per token, over that token's L layer states; returns [B, S, Q, H]
    (without the residual, which `DraftHead.fuse` adds)."""

    def __init__(self, config: Qwen2Config, num_queries: int, num_target_layers: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        if hidden % self.num_heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {self.num_heads}")
        self.queries = nn.Parameter(torch.empty(num_queries, hidden))
        self.layer_embed = nn.Parameter(torch.empty(num_target_layers, hidden))
        self.kv_norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, layer_states: torch.Tensor) -> torch.Tensor:
        batch, seq, layers, hidden = layer_states.shape
        tokens, heads = batch * seq, self.num_heads
        normed = self.kv_norm(layer_states)
        k = self.k_proj(normed + self.layer_embed).view(tokens, layers, heads, -1).transpose(1, 2)
        v = self.v_proj(normed).view(tokens, layers, heads, -1).transpose(1, 2)
        q = self.queries.view(1, -1, heads, hidden // heads).transpose(1, 2).expand(tokens, -1, -1, -1)
        out = F.scaled_dot_product_attention(q.to(k.dtype), k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1, hidden))


def _understanding_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The understanding expert's weights of a target MoT layer, under the draft layer's names."""
    return {key: value for key, value in layer.state_dict().items() if "_moe_gen" not in key}


class DraftHead(nn.Module):
    """A draft head for one target model; build it with `from_target` or `export.load_draft_head`."""

    def __init__(
        self,
        config: DraftHeadConfig,
        llm_config: Qwen2Config,
        num_target_layers: int,
        draft_vocab_size: int,
    ) -> None:
        """An untrained skeleton with the target's dimensions (`llm_config`); weights are random."""
        super().__init__()
        self.config = config
        self.llm_config = llm_config
        self.hidden_size = hidden = llm_config.hidden_size
        self.target_vocab_size = llm_config.vocab_size
        self.draft_vocab_size = draft_vocab_size
        self.num_target_layers = num_target_layers
        self.tap_layers = config.tap_layers or default_tap_layers(num_target_layers)
        self._check_layout()
        self.base_layer = num_target_layers - config.num_layers
        eps = llm_config.rms_norm_eps
        self.embed_tokens = nn.Embedding(self.target_vocab_size, hidden).requires_grad_(False)
        if config.aggregation == "eagle3":
            self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        else:
            self.cross_attn = MetaQueryCrossAttention(llm_config, config.num_queries, num_target_layers)
            self.fc1 = nn.Linear(config.num_queries * hidden, hidden, bias=False)
            self.dec = DraftDecoderLayer(llm_config, 0)
        if config.eagle3_compatible:
            self.midlayer = Eagle3MidLayer(llm_config)
        else:
            self.embed_norm = RMSNorm(hidden, eps=eps)
            self.feature_norm = RMSNorm(hidden, eps=eps)
            self.fc2 = nn.Linear(2 * hidden, hidden, bias=False)
            self.layers = nn.ModuleList(DraftDecoderLayer(llm_config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(hidden, eps=eps)
        self.lm_head = nn.Linear(hidden, draft_vocab_size, bias=False)
        self.rotary_emb = Qwen2RotaryEmbedding(llm_config)
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(self.target_vocab_size, dtype=torch.bool))
        self._init_weights(llm_config.initializer_range)

    def _check_layout(self) -> None:
        layers, config = self.num_target_layers, self.config
        if not config.eagle3_compatible and config.num_layers > layers:
            raise ValueError(
                f"num_layers {config.num_layers} exceeds the target's {layers} layers (the draft layers are "
                "copies of the target's last layers)"
            )
        if any(not 0 <= i <= layers for i in self.tap_layers):
            raise ValueError(
                f"tap_layers {self.tap_layers} must be hidden_states indices in [0, {layers}] of a "
                f"{layers}-layer target"
            )
        if not 0 < self.draft_vocab_size <= self.target_vocab_size:
            raise ValueError(
                f"draft_vocab_size {self.draft_vocab_size} must lie in [1, target vocabulary "
                f"{self.target_vocab_size}]"
            )

    def _init_weights(self, std: float) -> None:
        """HF's initializer for the modules the target has no counterpart of; norms start at one."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.config.aggregation == "meta_query":
            nn.init.normal_(self.cross_attn.queries, std=std)
            nn.init.normal_(self.cross_attn.layer_embed, std=std)

    def zero_init_(self) -> None:
        """Zero fc / fc1, fc2 and the last projections of the cross-attention and Dec (see module doc)."""
        if self.config.eagle3_compatible:
            raise ValueError("the EAGLE-3-compatible head has no residual design to zero-init")
        if self.config.aggregation == "eagle3":
            zeroed = [self.fc.weight]
        else:
            zeroed = [self.fc1.weight, self.cross_attn.o_proj.weight]
            zeroed += [self.dec.self_attn.o_proj.weight, self.dec.mlp.down_proj.weight]
        zeroed.append(self.fc2.weight)
        with torch.no_grad():
            for weight in zeroed:
                weight.zero_()

    def set_vocabulary(self, draft_ids: torch.Tensor) -> None:
        """Fill d2t / t2d from the ascending target ids of the draft vocabulary."""
        if draft_ids.numel() != self.draft_vocab_size:
            raise ValueError(
                f"{draft_ids.numel()} draft ids for a draft vocabulary of {self.draft_vocab_size}"
            )
        d2t, t2d = vocab_maps(draft_ids.cpu(), self.target_vocab_size)
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    @classmethod
    def from_target(
        cls, target: Bagel, config: DraftHeadConfig, token_counts: torch.Tensor | None = None
    ) -> DraftHead:
        """Copy the target's last N layers (understanding expert), final norm, lm_head rows of the draft
        vocabulary (most frequent ids by `token_counts` [V] plus the special tokens) and, frozen, its
        token embedding; then zero-init if configured. Returned on the target's device and dtype."""
        llm = target.config.llm
        lm = target.language_model
        layers, vocab, hidden = llm.num_hidden_layers, llm.vocab_size, llm.hidden_size
        for name, weight, shape in (
            ("language_model.model.embed_tokens.weight", lm.model.embed_tokens.weight, (vocab, hidden)),
            ("language_model.lm_head.weight", lm.lm_head.weight, (vocab, hidden)),
        ):
            if tuple(weight.shape) != shape:
                raise ValueError(
                    f"target {name} has shape {tuple(weight.shape)}, its config says {shape} "
                    "(vocab_size, hidden_size)"
                )
        if len(lm.model.layers) != layers:
            raise ValueError(f"target has {len(lm.model.layers)} layers, its config says {layers}")
        quantized = [n for n, p in lm.named_parameters() if not p.is_floating_point()]
        if quantized:
            raise ValueError(
                f"cannot copy quantized target weights {quantized[:3]}; build the draft head before "
                "quantizing the target"
            )
        draft_ids = select_draft_vocab(
            vocab, config.draft_vocab_size, token_counts, target.config.special_tokens.to_dict().values()
        )
        head = cls(config, copy.deepcopy(llm), layers, draft_ids.numel())
        head.set_vocabulary(draft_ids)
        with torch.no_grad():
            if not config.eagle3_compatible:
                for j, layer in enumerate(head.layers):
                    layer.load_state_dict(_understanding_state(lm.model.layers[head.base_layer + j]))
            if config.aggregation == "meta_query":
                head.dec.load_state_dict(_understanding_state(lm.model.layers[head.base_layer]))
            head.norm.weight.copy_(lm.model.norm.weight)
            head.lm_head.weight.copy_(lm.lm_head.weight[draft_ids.to(lm.lm_head.weight.device)])
            head.embed_tokens.weight.copy_(lm.model.embed_tokens.weight)
        if config.zero_init:
            head.zero_init_()
        return head.to(device=target.device, dtype=target.dtype)

    def check_target(self, target: Bagel) -> None:
        """Raise, naming each field, if `target` is not the model this head was built for."""
        llm = target.config.llm
        pairs = {
            "hidden_size": (self.hidden_size, llm.hidden_size),
            "vocab_size": (self.target_vocab_size, llm.vocab_size),
            "num_hidden_layers": (self.num_target_layers, llm.num_hidden_layers),
        }
        wrong = {name: pair for name, pair in pairs.items() if pair[0] != pair[1]}
        if wrong:
            detail = ", ".join(f"{name}: draft {d} vs target {t}" for name, (d, t) in wrong.items())
            raise ValueError(f"draft head does not match the target model ({detail})")

    # --- caches -------------------------------------------------------------------------------------
    def _new_kv_cache(self, layers: int, capacity: int, batch_size: int) -> KVCache:
        weight = self.norm.weight
        return KVCache(
            layers,
            batch_size,
            self.llm_config.num_key_value_heads,
            head_dim_of(self.llm_config),
            capacity,
            dtype=weight.dtype,
            device=weight.device,
        )

    def new_fusion_cache(self, capacity: int, batch_size: int = 1) -> KVCache | None:
        """KV cache of meta_query's Dec layer; None for eagle3 aggregation (no sequence mixing in fuse)."""
        if self.config.aggregation != "meta_query":
            return None
        return self._new_kv_cache(1, capacity, batch_size)

    def new_cache(self, capacity: int, batch_size: int = 1) -> KVCache:
        """KV cache of the draft decoder layers."""
        layers = 1 if self.config.eagle3_compatible else self.config.num_layers
        return self._new_kv_cache(layers, capacity, batch_size)

    @staticmethod
    def _prepare_mask(
        cache: KVCache | None, attention_mask: torch.Tensor | None, seq: int
    ) -> torch.Tensor | None:
        """Room in a KVCache and its causal mask (None = causal); another cache type needs a mask."""
        if isinstance(cache, KVCache):
            cache.reserve(seq)
            if attention_mask is None:
                attention_mask = cache.attention_mask(seq)
        elif cache is not None and attention_mask is None:
            raise ValueError(
                f"a {type(cache).__name__} cache (not a KVCache) needs an explicit attention_mask"
            )
        return attention_mask

    # --- the two stages -----------------------------------------------------------------------------
    def fuse(
        self,
        target_hidden_states: Sequence[torch.Tensor],
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draft input features F_in [B, S, H] from the target's L + 1 hidden states [B, S, H].

        `cache` / `attention_mask` serve meta_query's Dec layer (causal over the sequence); eagle3
        aggregation is per token and ignores them."""
        states = target_hidden_states
        expected = self.num_target_layers + 1
        if len(states) != expected:
            raise ValueError(
                f"fuse got {len(states)} hidden states; a {self.num_target_layers}-layer target gives "
                f"{expected} (output_hidden_states=True)"
            )
        if states[0].shape[-1] != self.hidden_size:
            raise ValueError(
                f"target hidden states have size {states[0].shape[-1]}, "
                f"the draft head expects {self.hidden_size}"
            )
        taps = [states[i] for i in self.tap_layers]
        if self.config.aggregation == "eagle3":
            fused = self.fc(torch.cat(taps, dim=-1))
            return fused if self.config.eagle3_compatible else states[self.base_layer] + fused
        attended = self.cross_attn(torch.stack(list(states[1:]), dim=2))
        skips = F.pad(torch.stack(taps, dim=2), (0, 0, 0, self.config.num_queries - len(taps)))
        x = states[self.base_layer] + self.fc1((attended + skips).flatten(2))
        mask = self._prepare_mask(cache, attention_mask, x.shape[1])
        return self.dec(x, self.rotary_emb(x, position_ids), cache, mask)

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step over S positions: (draft-vocabulary logits [B, S, Vd] float32, hidden [B, S, H]).

        Position i pairs the feature of position i with the id of token i + 1 and predicts token i + 2;
        the hidden is the feature the next step takes at the same position."""
        if features.shape[:2] != input_ids.shape:
            raise ValueError(
                f"features {tuple(features.shape)} and input_ids {tuple(input_ids.shape)} disagree on [B, S]"
            )
        embeds = self.embed_tokens(input_ids).to(features.dtype)
        mask = self._prepare_mask(cache, attention_mask, input_ids.shape[1])
        rope = self.rotary_emb(features, position_ids)
        if self.config.eagle3_compatible:
            hidden = self.midlayer(embeds, features, rope, cache, mask)
        else:
            hidden = features + self.fc2(
                torch.cat([self.embed_norm(embeds), self.feature_norm(features)], dim=-1)
            )
            for layer in self.layers:
                hidden = layer(hidden, rope, cache, mask)
        return self.lm_head(self.norm(hidden)).float(), hidden

    def compile(self, **kwargs: Any) -> None:
        """`torch.compile` the draft step AND the feature fusion in place (dynamic shapes unless
        `dynamic` is given), for decoding.

        Why: at batch 1 on a CPU a draft step is a few hundred tiny operations whose dispatch, not
        arithmetic, sets its time, and the draft runs once per drafted token; compiling fuses them (README,
        "Speculative decoding"). Outputs stay lossless, since only the target decides what is kept.
        The first calls of each kind (context prefill, extension, single step, tree step) compile."""
        kwargs.setdefault("dynamic", True)
        super().compile(**kwargs)
        self.fuse = torch.compile(self.fuse, **kwargs)

    # --- id spaces ----------------------------------------------------------------------------------
    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_to_target(draft_ids, self.d2t)

    def to_draft_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids of target ids; -1 where the draft vocabulary lacks the token."""
        return target_to_draft(target_ids, self.t2d)
