"""Timestep-shift probe: the whole run on the tiny preset, each shift trained and scored in turn."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hyperbagel.datamodules.shapes import T2I_CATEGORIES

from helpers import load_benchmark


def test_probe_trains_and_scores_each_variant(tmp_path: Path) -> None:
    out = tmp_path / "report" / "shift.json"
    argv = ["--shifts", "1", "6", "--uniform-fractions", "0", "0.5", "--out", str(out), "--preset", "tiny"]
    argv += ["--data-root", str(tmp_path / "data")]
    argv += ["--n", "6", "--steps", "3", "--tokens", "300", "--num-timesteps", "3", "--threads", "1"]
    summary = load_benchmark("timestep_shift").main(argv)

    assert json.loads(out.read_text()) == summary
    variants = [(run["train_shift"], run["uniform_time_fraction"]) for run in summary["runs"]]
    assert variants == [(1.0, 0.0), (1.0, 0.5), (6.0, 0.0), (6.0, 0.5)]
    for run in summary["runs"]:
        assert set(run["geneval_on_training_prompts"]) == {"overall", *T2I_CATEGORIES}
        assert 0.0 <= run["geneval_on_training_prompts"]["overall"] <= 1.0
        assert 0.0 < run["pixel_mse_to_exact"] <= 4.0  # pixels in [-1, 1]; random weights cannot be exact
        assert math.isfinite(run["final_train_loss"]) and run["final_train_loss"] > 0.0
    # Same seed, same packs: only the training times differ, so the losses differ.
    assert len({run["final_train_loss"] for run in summary["runs"]}) == 4
