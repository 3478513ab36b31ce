"""Inference primitives: KV-cached contexts, text generation, and image generation / editing with CFG.

Everything works on batches. A context is a KV cache with one row per sample, prefilled from packed
blocks in one forward (VAE block then ViT block per input image, as BAGEL builds it). Image generation
stacks the three CFG contexts of every prompt as rows of ONE cache, [conditional | no text | no image],
so each sampling step is a single batched forward; outside the CFG interval only the conditional rows run.
`sequential_cfg` runs the passes one after another instead, as BAGEL's own inferencer does (a forward per
pass, each holding one context's rows: the cost per pass that BAGEL's NFE counts assume).
The pieces (`prefill`, `ImageContexts.velocity`, `sample_latent_tokens`) are public because the
distillation stages drive the same sampler with their own step grids, guidance and callbacks.

A CFG-distilled model (`Bagel.has_guidance_embedders`) samples with the same calls: its velocity is ONE
conditional pass with the scales the teacher's CFG would apply at t embedded (`guidance_scales`), so no
unconditional context is prefilled and each step costs one model evaluation (`sampling_nfe`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from hyperbagel.backbone.autoencoder import patchify_latents, tensor_to_pil
from hyperbagel.backbone.bagel import Bagel, PackedOutput
from hyperbagel.backbone.config import BagelConfig
from hyperbagel.backbone.flow import (
    CFGConfig,
    StepCallback,
    TimeLike,
    cfg_combine,
    count_nfe,
    sampling_schedule,
    solve,
)
from hyperbagel.backbone.image_transforms import vae_input, vit_input
from hyperbagel.backbone.kv_cache import KVCache
from hyperbagel.backbone.packing import PackedSequence, Sample, TextBlock, VaeImage, VitImage, pack


@torch.no_grad()
def prefill(model: Bagel, samples: Sequence[Sample], capacity_margin: int = 64) -> KVCache:
    """A cache with one committed context row per sample (all blocks clean; empty samples allowed)."""
    return prefill_packed(model, samples, capacity_margin)[0]


@torch.no_grad()
def prefill_packed(
    model: Bagel, samples: Sequence[Sample], capacity_margin: int = 64, output_hidden_states: bool = False
) -> tuple[KVCache, PackedSequence, PackedOutput | None]:
    """`prefill` that also returns the pack and the model's output over it (None when every sample is
    empty); speculative decoding starts its draft head from the context's per-layer hidden states."""
    packed = pack([[sample] for sample in samples], model.config)
    cache = model.language_model.new_cache(
        batch_size=len(samples), capacity=packed.shape[1] + capacity_margin
    )
    if max(packed.valid_lengths) == 0:
        return cache, packed, None
    tokens = timesteps = None
    if packed.vae_images:
        tokens = torch.cat(model.encode_latent_tokens(packed.vae_images))
        timesteps = torch.zeros(tokens.shape[0], device=model.device)
    output = model.forward_packed(
        packed, tokens, timesteps, cache=cache, output_hidden_states=output_hidden_states
    )
    cache.commit(packed.valid_lengths, packed.rope_advance)
    return cache, packed, output


