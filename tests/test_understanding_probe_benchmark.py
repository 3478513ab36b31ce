"""Understanding probe: the whole run on the tiny preset, each variant trained and scored along the way."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from helpers import load_benchmark


def test_probe_scores_each_variant_with_and_without_the_image(tmp_path: Path) -> None:
    out = tmp_path / "report" / "understanding.json"
    argv = ["--variants", "trainable_vit", "frozen_vit", "--out", str(out), "--preset", "tiny"]
    argv += ["--data-root", str(tmp_path / "data"), "--n-train", "8", "--n", "6", "--follow-ups", "1"]
    argv += ["--steps", "3", "--eval-every", "2", "--tokens", "400", "--threads", "1"]
    summary = load_benchmark("understanding_probe").main(argv)

    assert json.loads(out.read_text()) == summary
    assert [run["variant"] for run in summary["runs"]] == ["trainable_vit", "frozen_vit"]
    for run in summary["runs"]:
        assert [point["step"] for point in run["curve"]] == [2, 3]  # every 2 steps and the last
        for point in run["curve"]:
            for key in ("accuracy_with_image", "accuracy_blank_image", "accuracy_reading"):
                assert 0.0 <= point[key] <= 1.0
            assert set(point["per_category_with_image"]) <= {"color", "count", "shape", "position"}
        assert math.isfinite(run["final_train_loss"]) and run["final_train_loss"] > 0.0
    # Same seed and packs: freezing the ViT changes what trains, hence the loss.
    assert summary["runs"][0]["final_train_loss"] != summary["runs"][1]["final_train_loss"]


def test_frozen_variant_leaves_the_vision_encoder_untouched(tmp_path: Path) -> None:
    probe = load_benchmark("understanding_probe")
    args = probe.parse_args(
        ["--out", str(tmp_path / "x.json"), "--preset", "tiny", "--data-root", str(tmp_path / "data")]
        + ["--n-train", "8", "--n", "2", "--follow-ups", "1", "--steps", "2", "--eval-every", "5"]
        + ["--tokens", "400", "--variants", "frozen_vit"]
    )
    trained = {}
    original_train = probe.train

    def spy(stage, *rest, **kwargs):
        before = {n: p.detach().clone() for n, p in stage.model.vit_model.named_parameters()}
        losses = original_train(stage, *rest, **kwargs)
        trained["vit_changed"] = any(
            not torch.equal(before[n], p) for n, p in stage.model.vit_model.named_parameters()
        )
        trained["llm_trains"] = any(p.requires_grad for p in stage.model.language_model.parameters())
        return losses

    probe.train = spy
    data = probe.probe_data(args, 8, t2i_weight=0.0, edit_weight=0.0, vqa_weight=1.0, vqa_follow_ups=1)
    probe.probe("frozen_vit", args, data)
    assert trained == {"vit_changed": False, "llm_trains": True}


def test_reading_steps_train_on_described_scenes_before_the_images(tmp_path: Path) -> None:
    probe = load_benchmark("understanding_probe")
    argv = ["--out", str(tmp_path / "x.json"), "--preset", "tiny", "--data-root", str(tmp_path / "data")]
    argv += ["--n-train", "8", "--n", "2", "--follow-ups", "1", "--steps", "2", "--eval-every", "5"]
    argv += ["--tokens", "400", "--reading-steps", "3", "--reading-weight", "0.5"]
    phases = []
    original_train = probe.train

    def spy(stage, data, steps, *rest, **kwargs):
        phases.append(([(g.name, g.weight) for g in data.groups], steps))
        return original_train(stage, data, steps, *rest, **kwargs)

    probe.train = spy
    summary = probe.main(argv)
    assert phases == [([("vqa_text", 1.0)], 3), ([("vqa", 1.0), ("vqa_text", 0.5)], 2)]
    (run,) = summary["runs"]
    assert math.isfinite(run["reading_final_loss"]) and run["reading_final_loss"] > 0.0
    assert [point["step"] for point in run["curve"]] == [2]
