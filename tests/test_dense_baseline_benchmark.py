"""Dense baseline benchmark: trained and scored in pixel space and in a tiny autoencoder's latent space."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import save_pretrained
from hyperbagel.datamodules.shapes import T2I_CATEGORIES

from helpers import load_benchmark


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "report" / "dense.json"
    argv = ["--out", str(out), "--width", "64", "--depth", "1", "--n-train", "8", "--n-test", "1"]
    argv += ["--max-steps", "3", "--batch-size", "4", "--num-timesteps", "3", "--threads", "1", *extra]
    summary = load_benchmark("dense_baseline").main(argv)
    assert json.loads(out.read_text()) == summary
    assert (out.parent / "dense_samples.png").is_file()
    return summary


def _check(summary: dict) -> None:
    assert summary["steps"] == 3 and summary["images_seen"] == 12
    assert math.isfinite(summary["final_train_loss"]) and summary["final_train_loss"] > 0.0
    for key in ("geneval", "geneval_no_cfg"):
        assert set(summary[key]) == {"overall", *T2I_CATEGORIES}
        assert 0.0 <= summary[key]["overall"] <= 1.0


def test_pixel_space_run_trains_samples_and_scores(tmp_path: Path) -> None:
    summary = _run(tmp_path)
    _check(summary)
    assert summary["settings"]["space"] == "pixel"
    assert (summary["settings"]["image_tokens"], summary["settings"]["token_dim"]) == (64, 8 * 8 * 3)


def test_latent_space_run_uses_the_autoencoder(tmp_path: Path, tiny_bagel: Bagel, shapes_tokenizer) -> None:
    save_pretrained(tiny_bagel, tmp_path / "model", tokenizer=shapes_tokenizer)
    summary = _run(
        tmp_path, "--space", "latent", "--autoencoder", str(tmp_path / "model"), "--latent-patch", "1"
    )
    _check(summary)
    side = 64 // tiny_bagel.config.vae.downsample_factor
    assert summary["settings"]["image_tokens"] == side**2
    assert summary["settings"]["token_dim"] == tiny_bagel.config.vae.z_channels


def test_latent_space_needs_an_autoencoder(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        load_benchmark("dense_baseline").parse_args(["--out", str(tmp_path / "x.json"), "--space", "latent"])


def test_prompts_are_padded_masked_and_length_checked(shapes_tokenizer) -> None:
    encode = load_benchmark("dense_baseline").encode_prompts
    ids, mask = encode(shapes_tokenizer, ["a red square", ""], 6)
    start = shapes_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[:, 0].tolist() == [start, start]
    assert mask.sum(1).tolist() == [4, 1] and torch.all(ids[~mask] == 0)
    with pytest.raises(ValueError, match="more than --max-prompt 2"):
        encode(shapes_tokenizer, ["a red square"], 2)


def test_x0_prediction_is_turned_into_the_flow_velocity(tmp_path: Path) -> None:
    """An exact clean-token output gives the exact velocity `noise - x0` (times above the clip)."""
    benchmark = load_benchmark("dense_baseline")
    x0, noise = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    t = torch.tensor([0.9, 0.5, 0.2])
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    torch.testing.assert_close(benchmark.output_velocity(x0, x_t, t, "x0"), noise - x0)
    assert benchmark.output_velocity(x0, x_t, t, "velocity") is x0
    summary = _run(tmp_path, "--prediction", "x0")
    _check(summary)
    assert summary["settings"]["prediction"] == "x0"
