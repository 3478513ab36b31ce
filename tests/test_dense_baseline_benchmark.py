"""Dense baseline benchmark: trained and scored in pixel space and in a tiny autoencoder's latent space."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import save_pretrained
from hyperbagel.backbone.embeddings import PositionEmbedding
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
    errors = summary["x0_mse_by_time"]
    assert set(errors) == {"mean_image", "t=1.0", "t=0.98", "t=0.95", "t=0.9", "t=0.7", "t=0.5", "t=0.3"}
    assert all(math.isfinite(value) and value > 0.0 for value in errors.values())


def test_pixel_space_run_trains_samples_and_scores(tmp_path: Path) -> None:
    summary = _run(tmp_path)
    _check(summary)
    assert summary["settings"]["space"] == "pixel"
    assert (summary["settings"]["image_tokens"], summary["settings"]["token_dim"]) == (64, 8 * 8 * 3)


def test_a_smaller_canvas_gives_fewer_image_tokens(tmp_path: Path) -> None:
    summary = _run(tmp_path, "--canvas", "32")
    _check(summary)
    assert (summary["settings"]["image_tokens"], summary["settings"]["token_dim"]) == (16, 8 * 8 * 3)


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


class _ExactCleanTokens(torch.nn.Module):
    """Outputs the true clean tokens whatever it is given: an ideal x0-predicting model."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        self.tokens = tokens

    def forward(self, x: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return self.tokens


def test_x0_error_by_time_is_zero_for_an_exact_model_and_reports_the_mean_image() -> None:
    benchmark = load_benchmark("dense_baseline")
    args = benchmark.parse_args(["--out", "x.json", "--prediction", "x0", "--no-bf16"])
    tokens, mean = torch.randn(6, 4, 3), torch.randn(4, 3)
    prompts = (torch.zeros(6, 2, dtype=torch.long), torch.ones(6, 2, dtype=torch.bool))
    errors = benchmark.x0_error_by_time(_ExactCleanTokens(tokens), tokens, prompts, mean, args)
    assert errors["mean_image"] == pytest.approx((tokens - mean).pow(2).mean().item())
    assert all(value < 1e-10 for key, value in errors.items() if key != "mean_image")


def test_sincos_positions_are_bagels_frozen_table() -> None:
    model_class = load_benchmark("dense_baseline").DenseFlowTransformer
    model = model_class(10, 12, 16, 4, width=64, depth=1, positions="sincos")
    assert not model.image_pos.requires_grad
    torch.testing.assert_close(model.image_pos, PositionEmbedding(4, 64).pos_embed)
    assert model_class(10, 12, 16, 4, width=64, depth=1).image_pos.requires_grad
    with pytest.raises(ValueError, match="positions must be one of"):
        model_class(10, 12, 16, 4, width=64, depth=1, positions="rope")