def _choose_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Greedy when temperature == 0, else temperature / nucleus sampling through transformers' warpers."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = TemperatureLogitsWarper(temperature)(None, logits.float())
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def generate_text(
    model: Bagel,
    cache: KVCache,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Decode one answer per cache row: starts the block with `<|im_start|>`, stops each row at `<|im_end|>`.

    Returns the generated ids per row, without the markers. The cache ends up holding the answers.
    """
    specials = model.config.special_tokens
    rows = cache.batch_size
    tokens = torch.full((rows, 1), specials.im_start, dtype=torch.long, device=model.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=model.device)
    answers: list[list[int]] = [[] for _ in range(rows)]
    for _ in range(max_new_tokens):
        hidden = model.forward_tokens(tokens, cache).hidden[:, -1]
        chosen = _choose_tokens(model.language_model.lm_head(hidden), temperature, top_p, generator)
        chosen = torch.where(finished, torch.full_like(chosen, specials.im_end), chosen)
        for row, token in enumerate(chosen.tolist()):
            if not finished[row] and token != specials.im_end:
                answers[row].append(token)
        finished |= chosen == specials.im_end
        if bool(finished.all()):
            break
        tokens = chosen[:, None]
    return answers


Guidance: TypeAlias = CFGConfig | Sequence[CFGConfig]
PerSample: TypeAlias = float | torch.Tensor | None


def guidance_scales(cfg: CFGConfig, t: TimeLike) -> tuple[float, float]:
    """(text, image) scales BAGEL's CFG applies at t: a scale where its pass would run, else 1 (as outside
    the interval, where the teacher runs the conditional pass alone). What a distilled student embeds."""
    if not cfg.needs_text_uncond(t):
        return 1.0, 1.0
    return cfg.text_scale, cfg.img_scale if cfg.needs_img_uncond(t) else 1.0


def sampling_nfe(model: Bagel, timesteps: torch.Tensor | Sequence[float], cfg: CFGConfig) -> int:
    """Model evaluations per image of `sample_latent_tokens` with this model: one per step for a
    guidance-distilled model, `count_nfe` (CFG passes included) otherwise."""
    if model.has_guidance_embedders:
        return len(timesteps) - 1
    return count_nfe(timesteps, cfg)


@dataclass
class ImageContexts:
    """The stacked CFG contexts of B prompts and the noisy-block packs that query them."""

    model: Bagel
    cache: KVCache
    batch_size: int
    grid: tuple[int, int]
    has_text_uncond: bool
    has_img_uncond: bool
    sequential_cfg: bool = False
    _packs: dict[tuple[int, int], PackedSequence] = field(default_factory=dict, init=False, repr=False)

    def _pack(self, first_row: int, rows: int) -> PackedSequence:
        """The noisy-block pack querying cache rows [first_row, first_row + rows), built once."""
        if (first_row, rows) not in self._packs:
            h, w = self.grid
            patch = self.model.config.latent_patch_size
            placeholder = VaeImage(latents=torch.zeros(1, h * patch, w * patch), noisy=True)
            rope_start = self.cache.rope_cursor[first_row : first_row + rows]
            self._packs[first_row, rows] = pack(
                [[[placeholder]]] * rows, self.model.config, rope_start=rope_start
            )
        return self._packs[first_row, rows]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def for_model(self, model: Bagel) -> ImageContexts:
        """The same prefilled contexts queried by another model sharing the frozen weights that filled
        them (a student, or a side model held as a separate copy). A shallow copy: the cache and the
        query packs (which depend on the shared config only) are reused, not rebuilt per call."""
        if model is self.model:
            return self
        view = copy.copy(self)
        view.model = model
        return view

    def _per_token(self, value: float | torch.Tensor, rows: int) -> torch.Tensor:
        """A scalar or per-row [rows] value repeated for every latent token of its row: [rows * N]."""
        value = torch.as_tensor(value, dtype=torch.float32).to(self.model.device, torch.float32)
        if value.ndim == 0:
            return value.expand(rows * self.num_tokens)
        if tuple(value.shape) != (rows,):
            raise ValueError(f"expected a scalar or one value per row ({rows},), got {tuple(value.shape)}")
        return value.repeat_interleave(self.num_tokens)

    def raw_velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        rows: int,
        text_scales: PerSample = None,
        img_scales: PerSample = None,
        first_row: int = 0,
    ) -> torch.Tensor:
        """Velocity [rows, N, D] of one pass of tokens x [rows, N, D] against cache rows [first_row,
        first_row + rows) (by default the first `rows`).

        t is one time or one per row; a guidance-distilled model also takes its guidance scales (scalars or
        one per row). Without scales the pass is unguided (the conditional or an unconditional branch).
        """
        whole = first_row == 0 and rows == self.cache.batch_size
        cache = self.cache if whole else self.cache.narrow(first_row, rows)
        packed = self._pack(first_row, rows)
        scales = {}
        if text_scales is not None or img_scales is not None:
            scales = {
                "text_scales": self._per_token(1.0 if text_scales is None else text_scales, rows),
                "img_scales": self._per_token(1.0 if img_scales is None else img_scales, rows),
            }
        output = self.model.forward_packed(
            packed,
            x.reshape(rows * self.num_tokens, -1),
            self._per_token(t, rows),
            cache=cache,
            **scales,
        )
        return self.model.velocity(output, packed).reshape(rows, self.num_tokens, -1).to(x.dtype)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cfg: Guidance) -> torch.Tensor:
        """BAGEL's guided velocity for x [B, N, D]; one batched forward over the contexts CFG needs at t.

        t may be one time (sampling) or one per sample [B], and `cfg` one setting or one per sample
        (distillation targets): each sample is then guided exactly as the sampler would guide it alone.
        A guidance-distilled model runs one conditional pass with `guidance_scales` embedded instead.
        """
        if self.model.has_guidance_embedders:
            return self._distilled_velocity(x, t, cfg)
        if isinstance(cfg, CFGConfig) and torch.as_tensor(t).ndim == 0:
            use_text = self.has_text_uncond and cfg.needs_text_uncond(t)
            if not use_text:
                return self.raw_velocity(x, t, self.batch_size)
            use_img = self.has_img_uncond and cfg.needs_img_uncond(t)
            v = self._cfg_passes(x, t, 3 if use_img else 2)
            return cfg_combine(v[0], v[1], v[2] if use_img else None, cfg, t)
        return self._per_sample_velocity(x, t, cfg)

    def _cfg_passes(self, x: torch.Tensor, t: torch.Tensor, copies: int) -> tuple[torch.Tensor, ...]:
        """Unguided velocities of x [B, N, D] against the first `copies` contexts (conditional, no text,
        no image): one batched forward, or one forward per context with `sequential_cfg`."""
        batch = self.batch_size
        if self.sequential_cfg:
            return tuple(self.raw_velocity(x, t, batch, first_row=k * batch) for k in range(copies))
        times = t.repeat(copies) if torch.as_tensor(t).ndim else t
        return self.raw_velocity(x.repeat(copies, 1, 1), times, copies * batch).chunk(copies)

    def _per_sample(self, t: torch.Tensor, cfg: Guidance) -> tuple[torch.Tensor, list[CFGConfig]]:
        """t as [B] float32 and cfg as B settings."""
        batch = self.batch_size
        times = torch.as_tensor(t, dtype=torch.float32)
        times = times.expand(batch) if times.ndim == 0 else times
        cfgs = [cfg] * batch if isinstance(cfg, CFGConfig) else list(cfg)
        if tuple(times.shape) != (batch,) or len(cfgs) != batch:
            raise ValueError(
                f"need one time and one CFG setting per sample ({batch}), got times of shape "
                f"{tuple(times.shape)} and {len(cfgs)} settings"
            )
        return times, cfgs

    def _per_sample_velocity(self, x: torch.Tensor, t: torch.Tensor, cfg: Guidance) -> torch.Tensor:
        """The teacher's guided velocity with a time and a CFG setting per sample: the passes any sample
        needs run batched; each sample is combined by `cfg_combine` with its own setting and time."""
        times, cfgs = self._per_sample(t, cfg)
        batch = self.batch_size
        use_text = [self.has_text_uncond and c.needs_text_uncond(ti) for c, ti in zip(cfgs, times)]
        if not any(use_text):
            return self.raw_velocity(x, times, batch)
        use_img = [
            text and self.has_img_uncond and c.needs_img_uncond(ti)
            for text, c, ti in zip(use_text, cfgs, times)
        ]
        v = self._cfg_passes(x, times, 3 if any(use_img) else 2)
        guided = []
        for i, (c, ti) in enumerate(zip(cfgs, times)):
            one = [part[i : i + 1] for part in v]
            if not use_text[i]:
                guided.append(one[0])
                continue
            guided.append(cfg_combine(one[0], one[1], one[2] if use_img[i] else None, c, ti))
        return torch.cat(guided)

    def _distilled_velocity(self, x: torch.Tensor, t: torch.Tensor, cfg: Guidance) -> torch.Tensor:
        """One conditional pass with the scales CFG would apply at t (per sample when given per sample)."""
        if isinstance(cfg, CFGConfig) and torch.as_tensor(t).ndim == 0:
            text, img = guidance_scales(cfg, t)
            return self.raw_velocity(x, t, self.batch_size, text, img)
        times, cfgs = self._per_sample(t, cfg)
        scales = torch.tensor([guidance_scales(c, ti) for c, ti in zip(cfgs, times)], dtype=torch.float32)
        return self.raw_velocity(x, times, self.batch_size, scales[:, 0], scales[:, 1])


def build_image_contexts(
    model: Bagel,
    conditional: Sequence[Sample],
    no_text: Sequence[Sample] | None,
    no_image: Sequence[Sample] | None,
    grid: tuple[int, int],
    sequential_cfg: bool = False,
) -> ImageContexts:
    """Prefill [conditional | no_text | no_image] contexts (the unconditional ones only when given);
    `sequential_cfg` queries them one forward per context instead of one batched forward."""
    rows = list(conditional) + list(no_text or []) + list(no_image or [])
    return ImageContexts(
        model=model,
        cache=prefill(model, rows, capacity_margin=grid[0] * grid[1] + 2),
        batch_size=len(conditional),
        grid=grid,
        has_text_uncond=no_text is not None,
        has_img_uncond=no_image is not None,
        sequential_cfg=sequential_cfg,
    )


def t2i_context_samples(prompt_ids: Sequence[Sequence[int]]) -> tuple[list[Sample], list[Sample]]:
    """(conditional, no text) contexts of text-to-image prompts: the prompt's text block, and nothing."""
    return [[TextBlock(list(ids))] for ids in prompt_ids], [[] for _ in prompt_ids]


