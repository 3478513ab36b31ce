"""Which training time distribution lets a from-scratch teacher lay out scenes at BAGEL's sampler.

    python benchmarks/timestep_shift.py --shifts 1 6 --autoencoder outputs/shapes/autoencoder \
        --out outputs/shapes/benchmarks/timestep_shift.json
    python benchmarks/timestep_shift.py --shifts 6 --uniform-fractions 0 0.25 --bf16 ...

A memorisation probe, one fresh model per training variant (each shift with each uniform fraction, see
`sample_training_timesteps`) in turn in one process: the same seed, the same `--n`
training prompts (text-to-image only), the same `--steps` of stage 0's objective (`PretrainStage`,
AdamW as in configs/shapes/teacher.yaml with a linear warm-up and gradient clipping at 1), then those
very prompts sampled at the sampler's settings (default BAGEL's shift 3, text CFG 4) and scored by the
strict GenEval scorer, with the pixel MSE of each sample to its exact render. A model that cannot
reproduce images it has seen ~100 times will not generalise to test prompts either; the probe isolates
how well the first, high-noise sampler steps (where the scene's layout is decided) were trained. Shift 1
(BAGEL's pre-training setting) puts 1.4% of training times above t = 0.9 (shift 6: 34%), while the
sampler's shift 3 spends a quarter of its steps there; a large shift in turn hardly trains the last,
low-noise steps, which a uniform fraction of the training times covers.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hyperbagel.backbone.autoencoder import image_to_tensor
from hyperbagel.backbone.inference import BagelInferencer
from hyperbagel.datamodules.shapes import ShapesWorld
from hyperbagel.datamodules.shapes_datamodule import ShapesDataModule
from hyperbagel.evaluation.suite import SamplerSettings, evaluate_t2i, write_summary
from hyperbagel.lightning_modules.pretrain import PretrainStage

WARMUP_STEPS = 50


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shifts", type=float, nargs="+", default=[1.0, 6.0], help="training shifts")
    parser.add_argument(
        "--uniform-fractions",
        type=float,
        nargs="+",
        default=[0.0],
        help="shares of uniform training times, each tried with every shift",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="train under bf16 autocast (fast on CPUs with native bf16)"
    )
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--preset", default="shapes", help="model preset trained from scratch")
    parser.add_argument("--autoencoder", help="autoencoder folder (default: a random one, for tests)")
    parser.add_argument("--data-root", type=Path, default=Path("outputs/shapes/probe_data"))
    parser.add_argument("--n", type=int, default=32, help="training prompts (memorised)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per shift")
    parser.add_argument("--tokens", type=int, default=1200, help="expected tokens per pack")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--num-timesteps", type=int, default=25, help="sampling grid points")
    parser.add_argument("--sample-shift", type=float, default=3.0, help="timestep shift of the sampler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        parser.error("--n and --steps must be >= 1")
    return args


def train(
    stage: PretrainStage,
    data: ShapesDataModule,
    steps: int,
    lr: float,
    bf16: bool,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """`steps` optimiser steps of the stage's own loss; returns the loss of each step. `after_step(n)` is
    called after step n (1-based), e.g. to evaluate along the way (it must restore train mode)."""
    params = [p for p in stage.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
    stage.model.train()
    losses: list[float] = []
    # A fresh loader from the module's (unrecorded) start position: every shift sees the same packs.
    batches = iter(data.train_dataloader())  # infinite: the train split repeats epoch after epoch
    while len(losses) < steps:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = stage.compute_losses(next(batches), "train")["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {len(losses)}")
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        warmup.step()
        losses.append(loss.item())
        if after_step is not None:
            after_step(len(losses))
    return losses


def probe(
    shift: float, uniform_fraction: float, args: argparse.Namespace, data: ShapesDataModule
) -> dict[str, Any]:
    """Train a fresh model at one training time distribution and score its samples of the training prompts."""
    torch.manual_seed(args.seed)
    stage = PretrainStage(
        model=args.preset,
        autoencoder=args.autoencoder,
        timestep_shift=shift,
        uniform_time_fraction=uniform_fraction,
    )
    stage.configure_model()
    started = time.perf_counter()
    losses = train(stage, data, args.steps, args.lr, args.bf16)
    train_seconds = time.perf_counter() - started

    stage.model.eval()
    samples = ShapesWorld().samples("t2i", "train", args.n)  # the exported rows, in order
    sampler = SamplerSettings(num_timesteps=args.num_timesteps, shift=args.sample_shift)
    result = evaluate_t2i(BagelInferencer(stage.model, stage.tokenizer), samples, sampler, seed=args.seed)
    tail = losses[-min(50, len(losses)) :]
    exact = image_to_tensor([s.image for s in samples])
    return {
        "train_shift": shift,
        "uniform_time_fraction": uniform_fraction,
        "geneval_on_training_prompts": result.scores,
        "pixel_mse_to_exact": (image_to_tensor(result.outputs) - exact).pow(2).mean().item(),
        "final_train_loss": sum(tail) / len(tail),
        "train_s": train_seconds,
        "sample_s": result.seconds,
    }


def probe_data(args: argparse.Namespace, n_train: int, **mix: Any) -> ShapesDataModule:
    """The probes' exported training data: `n_train` rows per task, the task weights and dropouts in `mix`,
    packs of about `args.tokens` tokens, no validation split."""
    data = ShapesDataModule(
        model_config=args.preset,
        data_root=str(args.data_root),
        n_train=n_train,
        n_val=0,
        expected_tokens=args.tokens,
        max_tokens=int(args.tokens * 1.25),
        max_tokens_per_sample=min(600, args.tokens),
        seed=args.seed,
        **mix,
    )
    data.prepare_data()
    return data


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Write the runs and the settings they ran with to `args.out`; returns the summary."""
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    return write_summary({"runs": runs, "settings": settings}, args.out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = probe_data(args, args.n, edit_weight=0.0, vqa_weight=0.0, vae_dropout=0.1)
    runs = [
        probe(shift, fraction, args, data) for shift in args.shifts for fraction in args.uniform_fractions
    ]
    return summarise(runs, args)


if __name__ == "__main__":
    main()
