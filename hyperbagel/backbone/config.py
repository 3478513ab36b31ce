"""Configuration of the unified BAGEL model and its named presets.

A `BagelConfig` bundles the three sub-configurations BAGEL itself uses (a transformers `Qwen2Config`
for the language model, a `SiglipVisionConfig` for the ViT, the FLUX autoencoder parameters) plus the
few glue settings of the unified model. The loader adjustments BAGEL applies to the configs it reads
from disk (QK-norm, untied head, MoT layers, one ViT layer dropped) live in `adjust_loaded_configs` so
that presets, checkpoints and tests agree on them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from transformers import Qwen2Config, SiglipVisionConfig

from hyperbagel.backbone.autoencoder import AutoencoderConfig

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


@dataclass
class SpecialTokenIds:
    """Ids of the four marker tokens BAGEL wraps text and image blocks in."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokenIds:
        ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        unk = getattr(tokenizer, "unk_token_id", None)
        missing = [tok for tok, i in zip(SPECIAL_TOKENS, ids) if i is None or (unk is not None and i == unk)]
        if missing:
            raise ValueError(f"tokenizer lacks BAGEL's special tokens {missing}")
        return cls(*ids)

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class BagelConfig:
    """Everything needed to build a `Bagel` model (weights excluded)."""

    llm: Qwen2Config
    vit: SiglipVisionConfig
    vae: AutoencoderConfig
    special_tokens: SpecialTokenIds
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 1.0
    vae_max_image_size: int = 1024
    vae_min_image_size: int = 512
    vit_max_image_size: int = 980
    vit_min_image_size: int = 224
    guidance_embedders: bool = False  # CFG-distilled model: text / image guidance-scale embedders
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    @property
    def latent_token_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def image_stride(self) -> int:
        """Pixels per latent token side: VAE downsampling times the latent patch (16 for BAGEL)."""
        return self.vae.downsample_factor * self.latent_patch_size

    @property
    def vit_patch_size(self) -> int:
        return self.vit.patch_size

    def copy(self) -> BagelConfig:
        return copy.deepcopy(self)


def adjust_loaded_configs(llm: Qwen2Config, vit: SiglipVisionConfig, drop_vit_layer: bool = True) -> None:
    """Apply BAGEL's loader adjustments in place: QK-norm, untied head, MoT layers, last ViT layer dropped."""
    llm.qk_norm = True
    llm.tie_word_embeddings = False
    llm.layer_module = "Qwen2MoTDecoderLayer"
    vit.rope = False
    if drop_vit_layer:
        vit.num_hidden_layers = vit.num_hidden_layers - 1
    vit._attn_implementation = "sdpa"


# The ids of BAGEL's markers in the built-in shapes-world tokenizer, used by the tiny and shapes presets.
SHAPES_SPECIAL_TOKENS = SpecialTokenIds(im_start=2, im_end=3, vision_start=4, vision_end=5)


def _qwen2(**kwargs: Any) -> Qwen2Config:
    cfg = Qwen2Config(**kwargs)
    cfg.qk_norm = True
    cfg.tie_word_embeddings = False
    cfg.layer_module = "Qwen2MoTDecoderLayer"
    cfg._attn_implementation = "sdpa"
    return cfg


def _siglip(**kwargs: Any) -> SiglipVisionConfig:
    cfg = SiglipVisionConfig(**kwargs)
    cfg.rope = False
    cfg._attn_implementation = "sdpa"
    return cfg


def tiny_config(vocab_size: int = 72, special_tokens: SpecialTokenIds | None = None) -> BagelConfig:
    """A ~0.1M-parameter model with every BAGEL component, for unit tests (16 px images -> 4x4 tokens)."""
    llm = _qwen2(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
    )
    vit = _siglip(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        patch_size=2,
        image_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    vae = AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_num_groups=4)
    specials = special_tokens or SHAPES_SPECIAL_TOKENS
    return BagelConfig(
        llm=llm,
        vit=vit,
        vae=vae,
        special_tokens=specials,
        max_latent_size=8,
        vit_max_num_patch_per_side=8,
        vae_max_image_size=32,
        vae_min_image_size=8,
        vit_max_image_size=16,
        vit_min_image_size=4,
    )


def bagel_7b_mot_config() -> BagelConfig:
    """The real BAGEL-7B-MoT dimensions (Qwen2.5-7B + SigLIP so400m/14 with 26 layers + FLUX VAE)."""
    llm = _qwen2(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        hidden_act="silu",
    )
    vit = _siglip(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        patch_size=14,
        image_size=980,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    specials = SpecialTokenIds(im_start=151644, im_end=151645, vision_start=151652, vision_end=151653)
    return BagelConfig(
        llm=llm,
        vit=vit,
        vae=AutoencoderConfig.flux(),
        special_tokens=specials,
        max_latent_size=64,
        vit_max_num_patch_per_side=70,
    )


def shapes_config() -> BagelConfig:
    """The CPU demo model on the 64 px shapes world (~13M parameters, both experts counted).

    8 latent tokens per side (autoencoder downsampling 4 x latent patch 2) keep images coarse, which is
    what trains fast on a CPU; 8 layers of width 256 make the language model deep enough that a one-layer
    draft head is cheap beside it (speculative decoding). Special ids are the built-in shapes tokenizer's.
    """
    llm = _qwen2(
        vocab_size=72,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
    )
    vit = _siglip(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=8,
        image_size=64,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    vae = AutoencoderConfig(
        resolution=64, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, norm_num_groups=8
    )
    return BagelConfig(
        llm=llm,
        vit=vit,
        vae=vae,
        special_tokens=SHAPES_SPECIAL_TOKENS,
        max_latent_size=8,
        vit_max_num_patch_per_side=8,
        vae_max_image_size=64,
        vae_min_image_size=16,
        vit_max_image_size=64,
        vit_min_image_size=16,
    )


def shapes_coarse_config() -> BagelConfig:
    """The shapes preset with 4x4 latent patches: 16 latent tokens a 64 px image instead of 64 (image stride
    16, as BAGEL's). Text-to-image packs then hold about 49 images instead of 17 (0.66 s a step vs 0.49,
    measured); a text-to-image-only teacher on it reached GenEval 0.258 (single object 0.95) in 30 CPU
    minutes (README, "Where the teacher stands"). The demo teacher's preset (configs/shapes/teacher_t2i.yaml
    and the two phases after it); mixing the three tasks from the first step, it scored no better than
    `shapes` (GenEval 0.05, edits 0.05, short answers 0.46 after 58 minutes)."""
    config = shapes_config()
    config.latent_patch_size = 4
    config.max_latent_size = 4
    return config


PRESETS = {
    "tiny": tiny_config,
    "shapes": shapes_config,
    "shapes_coarse": shapes_coarse_config,
    "bagel-7b-mot": bagel_7b_mot_config,
}


def preset(name: str, **kwargs: Any) -> BagelConfig:
    """Build a named preset; unknown names list the known ones (callers that also take a checkpoint
    folder get here with a folder that does not exist, e.g. an earlier stage's export not yet written)."""
    if name not in PRESETS:
        raise KeyError(
            f"{name!r} is neither a known preset {sorted(PRESETS)} nor an existing checkpoint folder"
        )
    return PRESETS[name](**kwargs)


def register_preset(name: str, factory: Any) -> None:
    """Let other modules (e.g. the shapes world) add presets without this file knowing them."""
    PRESETS[name] = factory
