"""BAGEL's image autoencoder: diffusers' `AutoencoderKL` configured as the FLUX autoencoder.

BAGEL ships the autoencoder as `ae.safetensors` in the original FLUX/LDM key naming, so this module
reads that layout with diffusers' own LDM converter and writes it back with the inverse renaming
(`diffusers_to_flux_key`). Latents follow BAGEL's convention `(z - shift) * scale`, and the helpers at
the bottom turn latents into the 2x2-patch tokens the transformer reads and back.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_ldm_vae_checkpoint
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class AutoencoderConfig:
    """FLUX autoencoder hyper-parameters, named as in FLUX's `AutoEncoderParams`."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_num_groups: int = 32

    @classmethod
    def flux(cls) -> AutoencoderConfig:
        """The autoencoder BAGEL-7B-MoT uses (its checkpoint folder carries no config for it)."""
        return cls()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ch_mult"] = list(self.ch_mult)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoencoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown autoencoder config fields {unknown}; known fields are {sorted(known)}")
        values = dict(data)
        if "ch_mult" in values:
            values["ch_mult"] = tuple(values["ch_mult"])
        return cls(**values)


# diffusers attention parameter names -> FLUX's (FLUX stores q/k/v/proj_out as 1x1 convs).
_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_CONV_AS_LINEAR = {"q", "k", "v", "proj_out"}


def _resnet_tail(tail: str) -> str:
    return tail.replace("conv_shortcut", "nin_shortcut")


def _attn_tail(tail: str) -> str:
    name, param = tail.rsplit(".", 1)
    return f"{_ATTN_NAMES[name]}.{param}"


def _flux_rules(num_levels: int) -> list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]:
    """Regex rules from a diffusers key (minus `encoder.`/`decoder.`) to its FLUX name.

    FLUX numbers decoder levels from the lowest resolution up (`up.{n-1-k}` is diffusers' `up_blocks.{k}`).
    """
    return [
        (
            re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"down.{m[1]}.block.{m[2]}.{_resnet_tail(m[3])}",
        ),
        (
            re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)"),
            lambda m: f"down.{m[1]}.downsample.{m[2]}",
        ),
        (
            re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{_resnet_tail(m[3])}",
        ),
        (
            re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)"),
            lambda m: f"up.{num_levels - 1 - int(m[1])}.upsample.{m[2]}",
        ),
        (
            re.compile(r"mid_block\.resnets\.(\d+)\.(.+)"),
            lambda m: f"mid.block_{int(m[1]) + 1}.{_resnet_tail(m[2])}",
        ),
        (re.compile(r"mid_block\.attentions\.0\.(.+)"), lambda m: f"mid.attn_1.{_attn_tail(m[1])}"),
    ]


def diffusers_to_flux_key(key: str, num_levels: int) -> str:
    """FLUX/LDM name of a diffusers `AutoencoderKL` parameter (the inverse of diffusers' LDM converter)."""
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in fixed:
        return fixed[key]
    part, _, rest = key.partition(".")
    if part in ("encoder", "decoder"):
        for pattern, rename in _flux_rules(num_levels):
            match = pattern.fullmatch(rest)
            if match:
                return f"{part}.{rename(match)}"
    raise ValueError(f"no FLUX name for autoencoder parameter {key!r}")


def _is_attn_projection(flux_key: str) -> bool:
    parts = flux_key.split(".")
    return parts[-3] == "attn_1" and parts[-2] in _CONV_AS_LINEAR and parts[-1] == "weight"


