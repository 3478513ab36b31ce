"""The unified BAGEL model: one MoT language model reading text, ViT features and VAE latent tokens.

`Bagel` owns the trainable parts under BAGEL's checkpoint names (`language_model`, `vit_model`,
`connector`, `vit_pos_embed`, `latent_pos_embed`, `time_embedder`, `vae2llm`, `llm2vae`). A CFG-distilled
model (`config.guidance_embedders`) adds `text_guidance_embedder.mlp.{0,2}.*` and
`img_guidance_embedder.mlp.{0,2}.*`: the timestep embedder's architecture, embedding the raw guidance
scale, added to the latent tokens like the time embedding (keys BAGEL's own loader does not know). The frozen
autoencoder rides along (it follows `.to()`) but stays out of `state_dict`, exactly as BAGEL keeps it in
its own `ae.safetensors`. Everything runs through `forward_packed`: training packs, context prefill and
the noisy-latent queries of image generation are all packed sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hyperbagel.backbone.autoencoder import BagelAutoencoder, patchify_latents, unpatchify_latents
from hyperbagel.backbone.config import BagelConfig
from hyperbagel.backbone.embeddings import MLPConnector, PositionEmbedding, TimestepEmbedder
from hyperbagel.backbone.flow import add_noise, sample_training_timesteps, velocity_target
from hyperbagel.backbone.kv_cache import KVCache
from hyperbagel.backbone.language_model import Qwen2MoTForCausalLM
from hyperbagel.backbone.packing import PackedSequence, VaeImage
from hyperbagel.backbone.segmented_attention import SampleSegments
from hyperbagel.backbone.vision import SiglipNaViT


@dataclass
class PackedOutput:
    """Final hidden states [rows, seq, hidden] (after the expert norms) and optionally each layer's input."""

    hidden: torch.Tensor
    hidden_states: list[torch.Tensor] | None = None


@dataclass
class TrainingLosses:
    """BAGEL's two losses, each already normalised by its token count (zero when a pack has no such token)."""

    ce: torch.Tensor
    mse: torch.Tensor
    num_ce_tokens: int
    num_mse_tokens: int
    noisy_features: torch.Tensor | None = None