def edit_context_samples(
    images: Sequence[Image.Image], instruction_ids: Sequence[Sequence[int]], config: BagelConfig
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(conditional, no text, no image) contexts of edits, as BAGEL builds them: the source as a clean VAE
    block then a ViT block, then the instruction; without the instruction; the instruction alone."""
    if len(images) != len(instruction_ids):
        raise ValueError(f"got {len(images)} images but {len(instruction_ids)} instructions")
    sources = [vae_input(image, config) for image in images]
    if len({tuple(s.shape) for s in sources}) != 1:
        raise ValueError("images of one edit batch must share a size after resizing; batch them by size")
    image_blocks: list[Sample] = [
        [VaeImage(pixels=s), VitImage(vit_input(im, config))] for s, im in zip(sources, images)
    ]
    texts = [TextBlock(list(ids)) for ids in instruction_ids]
    conditional = [[*blocks, text] for blocks, text in zip(image_blocks, texts)]
    return conditional, image_blocks, [[text] for text in texts]


def initial_noise(
    model: Bagel, batch: int, grid: tuple[int, int], seed: int | Sequence[int] | None = None
) -> torch.Tensor:
    """Gaussian latent tokens [B, N, D]; drawn in latent space on the CPU from per-sample seeds
    (`seed + i`), so a sample's noise does not depend on the device or on the other prompts."""
    patch, channels = model.config.latent_patch_size, model.config.latent_channels
    seeds = (
        list(seed)
        if isinstance(seed, Sequence)
        else [None if seed is None else seed + i for i in range(batch)]
    )
    noise = []
    for s in seeds:
        generator = torch.Generator().manual_seed(s) if s is not None else None
        noise.append(torch.randn(1, channels, grid[0] * patch, grid[1] * patch, generator=generator))
    return patchify_latents(torch.cat(noise), patch).to(model.device, model.dtype)


@torch.no_grad()
def sample_latent_tokens(
    contexts: ImageContexts,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    cfg: Guidance,
    callback: StepCallback | None = None,
    solver: str = "euler",
) -> torch.Tensor:
    """Integrate from `noise` [B, N, D] along `timesteps` (1 -> 0) with guidance (one setting, or one per
    sample) and the named solver (BAGEL's Euler, or "unipc"; see `flow.solve`); returns the final tokens."""
    return solve(solver, lambda x, t, i: contexts.velocity(x, t, cfg), noise, timesteps, callback)


def default_t2i_cfg() -> CFGConfig:
    """BAGEL's text-to-image defaults: text scale 4, interval (0.4, 1], global renorm."""
    return CFGConfig(text_scale=4.0, img_scale=1.0, interval=(0.4, 1.0), renorm_type="global")


def default_edit_cfg() -> CFGConfig:
    """BAGEL's editing defaults: text scale 4, image scale 2, interval (0, 1], text-channel renorm."""
    return CFGConfig(text_scale=4.0, img_scale=2.0, interval=(0.0, 1.0), renorm_type="text_channel")


class BagelInferencer:
    """Batched chat, text-to-image and editing over a `Bagel` and its tokenizer (PIL in, PIL / str out).

    `sequential_cfg` runs each CFG pass as its own forward, as BAGEL's inferencer does, instead of one
    batched forward per step (same images; each forward holds a third or half of the rows, and the steps
    take longer where a forward's cost is mostly fixed per call, as on a CPU at demo size).
    """

    def __init__(
        self, model: Bagel, tokenizer: PreTrainedTokenizerBase, sequential_cfg: bool = False
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.sequential_cfg = sequential_cfg

    @property
    def config(self) -> BagelConfig:
        return self.model.config

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(
        self,
        prompts: str | Sequence[str],
        images: Sequence[Image.Image | Sequence[Image.Image]] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[str]:
        """Answer each prompt about its image(s) (ViT blocks before the question, as BAGEL does)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = images if images is not None else [[] for _ in prompts]
        samples = []
        for prompt, pictures in zip(prompts, images, strict=True):
            pictures = [pictures] if isinstance(pictures, Image.Image) else list(pictures)
            blocks = [VitImage(vit_input(p, self.config)) for p in pictures]
            samples.append([*blocks, TextBlock(self.encode(prompt))])
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        cache = prefill(self.model, samples, capacity_margin=max_new_tokens + 2)
        answers = generate_text(self.model, cache, max_new_tokens, temperature, top_p, generator)
        return [self.tokenizer.decode(ids) for ids in answers]

    def text_to_image(
        self,
        prompts: str | Sequence[str],
        height: int | None = None,
        width: int | None = None,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        cfg: CFGConfig | None = None,
        seed: int | Sequence[int] | None = None,
        noise: torch.Tensor | None = None,
        solver: str = "euler",
    ) -> list[Image.Image]:
        """Generate one image per prompt; `num_timesteps` grid points give num_timesteps - 1 steps (BAGEL).
        `solver`: "euler" (BAGEL's) or "unipc" (same model calls, for few-step students; `flow.solve`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cfg = cfg or default_t2i_cfg()
        if cfg.img_scale > 1.0:
            raise ValueError(
                f"text-to-image has no input image to guide by: img_scale must be 1, got {cfg.img_scale}"
            )
        grid = self._grid(height or self.config.vae_max_image_size, width or self.config.vae_max_image_size)
        conditional, no_text = t2i_context_samples([self.encode(p) for p in prompts])
        with_cfg = cfg.text_scale > 1.0 and not self.model.has_guidance_embedders
        no_text = no_text if with_cfg else None
        contexts = build_image_contexts(self.model, conditional, no_text, None, grid, self.sequential_cfg)
        return self._sample(contexts, num_timesteps, timestep_shift, cfg, seed, noise, solver)

    def edit(
        self,
        images: Image.Image | Sequence[Image.Image],
        instructions: str | Sequence[str],
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        cfg: CFGConfig | None = None,
        seed: int | Sequence[int] | None = None,
        noise: torch.Tensor | None = None,
        solver: str = "euler",
    ) -> list[Image.Image]:
        """Edit each image by its instruction; the output has the (stride-rounded) input size. Sampler
        arguments as in `text_to_image`."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        instructions = [instructions] if isinstance(instructions, str) else list(instructions)
        if len(images) != len(instructions):
            raise ValueError(f"got {len(images)} images but {len(instructions)} instructions")
        cfg = cfg or default_edit_cfg()
        conditional, no_text, no_image = edit_context_samples(
            images, [self.encode(instruction) for instruction in instructions], self.config
        )
        grid = self._grid(*conditional[0][0].pixels.shape[-2:])
        text_cfg = cfg.text_scale > 1.0 and not self.model.has_guidance_embedders
        no_text = no_text if text_cfg else None
        no_image = no_image if text_cfg and cfg.img_scale > 1.0 else None
        contexts = build_image_contexts(self.model, conditional, no_text, no_image, grid, self.sequential_cfg)
        return self._sample(contexts, num_timesteps, timestep_shift, cfg, seed, noise, solver)

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        stride = self.config.image_stride
        if height % stride or width % stride:
            raise ValueError(f"image size {height}x{width} must be a multiple of the image stride {stride}")
        return height // stride, width // stride

    def _sample(
        self,
        contexts: ImageContexts,
        num_timesteps: int,
        timestep_shift: float,
        cfg: CFGConfig,
        seed: int | Sequence[int] | None,
        noise: torch.Tensor | None,
        solver: str,
    ) -> list[Image.Image]:
        if noise is None:
            noise = initial_noise(self.model, contexts.batch_size, contexts.grid, seed)
        elif noise.ndim == 4:  # latent-space noise [B, C, h, w]
            noise = patchify_latents(noise, self.config.latent_patch_size).to(
                self.model.device, self.model.dtype
            )
        timesteps = sampling_schedule(num_timesteps, timestep_shift, device=self.model.device)
        tokens = sample_latent_tokens(contexts, noise, timesteps, cfg, solver=solver)
        return tensor_to_pil(self.model.decode_tokens(tokens, contexts.grid))
