"""What a distillation step consumes: the CFG contexts of each prompt, the latent grid, the clean target.

A `GenerationBatch` holds B text-to-image prompts or edits as the three context lists BAGEL's CFG uses
(conditional, without the text, without the image), built by the same functions as `BagelInferencer`,
so a stage guides its teacher exactly as the sampler does. The contexts are prefilled once per batch
(`contexts(model)`, normally under the teacher's original generation weights, as BAGEL's deployment
prefills clean latents) and queried by every model of the stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.config import BagelConfig
from hyperbagel.backbone.image_transforms import vae_input
from hyperbagel.backbone.inference import (
    ImageContexts,
    build_image_contexts,
    edit_context_samples,
    t2i_context_samples,
)
from hyperbagel.backbone.packing import Sample, VaeImage

TASKS: tuple[str, ...] = ("t2i", "edit")


def task_loss_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """Each task's loss weight, 1 where not given. Tasks share the generation weights but not the size of
    their losses (an edit's target, guided by text and image, is missed by more): weights rebalance them."""
    chosen = {task: 1.0 for task in TASKS} | dict(weights or {})
    unknown = sorted(set(chosen) - set(TASKS))
    if unknown or any(not w > 0 for w in chosen.values()):
        raise ValueError(f"task_weights must map tasks of {TASKS} to positive numbers, got {weights}")
    return {task: float(w) for task, w in chosen.items()}


def task_weighted_mean(
    per_sample: torch.Tensor, kinds: Sequence[str], weights: Mapping[str, float]
) -> torch.Tensor:
    """Mean of per-sample losses [B], each scaled by its task's weight (weights of 1: the plain mean)."""
    scale = torch.tensor([weights[kind] for kind in kinds], device=per_sample.device, dtype=per_sample.dtype)
    return (scale * per_sample).mean()


@dataclass
class GenerationItem:
    """One prompt or edit: its three contexts (no `no_image` for text-to-image), latent grid, clean
    target image [3, H, W] in [-1, 1] (when known) and its text (prompt or instruction)."""

    kind: str
    conditional: Sample
    no_text: Sample
    no_image: Sample | None
    grid: tuple[int, int]
    target: torch.Tensor | None
    text: str


def latent_grid(pixels: torch.Tensor, config: BagelConfig, what: str) -> tuple[int, int]:
    """Latent tokens per side of VAE-ready pixels [3, H, W]."""
    height, width = pixels.shape[-2:]
    stride = config.image_stride
    if height % stride or width % stride:
        raise ValueError(f"{what} of size {height}x{width} is not a multiple of the image stride {stride}")
    return height // stride, width // stride


def _target_pixels(
    target: Image.Image | None, config: BagelConfig, grid: tuple[int, int]
) -> torch.Tensor | None:
    if target is None:
        return None
    pixels = vae_input(target, config)
    if latent_grid(pixels, config, "target") != grid:
        raise ValueError(
            f"target image resizes to {tuple(pixels.shape[-2:])}, which is not the output grid {grid} "
            f"x stride {config.image_stride}"
        )
    return pixels


def t2i_item(
    prompt: str, prompt_ids: Sequence[int], config: BagelConfig, target: Image.Image | None = None
) -> GenerationItem:
    """A text-to-image prompt; the image is the target's size after the VAE transform, or the model's
    largest square (the inferencer's default) without a target."""
    conditional, no_text = t2i_context_samples([prompt_ids])
    if target is not None:
        grid = latent_grid(vae_input(target, config), config, "target")
    else:
        side = config.vae_max_image_size // config.image_stride
        grid = (side, side)
    return GenerationItem(
        "t2i", conditional[0], no_text[0], None, grid, _target_pixels(target, config, grid), prompt
    )


def edit_item(
    source: Image.Image,
    instruction: str,
    instruction_ids: Sequence[int],
    config: BagelConfig,
    target: Image.Image | None = None,
) -> GenerationItem:
    """An edit of `source`; the output has the source's size after the VAE transform, as in the inferencer."""
    conditional, no_text, no_image = edit_context_samples([source], [instruction_ids], config)
    grid = latent_grid(conditional[0][0].pixels, config, "source image")
    pixels = _target_pixels(target, config, grid)
    return GenerationItem("edit", conditional[0], no_text[0], no_image[0], grid, pixels, instruction)


@dataclass
class GenerationBatch:
    """B items sharing one latent grid, as the stacked context lists the sampler prefills.

    `no_image` exists when any item is an edit (a text-to-image item then repeats its conditional context
    there; its image scale is 1, so that row is never combined). Targets: `target_images` [B, 3, H, W] in
    [-1, 1] and/or `target_tokens` [B, N, D] (clean latent tokens); `clean_tokens` gives the latter.
    """

    kinds: list[str]
    conditional: list[Sample]
    no_text: list[Sample]
    no_image: list[Sample] | None
    grid: tuple[int, int]
    target_images: torch.Tensor | None = None
    target_tokens: torch.Tensor | None = None
    texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task kinds {unknown}; expected {TASKS}")
        sizes = {"conditional": len(self.conditional), "no_text": len(self.no_text)}
        if self.no_image is not None:
            sizes["no_image"] = len(self.no_image)
        if self.target_images is not None:
            sizes["target_images"] = self.target_images.shape[0]
        if self.target_tokens is not None:
            sizes["target_tokens"] = self.target_tokens.shape[0]
        if any(size != len(self.kinds) for size in sizes.values()):
            raise ValueError(f"batch of {len(self.kinds)} kinds has lists of other sizes: {sizes}")
        if "edit" in self.kinds and self.no_image is None:
            raise ValueError("a batch with edits needs no_image contexts")

    def __len__(self) -> int:
        return len(self.kinds)

    @property
    def is_edit(self) -> torch.Tensor:
        """[B] True for edits."""
        return torch.tensor([kind == "edit" for kind in self.kinds], dtype=torch.bool)

    @classmethod
    def collate(cls, items: Sequence[GenerationItem]) -> GenerationBatch:
        if not items:
            raise ValueError("cannot collate an empty list of generation items")
        grids = {item.grid for item in items}
        if len(grids) != 1:
            raise ValueError(f"items of one batch must share a latent grid, got {sorted(grids)}")
        with_targets = [item.target is not None for item in items]
        if any(with_targets) and not all(with_targets):
            raise ValueError("either every item of a batch has a target image or none has")
        any_edit = any(item.kind == "edit" for item in items)
        return cls(
            kinds=[item.kind for item in items],
            conditional=[item.conditional for item in items],
            no_text=[item.no_text for item in items],
            no_image=[item.conditional if item.no_image is None else item.no_image for item in items]
            if any_edit
            else None,
            grid=grids.pop(),
            target_images=torch.stack([item.target for item in items]) if all(with_targets) else None,
            texts=[item.text for item in items],
        )

    def to(self, device: torch.device | str) -> GenerationBatch:
        """Targets on `device` (contexts stay on the host: prefill moves what it packs)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, target_images=move(self.target_images), target_tokens=move(self.target_tokens))

    def contexts(self, model: Bagel) -> ImageContexts:
        """Prefill the stacked [conditional | no text | no image] contexts with `model` as it is now."""
        return build_image_contexts(model, self.conditional, self.no_text, self.no_image, self.grid)

    def clean_tokens(self, model: Bagel) -> torch.Tensor:
        """Clean target latent tokens [B, N, D] in the model's dtype (encoded once, then kept)."""
        if self.target_tokens is None:
            if self.target_images is None:
                raise ValueError("this batch has no targets (neither target_tokens nor target_images)")
            images = [VaeImage(pixels=pixels) for pixels in self.target_images]
            self.target_tokens = torch.stack(model.encode_latent_tokens(images))
        expected = self.grid[0] * self.grid[1]
        if self.target_tokens.shape[1] != expected:
            raise ValueError(
                f"target tokens of shape {tuple(self.target_tokens.shape)} do not fill the grid {self.grid}"
            )
        return self.target_tokens.to(model.device, model.dtype)