class DifferentiableQuery:
    """A `KVCache` seen by one forward that back-propagates (distillation students query cached contexts).

    `KVCache.write` stores the new keys in place in one buffer shared by all layers, so autograd would find
    the keys it saved for an earlier layer modified by the next layer's write. Here the buffer receives
    detached copies (the cache behaves as usual) and attention gets a fresh tensor: the context span with
    the differentiable new keys spliced in where `write` put them. Activation-checkpoint recomputation
    writes the same values again, which is harmless.
    """

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        span_keys, span_values = self.cache.write(layer, keys.detach(), values.detach())
        return self._splice(span_keys, keys), self._splice(span_values, values)

    def _splice(self, span: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        num_new = new.shape[2]
        lengths = self.cache.lengths
        if all(length == lengths[0] for length in lengths):
            return torch.cat([span[:, :, : lengths[0]], new.to(span.dtype)], dim=2)
        spliced = span.clone()
        for b, length in enumerate(lengths):
            spliced[b, :, length : length + num_new] = new[b]
        return spliced

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


class Bagel(nn.Module):
    """BAGEL's unified model with its exact parameter names."""

    def __init__(self, config: BagelConfig, autoencoder: BagelAutoencoder | None = None) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.language_model = Qwen2MoTForCausalLM(config.llm)
        self.vit_model = SiglipNaViT(config.vit, config.vit_max_num_patch_per_side)
        self.connector = MLPConnector(config.vit.hidden_size, hidden, hidden, act=config.connector_act)
        self.vit_pos_embed = PositionEmbedding(config.vit_max_num_patch_per_side, hidden)
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(config.latent_token_dim, hidden)
        self.llm2vae = nn.Linear(hidden, config.latent_token_dim)
        self.latent_pos_embed = PositionEmbedding(config.max_latent_size, hidden)
        self._init_from_scratch()
        nn.init.zeros_(self.llm2vae.weight)
        nn.init.zeros_(self.llm2vae.bias)
        self.text_guidance_embedder: TimestepEmbedder | None = None
        self.img_guidance_embedder: TimestepEmbedder | None = None
        if config.guidance_embedders:
            self._build_guidance_embedders()
        self._autoencoder = None
        self.autoencoder = autoencoder  # frozen, eval mode, outside the state dict

    # --- BAGEL's checkpoint folder -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> Bagel:
        """Load a folder in BAGEL's layout; see `hyperbagel.backbone.checkpoint.from_pretrained` for options
        (dtype, device, quantize="8bit"/"4bit", strict, load_autoencoder)."""
        from hyperbagel.backbone.checkpoint import from_pretrained  # checkpoint imports this module

        return from_pretrained(folder, **kwargs)

    def save_pretrained(
        self, folder: str | Path, tokenizer: Any = None, dtype: torch.dtype | None = None
    ) -> None:
        """Write BAGEL's folder layout (ema/ae safetensors, configs, tokenizer files)."""
        from hyperbagel.backbone.checkpoint import save_pretrained

        save_pretrained(self, folder, tokenizer=tokenizer, dtype=dtype)

    def _init_from_scratch(self) -> None:
        """Transformer-standard init (N(0, 0.02) weights, zero biases) for the language model's and the ViT
        encoder's projections and for the token and ViT position tables. PyTorch's defaults (N(0, 1) tables)
        let the ViT position table drown the patch content of a from-scratch ViT. The input projections
        (`patch_embedding`, `connector`, `vae2llm`, `time_embedder`) keep PyTorch's fan-in scaled init so
        image and latent content enters at the scale of the fixed 2-D position tables. A checkpoint
        overrides all of it."""
        std = 0.02
        for name, module in self.named_modules():
            if name.startswith(("connector", "vae2llm", "time_embedder")) or name.endswith("patch_embedding"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)

    # --- guidance embedders (CFG distillation) -------------------------------------------------------
    @property
    def has_guidance_embedders(self) -> bool:
        """Whether this model takes guidance scales as input (one pass per step) instead of running CFG."""
        return self.text_guidance_embedder is not None

    def _build_guidance_embedders(self) -> None:
        """Zero-initialised final layers: the student starts exactly as the teacher's conditional branch."""
        hidden = self.config.hidden_size
        self.text_guidance_embedder = TimestepEmbedder(hidden)
        self.img_guidance_embedder = TimestepEmbedder(hidden)
        for embedder in (self.text_guidance_embedder, self.img_guidance_embedder):
            nn.init.zeros_(embedder.mlp[2].weight)
            nn.init.zeros_(embedder.mlp[2].bias)

    def add_guidance_embedders(self) -> Bagel:
        """Turn a CFG teacher into the CFG-distillation student (no-op when it already is one)."""
        if self.has_guidance_embedders:
            return self
        device, dtype = self.device, self.dtype
        self.config = self.config.copy()  # the caller's config object may be shared with data modules
        self.config.guidance_embedders = True
        self._build_guidance_embedders()
        self.text_guidance_embedder.to(device, dtype)
        self.img_guidance_embedder.to(device, dtype)
        return self

    # --- the autoencoder, kept out of the state dict -------------------------------------------------
    def __setattr__(self, name: str, value: object) -> None:
        if name in ("_autoencoder", "autoencoder"):  # not a submodule, never in state_dict; the
            object.__setattr__(self, name, value)  # public name goes through the property setter
        else:
            super().__setattr__(name, value)

    @property
    def autoencoder(self) -> BagelAutoencoder:
        if self._autoencoder is None:
            raise RuntimeError(
                "this Bagel has no autoencoder attached; pass one or load with from_pretrained"
            )
        return self._autoencoder

    @autoencoder.setter
    def autoencoder(self, value: BagelAutoencoder | None) -> None:
        if value is not None:
            value.requires_grad_(False).eval()
        self._autoencoder = value

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Bagel:
        """Move / cast the unregistered autoencoder along with the model (`.to()`, `.half()`, ...)."""
        super()._apply(fn, recurse)
        if self._autoencoder is not None:
            self._autoencoder._apply(fn, recurse)
        return self

    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    # --- latents ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_latent_tokens(self, images: list[VaeImage]) -> list[torch.Tensor]:
        """Clean latent tokens [h*w, token_dim] of each VAE image (same-sized pixels encoded together)."""
        tokens: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            if image.latents is not None:
                latents = image.latents.to(self.device, self.dtype)[None]
                tokens[i] = patchify_latents(latents, self.config.latent_patch_size)[0]
            else:
                by_size.setdefault(tuple(image.pixels.shape), []).append(i)
        for indices in by_size.values():
            pixels = torch.stack([images[i].pixels for i in indices]).to(self.device)
            latents = self.autoencoder.encode(pixels).to(self.dtype)
            for i, t in zip(indices, patchify_latents(latents, self.config.latent_patch_size)):
                tokens[i] = t
        return tokens  # type: ignore[return-value]

    def tokens_to_latents(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, h*w, D] latent tokens -> [B, C, 2h, 2w] latents."""
        return unpatchify_latents(
            tokens, grid[0], grid[1], self.config.latent_patch_size, self.config.latent_channels
        )

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, h*w, D] latent tokens -> images [B, 3, H, W] in [-1, 1]."""
        return self.autoencoder.decode(self.tokens_to_latents(tokens, grid))

    # --- embedding and forward ----------------------------------------------------------------------
    def embed_latents(
        self,
        tokens: torch.Tensor,
        timesteps: torch.Tensor,
        position_ids: torch.Tensor,
        text_scales: torch.Tensor | None = None,
        img_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`vae2llm(x_t) + time_embed(t) + latent_pos_embed(pos)` for [N, D] tokens with per-token t [N].

        A guidance-distilled model adds `text_guidance_embedder(s_text) + img_guidance_embedder(s_img)`
        when per-token scales [N] are given (both or neither); without them (e.g. clean context latents)
        it embeds exactly as its teacher does.
        """
        embeds = (
            self.vae2llm(tokens.to(self.dtype))
            + self.time_embedder(timesteps)
            + self.latent_pos_embed(position_ids)
        )
        if text_scales is None and img_scales is None:
            return embeds
        if text_scales is None or img_scales is None:
            raise ValueError("give both text_scales and img_scales (one per latent token) or neither")
        if not self.has_guidance_embedders:
            raise ValueError(
                "guidance scales were given but this Bagel has no guidance embedders "
                "(config.guidance_embedders is False); call add_guidance_embedders() or sample with CFG"
            )
        for name, scales in (("text_scales", text_scales), ("img_scales", img_scales)):
            if tuple(scales.shape) != (tokens.shape[0],):
                raise ValueError(
                    f"{name} must hold one scale per latent token, shape ({tokens.shape[0]},), "
                    f"got {tuple(scales.shape)}"
                )
        text = self.text_guidance_embedder(text_scales.to(self.device, torch.float32))
        img = self.img_guidance_embedder(img_scales.to(self.device, torch.float32))
        return embeds + text + img

    def embed_packed(
        self,
        packed: PackedSequence,
        vae_tokens: torch.Tensor | None = None,
        vae_timesteps: torch.Tensor | None = None,
        text_scales: torch.Tensor | None = None,
        img_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[rows, seq, hidden] input embeddings: text tokens, ViT features, latent tokens at their indexes
        (guidance scales, when given, per VAE token as in `embed_latents`)."""
        rows, seq = packed.shape
        embeds = self.language_model.model.embed_tokens(packed.input_ids).reshape(rows * seq, -1)
        if packed.vit_images:
            features, _, vit_positions = self.vit_model.encode_images(
                [im.to(self.dtype) for im in packed.vit_images]
            )
            vit = self.connector(features) + self.vit_pos_embed(vit_positions)
            embeds = embeds.index_copy(0, packed.vit_index, vit.to(embeds.dtype))
        if packed.vae_images:
            if vae_tokens is None or vae_timesteps is None:
                raise ValueError("a pack with VAE images needs vae_tokens and vae_timesteps")
            latent = self.embed_latents(
                vae_tokens, vae_timesteps, packed.vae_position_ids, text_scales, img_scales
            )
            embeds = embeds.index_copy(0, packed.vae_index, latent.to(embeds.dtype))
        return embeds.reshape(rows, seq, -1)

    def forward_packed(
        self,
        packed: PackedSequence,
        vae_tokens: torch.Tensor | None = None,
        vae_timesteps: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        text_scales: torch.Tensor | None = None,
        img_scales: torch.Tensor | None = None,
    ) -> PackedOutput:
        """Run a pack through the model; with a cache its tokens are written past the context, uncommitted.

        `text_scales` / `img_scales`: per-VAE-token guidance scales of a guidance-distilled model.
        With gradients enabled, the cache is queried through `DifferentiableQuery` so that back-propagation
        through a cached context works.
        """
        if packed.input_ids.device != self.device:
            packed = packed.to(self.device)
        embeds = self.embed_packed(packed, vae_tokens, vae_timesteps, text_scales, img_scales)
        block_mask = packed.block_mask()
        if cache is None:
            mask = SampleSegments.from_block_mask(block_mask, packed.sample_ids)
        else:
            cache.reserve(packed.shape[1])
            mask = cache.attention_mask(
                packed.shape[1], block_mask=block_mask, valid_new=packed.valid_lengths
            )
            if torch.is_grad_enabled():
                cache = DifferentiableQuery(cache)
        out = self.language_model.model(
            embeds,
            packed.position_ids,
            attention_mask=mask,
            gen_mask=packed.gen_mask,
            cache=cache,
            output_hidden_states=output_hidden_states,
        )
        return PackedOutput(hidden=out.last_hidden_state, hidden_states=out.hidden_states)

    def forward_tokens(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        position_ids: torch.Tensor | None = None,
        block_mask: torch.Tensor | None = None,
        commit: bool = True,
        output_hidden_states: bool = False,
    ) -> PackedOutput:
        """Append k text tokens [B, k] to a cache (decoding, or verifying a draft in one forward).

        Positions default to each row's RoPE cursor + 0..k-1 and the mask to causal; a tree draft passes
        its own depths as positions and its ancestor mask as `block_mask` [k, k] or [B, k, k].
        """
        k = input_ids.shape[1]
        if position_ids is None:
            cursor = torch.tensor(cache.rope_cursor, device=input_ids.device)
            position_ids = cursor[:, None] + torch.arange(k, device=input_ids.device)[None]
        cache.reserve(k)
        mask = cache.attention_mask(k, block_mask=block_mask)
        embeds = self.language_model.model.embed_tokens(input_ids)
        out = self.language_model.model(
            embeds, position_ids, attention_mask=mask, cache=cache, output_hidden_states=output_hidden_states
        )
        if commit:
            cache.commit(k, k)
        return PackedOutput(hidden=out.last_hidden_state, hidden_states=out.hidden_states)

    def gather(self, hidden: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1])[flat_index]

    def text_logits(self, output: PackedOutput, packed: PackedSequence) -> torch.Tensor:
        """Logits [num CE tokens, vocab] at the positions that carry a text label."""
        return self.language_model.lm_head(self.gather(output.hidden, packed.ce_index))

    def velocity(self, output: PackedOutput, packed: PackedSequence) -> torch.Tensor:
        """Predicted velocity [num VAE tokens, D] at every latent position (meaningful for noisy ones)."""
        return self.llm2vae(self.gather(output.hidden, packed.vae_index))

    def training_losses(
        self,
        packed: PackedSequence,
        timestep_shift: float = 1.0,
        generator: torch.Generator | None = None,
        uniform_time_fraction: float = 0.0,
        feature_layer: int | None = None,
    ) -> TrainingLosses:
        """BAGEL's training objective on a pack: next-token CE on text blocks with loss, velocity MSE on
        noisy latents drawn at logit-normal shifted times, `uniform_time_fraction` of them uniform instead
        (see `sample_training_timesteps`); clean latents enter at t = 0.

        `feature_layer` k also returns the input of decoder layer k at every noisy latent token (in pack
        order), for an auxiliary loss on intermediate features such as representation alignment."""
        zero = self.vae2llm.weight.sum() * 0.0  # keeps an empty loss in the graph (DDP sees every parameter)
        vae_tokens = timesteps = noisy = target = None
        if packed.vae_images:
            clean = torch.cat(self.encode_latent_tokens(packed.vae_images))
            token_image = packed.vae_token_image.to(self.device)
            noisy = packed.vae_noisy.to(self.device)[token_image]
            image_t = sample_training_timesteps(
                len(packed.vae_images),
                timestep_shift,
                generator,
                device=self.device,
                uniform_fraction=uniform_time_fraction,
            )
            timesteps = torch.where(noisy, image_t[token_image], torch.zeros_like(image_t[token_image]))
            noise = torch.randn(clean.shape, generator=generator, device=self.device, dtype=clean.dtype)
            vae_tokens = torch.where(noisy[:, None], add_noise(clean, noise, timesteps), clean)
            target = velocity_target(clean, noise)
        with_features = feature_layer is not None
        output = self.forward_packed(packed, vae_tokens, timesteps, output_hidden_states=with_features)
        ce = zero
        if packed.ce_index.numel():
            logits = self.text_logits(output, packed).float()
            ce = F.cross_entropy(logits, packed.ce_labels.to(logits.device))
        mse, num_noisy, noisy_features = zero, 0, None
        if noisy is not None and bool(noisy.any()):
            num_noisy = int(noisy.sum())
            error = self.velocity(output, packed)[noisy].float() - target[noisy].float()
            mse = error.pow(2).mean(dim=-1).mean()
            if feature_layer is not None:
                noisy_features = self.gather(output.hidden_states[feature_layer], packed.vae_index)[noisy]
        return TrainingLosses(
            ce=ce,
            mse=mse,
            num_ce_tokens=packed.ce_index.numel(),
            num_mse_tokens=num_noisy,
            noisy_features=noisy_features,
        )
