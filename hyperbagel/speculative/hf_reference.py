"""The understanding expert of a `Bagel` as transformers' `Qwen3ForCausalLM`, and HF `generate` on our
image contexts.

Why: the speculative benchmark compares our decoders with what a user could run instead, Hugging Face
`generate` (plain greedy and prompt-lookup decoding), on the *same* weights. BAGEL's understanding path is
Qwen2 with QK-norm, which is Qwen3's layer with biased q/k/v (`attention_bias=True` also adds an o_proj
bias, held at zero). The parameters are shared with the Bagel, not copied, and the generation expert is
left out.

Images: transformers cannot encode BAGEL's ViT / VAE blocks, so our model prefills the context
(`prefill_packed`) and its cache row becomes a `DynamicCache` (both caches hold post-RoPE keys). BAGEL gives
a whole image block one RoPE id, so a row of n cached tokens has a RoPE cursor below n and HF's default
positions (the cache length) would be wrong. transformers 5 `generate` takes explicit `position_ids`
covering the whole sequence (cache + new tokens) and extends them by one per generated token (also in
assisted / prompt-lookup decoding), so the context's own RoPE ids followed by the cursor for
`<|im_start|>` make HF decode exactly like `generate_text`. The context's token ids are passed too (image
tokens are id 0); prompt lookup searches them for n-gram matches, and an explicit all-ones attention mask
keeps `generate` from masking those ids as padding.

One gap of transformers (5.24) needs a minimal subclass: plain `generate` slices the inputs already in a
given cache away, but assisted decoding (prompt lookup) feeds its whole first candidate sequence, cached
context included, so the context would be appended to the cache a second time.
`PrefilledQwen3ForCausalLM` slices there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache, DynamicCache, GenerationConfig, Qwen2Config, Qwen3Config, Qwen3ForCausalLM

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.inference import prefill_packed
from hyperbagel.backbone.kv_cache import KVCache
from hyperbagel.backbone.language_model import head_dim_of
from hyperbagel.backbone.packing import Sample


def qwen3_config(llm: Qwen2Config, attn_implementation: str = "sdpa") -> Qwen3Config:
    """Qwen3's config for BAGEL's understanding expert (biased attention, untied head)."""
    config = Qwen3Config(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_hidden_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads,
        head_dim=head_dim_of(llm),
        hidden_act=llm.hidden_act,
        rope_parameters=dict(llm.rope_parameters),
        rms_norm_eps=llm.rms_norm_eps,
        max_position_embeddings=llm.max_position_embeddings,
        attention_bias=True,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    return config


class PrefilledQwen3ForCausalLM(Qwen3ForCausalLM):
    """Qwen3ForCausalLM whose `generate` continues a pre-filled cache in every decoding mode.

    Contract (what `HFReference` passes): `input_ids` always hold the whole sequence, the cached tokens
    included, so the tokens to run are those past the cache's length."""

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The base method (whose signature `generate` validates its kwargs against), with the cached
        tokens sliced away where the base would run them again."""
        past = cache.get_seq_length() if cache is not None else 0
        if next_sequence_length is None and 0 < past < input_ids.shape[1]:
            next_sequence_length = input_ids.shape[1] - past
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length,
            cache,
            attention_mask,
            inputs_embeds,
            is_first_iteration,
            **kwargs,
        )


def understanding_causal_lm(model: Bagel, attn_implementation: str = "sdpa") -> PrefilledQwen3ForCausalLM:
    """A Qwen3ForCausalLM whose parameters ARE the Bagel's understanding expert (shared storage).

    Built on the meta device and filled by assignment, so no weight is allocated twice; only the zero
    o_proj biases and the RoPE tables are new. Training either model changes both."""
    lm = model.language_model
    config = qwen3_config(lm.config, attn_implementation)
    with torch.device("meta"):
        reference = PrefilledQwen3ForCausalLM(config)
    ours = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for key, meta in reference.state_dict().items():
        if key.endswith("self_attn.o_proj.bias"):
            state[key] = torch.zeros(meta.shape, dtype=model.dtype, device=model.device)
            continue
        name = f"language_model.{key}"  # the understanding expert's names carry no suffix
        if name not in ours:
            raise ValueError(f"the Bagel has no parameter {name!r} for Qwen3 key {key!r}")
        if tuple(ours[name].shape) != tuple(meta.shape):
            raise ValueError(
                f"{name} has shape {tuple(ours[name].shape)}, Qwen3's {key} needs {tuple(meta.shape)}"
            )
        state[key] = ours[name]
    reference.load_state_dict(state, strict=True, assign=True)
    reference.model.rotary_emb = type(reference.model.rotary_emb)(config).to(model.device)
    left = [name for name, t in [*reference.named_parameters(), *reference.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    reference.generation_config = GenerationConfig()
    return reference.eval()


def to_dynamic_cache(cache: KVCache, row: int = 0) -> DynamicCache:
    """One committed row of our cache as a transformers cache of batch 1 (the tensors are copied)."""
    length = cache.lengths[row]
    layers = [
        (
            cache.keys[layer, row : row + 1, :, :length].clone(),
            cache.values[layer, row : row + 1, :, :length].clone(),
        )
        for layer in range(cache.keys.shape[0])
    ]
    return DynamicCache(layers)


@dataclass
class HFContext:
    """What HF `generate` continues from: the cached context and the full-length ids and RoPE ids
    (context, then `<|im_start|>`), all batch 1."""

    cache: DynamicCache
    input_ids: torch.Tensor  # [1, n + 1]
    position_ids: torch.Tensor  # [1, n + 1]


class HFReference:
    """HF `generate` over a Bagel's understanding expert, answering like `generate_text` (batch 1)."""

    def __init__(self, model: Bagel, attn_implementation: str = "sdpa") -> None:
        self.model = model.eval()
        self.lm = understanding_causal_lm(model, attn_implementation)

    @torch.no_grad()
    def prepare(self, sample: Sample) -> HFContext:
        """Prefill `sample` with our model (images need it) and hand the cache row to transformers."""
        cache, packed, _ = prefill_packed(self.model, [sample], capacity_margin=0)
        length = packed.valid_lengths[0]
        if length == 0:
            raise ValueError("HF generate needs a non-empty context (the sample has no blocks)")
        device = self.model.device
        im_start = self.model.config.special_tokens.im_start
        input_ids = torch.cat([packed.input_ids[0, :length], torch.tensor([im_start])])[None]
        cursor = torch.tensor([cache.rope_cursor[0]])
        position_ids = torch.cat([packed.position_ids[0, :length], cursor])[None]
        return HFContext(to_dynamic_cache(cache), input_ids.to(device), position_ids.to(device))

    @torch.no_grad()
    def generate(self, context: HFContext, max_new_tokens: int = 256, **generate_kwargs: Any) -> list[int]:
        """Greedy answer ids without the markers, stopping at `<|im_end|>` (as `generate_text` returns
        them); `generate_kwargs` go to `generate` (e.g. `prompt_lookup_num_tokens=10`). Consumes the
        context's cache."""
        im_end = self.model.config.special_tokens.im_end
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=im_end,
            pad_token_id=im_end,
            **generate_kwargs,
        )
        out = self.lm.generate(
            context.input_ids,
            attention_mask=torch.ones_like(context.input_ids),
            position_ids=context.position_ids,
            cache=context.cache,
            generation_config=config,
        )
        answer = out[0, context.input_ids.shape[1] :].tolist()
        return answer[: answer.index(im_end)] if im_end in answer else answer

    def answer(self, sample: Sample, max_new_tokens: int = 256, **generate_kwargs: Any) -> list[int]:
        """`prepare` then `generate`."""
        return self.generate(self.prepare(sample), max_new_tokens, **generate_kwargs)
