"""The issue's reference generator, rebuilt: a plain dense transformer trained on shapes text-to-image.

    python benchmarks/dense_baseline.py --minutes 27 --out outputs/shapes/benchmarks/dense_baseline.json
    python benchmarks/dense_baseline.py --space latent --autoencoder outputs/shapes/autoencoder ...

Issue 3 quotes, "for scale", a dense 8-layer, 256-wide pixel-space transformer with 8x8-pixel tokens and
6.6M parameters that reached 0.585 strict GenEval after 27 minutes on this kind of CPU. This benchmark
builds that model from `torch.nn.TransformerEncoder` (prompt tokens and image tokens in one sequence,
full attention, the flow time's embedding added to the image tokens, learned positions), trains it with
stage 0's flow objective (logit-normal times with `--shift`, velocity MSE, 10% prompt dropout for CFG,
AdamW with warm-up and a cosine over the wall-clock budget, bf16 autocast where the CPU runs it natively)
on the shapes world's training prompts, then samples the test prompts at `teacher_quality.py`'s default
sampler (50 grid points, shift 3, text CFG 4 over (0, 1], global renorm; sample i from noise seed
`--seed + i`) and scores them with the same strict GenEval scorer, with and without CFG. `x0_mse_by_time`
in the JSON is the error of the model's clean estimate on noised validation renders at the sampler's
noisy times, beside the training set's mean image: whether it has learned a layout or only colour odds.
It is the yardstick for the teacher: the same data, scorer, sampler and machine, with none of BAGEL's
architecture.
`--space latent` trains it in the demo autoencoder's latent space instead (tokens of `--latent-patch` x
`--latent-patch` latent pixels); `--canvas 32` draws the world at 32 px (16 tokens of 8x8 pixels).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn
from transformers import PreTrainedTokenizerBase

from hyperbagel.backbone.autoencoder import (
    BagelAutoencoder,
    image_to_tensor,
    patchify_latents,
    tensor_to_pil,
    unpatchify_latents,
)
from hyperbagel.backbone.checkpoint import load_autoencoder
from hyperbagel.backbone.embeddings import PositionEmbedding
from hyperbagel.backbone.flow import (
    CFGConfig,
    add_noise,
    cfg_combine,
    euler_sample,
    predict_x0,
    sample_training_timesteps,
    sampling_schedule,
    velocity_target,
)
from hyperbagel.cpu_precision import cpu_training_precision
from hyperbagel.datamodules.shapes import ShapesWorld, T2ISample
from hyperbagel.datamodules.shapes_tokenizer import build_shapes_tokenizer
from hyperbagel.evaluation.geneval import geneval_scores
from hyperbagel.evaluation.suite import SamplerSettings, save_grid, to_canvas, write_summary

PIXEL_PATCH = 8
PROMPT_DROPOUT = 0.1
WARMUP_STEPS = 200
MIN_LR_RATIO = 0.05
ENCODE_BATCH = 500
LOG_EVERY = 250  # steps between progress lines on stderr
X0_MIN_TIME = 0.05  # JiT's clip: an x0 prediction is turned into a velocity dividing by max(t, this)
# times of the x0 check (the sampler starts at 1) and the validation renders it uses
PROBE_TIMES = (1.0, 0.98, 0.95, 0.9, 0.7, 0.5, 0.3)
PROBE_IMAGES = 256
POSITIONS = ("learned", "sincos")


class DenseFlowTransformer(nn.Module):
    """[prompt tokens | image tokens] through a pre-norm transformer encoder; returns image velocities.

    The prompt is padded to `max_prompt` tokens and padding is masked out of attention; an empty prompt
    (CFG's unconditional branch) keeps only its first token, `<|im_start|>`.
    """

    def __init__(
        self,
        vocab_size: int,
        token_dim: int,
        num_image_tokens: int,
        max_prompt: int,
        width: int,
        depth: int,
        positions: str = "learned",
    ) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.text_embed = nn.Embedding(vocab_size, width)
        self.text_pos = nn.Parameter(torch.randn(max_prompt, width) * 0.02)
        self.image_in = nn.Linear(token_dim, width)
        if positions == "sincos":  # BAGEL's frozen 2-D table (what `latent_pos_embed` holds)
            side = math.isqrt(num_image_tokens)
            self.image_pos = PositionEmbedding(side, width).pos_embed
        else:
            self.image_pos = nn.Parameter(torch.randn(num_image_tokens, width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        layer = nn.TransformerEncoderLayer(
            width, width // 64, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.image_out = nn.Linear(width, token_dim)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> torch.Tensor:
        """x [B, N, D] noisy tokens at times t [B] -> output [B, N, D]; prompt_mask True = real token."""
        width = self.image_pos.shape[1]
        time = self.time_mlp(get_timestep_embedding(t * 1000, width).to(x.dtype))
        image = self.image_in(x) + self.image_pos + time[:, None]
        text = self.text_embed(prompt_ids) + self.text_pos
        keep = torch.cat([prompt_mask, prompt_mask.new_ones(x.shape[:2])], dim=1)
        hidden = self.encoder(torch.cat([text, image], dim=1), src_key_padding_mask=~keep)
        return self.image_out(self.norm(hidden[:, text.shape[1] :]))


def output_velocity(
    output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str
) -> torch.Tensor:
    """The velocity the flow loss and the sampler use. With x0 prediction (JiT, "Back to Basics") the
    network outputs the clean tokens and `v = (x_t - x0) / t` follows, so it never has to reproduce the
    noise through its width; the loss stays the velocity MSE. Returned in float32 (outputs may be bf16)."""
    if prediction == "velocity":
        return output.float()
    times = t.float().clamp(min=X0_MIN_TIME).reshape(-1, *(1,) * (x_t.ndim - 1))
    return (x_t.float() - output.float()) / times


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids [B, max_prompt] (`<|im_start|>` then the prompt, zero-padded) and their mask."""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids = torch.zeros(len(prompts), max_prompt, dtype=torch.long)
    mask = torch.zeros(len(prompts), max_prompt, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens = [start, *tokenizer.encode(prompt, add_special_tokens=False)]
        if len(tokens) > max_prompt:
            raise ValueError(
                f"prompt {prompt!r} has {len(tokens)} tokens, more than --max-prompt {max_prompt}"
            )
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = True
    return ids, mask


class ImageTokens:
    """Images <-> the model's tokens: 8x8-pixel patches (pixels in [-1, 1], as the autoencoder takes
    them), or patches of the autoencoder's latents."""

    def __init__(self, autoencoder: BagelAutoencoder | None, latent_patch: int, canvas: int) -> None:
        self.autoencoder = autoencoder
        self.patch = latent_patch if autoencoder is not None else PIXEL_PATCH
        side = canvas // autoencoder.config.downsample_factor if autoencoder is not None else canvas
        self.grid = side // self.patch
        self.channels = autoencoder.config.z_channels if autoencoder is not None else 3
        self.token_dim = self.channels * self.patch**2

    @torch.no_grad()
    def encode(self, samples: Sequence[T2ISample]) -> torch.Tensor:
        pixels = image_to_tensor([s.image for s in samples])
        if self.autoencoder is not None:
            pixels = torch.cat([self.autoencoder.encode(part) for part in pixels.split(ENCODE_BATCH)])
        return patchify_latents(pixels, self.patch)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        grid = unpatchify_latents(tokens.float(), self.grid, self.grid, self.patch, self.channels)
        return self.autoencoder.decode(grid) if self.autoencoder is not None else grid.clamp(-1.0, 1.0)


def learning_rate(base: float, step: int, elapsed_fraction: float) -> float:
    """Linear warm-up over the first steps, then a cosine to MIN_LR_RATIO over the wall-clock budget."""
    warmup = min(1.0, (step + 1) / WARMUP_STEPS)
    cosine = MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed_fraction)))
    return base * warmup * cosine


