"""Does the demo autoencoder preserve what the scorers judge? Strict GenEval on reconstructions vs originals.

Exact renders of test-split text-to-image prompts are scored as they are and after
`decode(encode(x))`; a generator working in this latent space can score no better than the
reconstructions do, so they must score like the originals. Prints and writes JSON with the PSNR of the
reconstructions and the strict per-category scores of both.

    python benchmarks/autoencoder_quality.py --ae outputs/shapes/autoencoder --out ae_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from hyperbagel.backbone.autoencoder import (
    AutoencoderConfig,
    BagelAutoencoder,
    image_to_tensor,
    tensor_to_pil,
)
from hyperbagel.datamodules.shapes import ShapesWorld
from hyperbagel.evaluation.geneval import geneval_scores


def load(folder: Path) -> BagelAutoencoder:
    config = AutoencoderConfig.from_dict(json.loads((folder / "ae_config.json").read_text()))
    return BagelAutoencoder.from_file(folder / "ae.safetensors", config=config).eval()


@torch.no_grad()
def reconstruct(ae: BagelAutoencoder, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([ae.decode(ae.encode(chunk)).float() for chunk in images.split(batch_size)])


def psnr_db(mse: float) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * math.log10(4.0 / mse) if mse > 0 else math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ae", type=Path, required=True, help="folder with ae.safetensors and ae_config.json"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument(
        "--n", type=int, default=204, help="test-split prompts (spread over the 6 categories)"
    )
    parser.add_argument("--seed", type=int, default=0, help="shapes-world seed of the layouts")
    parser.add_argument("--canvas-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    ae = load(args.ae)
    samples = ShapesWorld(canvas_size=args.canvas_size, seed=args.seed).samples("t2i", "test", args.n)
    originals = [s.image for s in samples]
    pixels = image_to_tensor(originals)
    start = time.perf_counter()
    recon = reconstruct(ae, pixels, args.batch_size)
    seconds = time.perf_counter() - start
    # Score what a pipeline would save: reconstructions rounded to 8-bit images.
    recon_images = tensor_to_pil(recon)
    quantised = image_to_tensor(recon_images)
    per_image_mse = (quantised - pixels).pow(2).flatten(1).mean(1)
    original_scores = geneval_scores(originals, samples)
    recon_scores = geneval_scores(recon_images, samples)
    result = {
        "ae": str(args.ae),
        "config": ae.config.to_dict(),
        "parameters": sum(p.numel() for p in ae.parameters()),
        "n_images": len(samples),
        "canvas_size": args.canvas_size,
        "psnr_db": psnr_db(per_image_mse.mean().item()),
        "psnr_db_mean_per_image": sum(psnr_db(m) for m in per_image_mse.tolist()) / len(samples),
        "psnr_db_worst_image": psnr_db(per_image_mse.max().item()),
        "max_abs_error_255": round((quantised - pixels).abs().max().item() * 127.5),
        "strict_original": original_scores,
        "strict_reconstruction": recon_scores,
        "strict_ratio": recon_scores["overall"] / original_scores["overall"],
        "seconds_encode_decode": seconds,
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