class BagelAutoencoder(nn.Module):
    """FLUX autoencoder with BAGEL's latent normalisation and BAGEL's checkpoint layout."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        levels = len(config.ch_mult)
        self.vae = AutoencoderKL(
            in_channels=config.in_channels,
            out_channels=config.out_ch,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(config.ch * m for m in config.ch_mult),
            layers_per_block=config.num_res_blocks,
            latent_channels=config.z_channels,
            norm_num_groups=config.norm_num_groups,
            sample_size=config.resolution,
            scaling_factor=config.scale_factor,
            shift_factor=config.shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        self._flux_names = {key: diffusers_to_flux_key(key, levels) for key in self.vae.state_dict()}

    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in [-1, 1] `[B, C, H, W]` -> normalised latents `[B, z_channels, H/ds, W/ds]`."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images [B, {self.config.in_channels}, H, W], got shape {tuple(images.shape)}"
            )
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.config.shift_factor) * self.config.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images clamped to [-1, 1]."""
        z = latents.to(self.vae.dtype) / self.config.scale_factor + self.config.shift_factor
        return self.vae.decode(z).sample.clamp(-1.0, 1.0)

    def state_dict_flux(self) -> dict[str, torch.Tensor]:
        """Weights in BAGEL's `ae.safetensors` naming (attention projections as 1x1 conv kernels)."""
        out = {}
        for key, tensor in self.vae.state_dict().items():
            name = self._flux_names[key]
            out[name] = tensor[:, :, None, None] if _is_attn_projection(name) else tensor
        return out

    def _expected_flux_shapes(self) -> dict[str, torch.Size]:
        return {name: tensor.shape for name, tensor in self.state_dict_flux().items()}

    def load_flux_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load FLUX-named weights; raise one ValueError listing every missing, unexpected or mis-shaped key.

        With `strict=False` missing and unexpected keys are tolerated (shape mismatches never are).
        """
        expected = self._expected_flux_shapes()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        mismatched = sorted(
            f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(shape)}"
            for key, shape in expected.items()
            if key in state_dict and state_dict[key].shape != shape
        )
        problems = [f"shape mismatches {mismatched}"] if mismatched else []
        if strict:
            problems += [f"missing keys {missing}"] if missing else []
            problems += [f"unexpected keys {unexpected}"] if unexpected else []
        if problems:
            raise ValueError(f"cannot load FLUX autoencoder weights ({self.config}): " + "; ".join(problems))
        known = {key: tensor for key, tensor in state_dict.items() if key in expected}
        converted = convert_ldm_vae_checkpoint(known, self.vae.config)
        self.vae.load_state_dict({k: v for k, v in converted.items() if v is not None}, strict=strict)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        config: AutoencoderConfig | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> BagelAutoencoder:
        """Build from a FLUX-named `ae.safetensors`; `config` defaults to the real FLUX autoencoder."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"autoencoder weights not found: {path}")
        try:
            state_dict = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read autoencoder weights {path}: {err}") from err
        model = cls(config or AutoencoderConfig.flux())
        try:
            model.load_flux_state_dict(state_dict)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        return model.to(device=device, dtype=dtype)

    def save_file(self, path: str | Path) -> None:
        """Write the weights as FLUX-named safetensors (BAGEL's `ae.safetensors`)."""
        save_file({k: v.contiguous() for k, v in self.state_dict_flux().items()}, str(path))


def patchify_latents(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """`[B, C, H, W]` latents -> `[B, (H/p)*(W/p), p*p*C]` tokens, row-major, each token ordered (p, q, c)."""
    b, c, height, width = latents.shape
    if height % patch or width % patch:
        raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {patch}")
    h, w = height // patch, width // patch
    grid = latents.reshape(b, c, h, patch, w, patch)
    return torch.einsum("bchpwq->bhwpqc", grid).reshape(b, h * w, patch * patch * c)


def unpatchify_latents(
    tokens: torch.Tensor, h: int, w: int, patch: int = 2, channels: int | None = None
) -> torch.Tensor:
    """Inverse of `patchify_latents`: `[B, h*w, p*p*C]` tokens on an h x w grid -> `[B, C, h*p, w*p]`."""
    b, n, dim = tokens.shape
    c = channels if channels is not None else dim // (patch * patch)
    if n != h * w or dim != patch * patch * c:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not fit a {h}x{w} grid of {patch}x{patch} patches "
            f"with {c} channels"
        )
    grid = tokens.reshape(b, h, w, patch, patch, c)
    return torch.einsum("bhwpqc->bchpwq", grid).reshape(b, c, h * patch, w * patch)


def image_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Same-sized PIL images -> `[B, 3, H, W]` float tensor in [-1, 1] (the autoencoder's input range)."""
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise ValueError(f"images must share one size to be batched, got sizes {sorted(sizes)}")
    return torch.stack([TF.to_tensor(image.convert("RGB")) * 2.0 - 1.0 for image in images])


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """`[B, 3, H, W]` (or `[3, H, W]`) tensor in [-1, 1] -> RGB PIL images, rounded to the nearest level."""
    batch = images.unsqueeze(0) if images.ndim == 3 else images
    pixels = ((batch.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).cpu()
    return [TF.to_pil_image(image) for image in pixels]