def train(
    model: DenseFlowTransformer,
    tokens: torch.Tensor,
    prompts: tuple[torch.Tensor, torch.Tensor],
    null_prompt: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train until `args.minutes` of wall clock (or `args.max_steps`) pass; returns the run's figures."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    budget_s, losses, started = args.minutes * 60, [], time.perf_counter()
    model.train()
    while len(losses) < args.max_steps and (elapsed := time.perf_counter() - started) < budget_s:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, len(losses), elapsed / budget_s)
        rows = torch.randint(0, len(tokens), (args.batch_size,), generator=generator)
        ids, mask = prompts[0][rows].clone(), prompts[1][rows].clone()
        dropped = torch.rand(args.batch_size, generator=generator) < PROMPT_DROPOUT
        ids[dropped], mask[dropped] = null_prompt[0], null_prompt[1]
        x0 = tokens[rows]
        t = sample_training_timesteps(args.batch_size, args.shift, generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = add_noise(x0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            output = model(x_t, t, ids, mask)
        velocity = output_velocity(output, x_t, t, args.prediction)
        loss = (velocity.float() - velocity_target(x0, noise)).pow(2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {len(losses)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if len(losses) % LOG_EVERY == 0:
            recent = sum(losses[-LOG_EVERY:]) / LOG_EVERY
            print(
                f"step {len(losses)}  {elapsed / 60:.1f} min  loss {recent:.4f}", file=sys.stderr, flush=True
            )
    tail = losses[-min(200, len(losses)) :]
    return {
        "steps": len(losses),
        "images_seen": len(losses) * args.batch_size,
        "train_s": time.perf_counter() - started,
        "final_train_loss": sum(tail) / len(tail),
    }


@torch.no_grad()
def sample(
    model: DenseFlowTransformer,
    image_tokens: ImageTokens,
    prompts: tuple[torch.Tensor, torch.Tensor],
    null_prompt: tuple[torch.Tensor, torch.Tensor],
    sampler: SamplerSettings,
    args: argparse.Namespace,
) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] for the prompts; sample i starts from noise seed `args.seed + i`."""
    model.eval()
    ids, mask = prompts
    null_ids, null_mask = (part.expand(len(ids), -1) for part in null_prompt)
    shape = (image_tokens.grid**2, image_tokens.token_dim)
    noise = torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + i)) for i in range(len(ids))]
    )

    def velocity(x: torch.Tensor, t: torch.Tensor, _: int) -> torch.Tensor:
        times = t.expand(len(x))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            conditional = output_velocity(model(x, times, ids, mask), x, times, args.prediction)
            if not sampler.cfg.needs_text_uncond(t):
                return conditional
            unconditional = output_velocity(model(x, times, null_ids, null_mask), x, times, args.prediction)
        return cfg_combine(conditional, unconditional, None, sampler.cfg, t)

    latents = euler_sample(velocity, noise, sampling_schedule(sampler.num_timesteps, sampler.shift))
    return image_tokens.decode(latents)


@torch.no_grad()
def x0_error_by_time(
    model: nn.Module,
    tokens: torch.Tensor,
    prompts: tuple[torch.Tensor, torch.Tensor],
    mean_tokens: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, float]:
    """MSE of the model's clean estimate `x_t - t * v` against the true tokens of held-out renders, by time,
    beside the MSE of the training set's mean image (`mean_image`). The sampler lays a scene out from
    its first, noisiest steps: a model whose estimate there is worse than the mean image reads objects
    into the noise of single tokens instead of drawing one coherent layout."""
    model.eval()
    noise = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(args.seed))
    errors = {"mean_image": (mean_tokens - tokens).pow(2).mean().item()}
    for time_value in PROBE_TIMES:
        t = torch.full((len(tokens),), time_value)
        x_t = add_noise(tokens, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            v = output_velocity(model(x_t, t, *prompts), x_t, t, args.prediction)
        errors[f"t={time_value}"] = (predict_x0(x_t, v, t) - tokens).pow(2).mean().item()
    return errors


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write (and a *_samples.png)")
    parser.add_argument("--minutes", type=float, default=27.0, help="wall-clock training budget")
    parser.add_argument("--max-steps", type=int, default=10**9, help="stop earlier after this many steps")
    parser.add_argument("--space", choices=("pixel", "latent"), default="pixel")
    parser.add_argument("--canvas", type=int, default=64, help="the shapes world's image side in pixels")
    parser.add_argument("--autoencoder", help="autoencoder folder (required with --space latent)")
    parser.add_argument("--latent-patch", type=int, default=2, help="latent pixels per token side")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=20000, help="training prompts (train split)")
    parser.add_argument("--n-test", type=int, default=20, help="test prompts per GenEval category")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--shift", type=float, default=6.0, help="training timestep shift")
    parser.add_argument(
        "--prediction",
        choices=("velocity", "x0"),
        default="velocity",
        help="what the network outputs (x0: JiT's clean-token prediction, converted to a velocity)",
    )
    parser.add_argument(
        "--positions",
        choices=POSITIONS,
        default="learned",
        help="image token positions: learned (init N(0, 0.02)) or BAGEL's frozen 2-D sin-cos table",
    )
    parser.add_argument("--max-prompt", type=int, default=24, help="prompt tokens (incl. <|im_start|>)")
    parser.add_argument("--num-timesteps", type=int, default=50, help="sampling grid points")
    parser.add_argument("--sample-shift", type=float, default=3.0, help="timestep shift of the sampler")
    parser.add_argument("--text-scale", type=float, default=4.0, help="text CFG scale of `geneval`")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bf16 autocast (default: where this CPU runs bf16 natively, as the CLI decides)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.bf16 is None:
        args.bf16 = cpu_training_precision("bf16-mixed", "cpu") == "bf16-mixed"
    if args.space == "latent" and not args.autoencoder:
        parser.error("--space latent needs --autoencoder")
    if args.minutes <= 0 or args.max_steps < 1 or args.n_train < 1 or args.n_test < 1:
        parser.error("--minutes, --max-steps, --n-train and --n-test must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    world = ShapesWorld(canvas_size=args.canvas)
    tokenizer = build_shapes_tokenizer()
    autoencoder = load_autoencoder(args.autoencoder) if args.space == "latent" else None
    image_tokens = ImageTokens(autoencoder, args.latent_patch, world.canvas_size)
    train_samples = world.samples("t2i", "train", args.n_train)
    tokens = image_tokens.encode(train_samples)
    model = DenseFlowTransformer(
        len(tokenizer),
        tokens.shape[-1],
        tokens.shape[1],
        args.max_prompt,
        args.width,
        args.depth,
        args.positions,
    )
    null_prompt = encode_prompts(tokenizer, [""], args.max_prompt)
    run = train(
        model,
        tokens,
        encode_prompts(tokenizer, [s.prompt for s in train_samples], args.max_prompt),
        null_prompt,
        args,
    )

    val_samples = world.samples("t2i", "val", PROBE_IMAGES)
    run["x0_mse_by_time"] = x0_error_by_time(
        model,
        image_tokens.encode(val_samples),
        encode_prompts(tokenizer, [s.prompt for s in val_samples], args.max_prompt),
        tokens.mean(dim=0),
        args,
    )
    test_samples = world.samples("t2i", "test", args.n_test * 6)
    test_prompts = encode_prompts(tokenizer, [s.prompt for s in test_samples], args.max_prompt)
    scores, images = {}, {}
    for name, scale in (("geneval", args.text_scale), ("geneval_no_cfg", 1.0)):
        cfg = CFGConfig(text_scale=scale, interval=(0.0, 1.0), renorm_type="global")
        sampler = SamplerSettings(args.num_timesteps, args.sample_shift, cfg)
        started = time.perf_counter()
        pixels = sample(model, image_tokens, test_prompts, null_prompt, sampler, args)
        images[name] = [to_canvas(image, world.canvas_size) for image in tensor_to_pil(pixels)]
        scores[name] = geneval_scores(images[name], test_samples)
        run[f"{name}_sample_s"] = time.perf_counter() - started
    grid_path = args.out.with_name(f"{args.out.stem}_samples.png")
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    save_grid([images["geneval"][:12], [s.image for s in test_samples[:12]]], grid_path, world.canvas_size)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings["parameters"] = sum(p.numel() for p in model.parameters())
    settings["image_tokens"], settings["token_dim"] = tokens.shape[1:]
    return write_summary({**scores, **run, "settings": settings}, args.out)


if __name__ == "__main__":
    main()
