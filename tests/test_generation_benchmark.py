"""benchmarks/generation.py on tiny checkpoints; the deployment (teacher prefill, student denoising)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from hyperbagel.backbone.autoencoder import BagelAutoencoder
from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import save_pretrained
from hyperbagel.backbone.config import tiny_config
from hyperbagel.backbone.inference import BagelInferencer, default_edit_cfg, default_t2i_cfg
from hyperbagel.datamodules.shapes import T2I_CATEGORIES
from hyperbagel.distillation.generation_weights import (
    DeployedInferencer,
    GenerationWeights,
    is_generation_key,
)

from helpers import load_benchmark

ENTRY_KEYS = {"nfe_t2i", "nfe_edit", "geneval", "edit", "seconds_per_image_t2i", "seconds_per_image_edit"}


def _distilled(model: Bagel) -> Bagel:
    """A stand-in for a stage-1 output: guidance embedders and generation weights moved off the teacher."""
    student = copy.deepcopy(model).add_guidance_embedders()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if is_generation_key(name):
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return student


def _run(tmp_path: Path, teacher: Path, student: Path, *extra: str) -> dict:
    out = tmp_path / "report" / "generation.json"
    argv = ["--teacher", str(teacher), "--student", str(student), "--out", str(out), "--n-t2i", "1"]
    argv += ["--n-edit", "2", "--n-timing", "1", "--teacher-timesteps", "3", "--batch-size", "4", *extra]
    summary = load_benchmark("generation").main(argv)
    assert json.loads(out.read_text()) == summary
    assert Image.open(out.with_name("generation_samples.png")).size[0] > 0
    return summary


def test_benchmark_reports_teacher_and_student(tmp_path: Path, tiny_bagel, shapes_tokenizer) -> None:
    save_pretrained(tiny_bagel, tmp_path / "teacher", tokenizer=shapes_tokenizer)
    save_pretrained(_distilled(tiny_bagel), tmp_path / "student", tokenizer=shapes_tokenizer)
    summary = _run(
        tmp_path,
        tmp_path / "teacher",
        tmp_path / "student",
        "--student-steps",
        "2",
        "--deployment",
        "--sequential-cfg-teacher",
        "--student-solver",
        "unipc",
        "--split",
        "val",
    )
    for name in ("teacher", "student", "student_deployed"):
        entry = summary[name]
        assert ENTRY_KEYS <= set(entry)
        assert set(entry["geneval"]) == {"overall", *T2I_CATEGORIES}
        assert set(entry["edit"]) == {"overall", "instruction", "preservation"}
        assert all(0.0 <= v <= 1.0 for v in [*entry["geneval"].values(), *entry["edit"].values()])
        assert entry["seconds_per_image_t2i"] > 0 and entry["seconds_per_image_edit"] > 0
    # teacher: 2 steps inside the CFG interval, 2 (t2i) or 3 (edit) passes each; students: one pass a step
    assert (summary["teacher"]["nfe_t2i"], summary["teacher"]["nfe_edit"]) == (4, 6)
    assert (summary["student"]["nfe_t2i"], summary["student"]["nfe_edit"]) == (2, 2)
    assert summary["student"]["sampler"]["t2i"]["num_timesteps"] == 3
    assert [summary[name]["sampler"]["edit"]["solver"] for name in ("teacher", "student")] == [
        "euler",
        "unipc",
    ]
    assert summary["settings"]["split"] == "val"
    for task in ("t2i", "edit"):
        key = f"seconds_per_image_{task}"
        assert summary[f"speedup_{task}"] == pytest.approx(summary["teacher"][key] / summary["student"][key])
        sequential = summary["teacher_sequential_cfg"]  # timed only, with the teacher's passes
        assert sequential[f"nfe_{task}"] == summary["teacher"][f"nfe_{task}"] and sequential[key] > 0
        assert summary[f"speedup_{task}_vs_sequential_cfg"] == pytest.approx(
            sequential[key] / summary["student"][key]
        )
    assert summary["settings"]["dtype"] == "float32"  # as stored
    overalls = {name: summary[name]["geneval"]["overall"] for name in ("teacher", "student")}
    gap = summary["geneval_gap"]
    assert gap["student_minus_teacher"] == pytest.approx(overalls["student"] - overalls["teacher"])
    assert gap["standard_error"] is None  # one prompt a category: no variance to estimate
    edit_overalls = {name: summary[name]["edit"]["overall"] for name in ("teacher", "student")}
    edit_gap = summary["edit_gap"]
    assert edit_gap["student_minus_teacher"] == pytest.approx(
        edit_overalls["student"] - edit_overalls["teacher"]
    )
    assert edit_gap["standard_error"] >= 0.0
    # text-to-image contexts hold text only, so deployment and the plain student draw the same images
    assert summary["student_deployed"]["geneval"] == summary["student"]["geneval"]
    cost = summary["forward_cost"]
    assert set(cost["ms"]) == {"forward_1_rows", "forward_2_rows", "forward_3_rows", "prefill", "vae_decode"}
    assert all(value > 0 for value in cost["ms"].values())
    assert cost["cfg_step_in_student_steps"]["text"] == pytest.approx(
        cost["ms"]["forward_2_rows"] / cost["ms"]["forward_1_rows"], abs=1e-3
    )


def test_timed_models_take_turns_and_report_medians(monkeypatch) -> None:
    module = load_benchmark("generation")
    clock = iter(range(1000))
    monkeypatch.setattr(module.time, "perf_counter", lambda: float(next(clock)))
    calls = []
    runs = {name: (lambda i, n=name: calls.append((n, i))) for name in ("a", "b", "c")}
    seconds = module.interleaved_seconds(runs, 3)
    warm_up, timed = calls[:3], calls[3:]
    assert warm_up == [("a", 0), ("b", 0), ("c", 0)]
    assert [name for name, _ in timed] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [i for _, i in timed] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert seconds == {"a": 1.0, "b": 1.0, "c": 1.0}  # the fake clock ticks once per call


def test_a_student_equal_to_its_teacher_scores_the_same(tmp_path: Path, tiny_bagel, shapes_tokenizer) -> None:
    """Also in bfloat16, where both models are cast alike."""
    save_pretrained(tiny_bagel, tmp_path / "teacher", tokenizer=shapes_tokenizer)
    summary = _run(
        tmp_path, tmp_path / "teacher", tmp_path / "teacher", "--student-steps", "2", "--dtype", "bfloat16"
    )
    assert summary["settings"]["dtype"] == "bfloat16"
    for key in ("nfe_t2i", "nfe_edit", "geneval", "edit"):
        assert summary["student"][key] == summary["teacher"][key]


def test_a_student_with_other_generation_keys_is_refused(
    tmp_path: Path, tiny_bagel, shapes_tokenizer
) -> None:
    save_pretrained(tiny_bagel, tmp_path / "teacher", tokenizer=shapes_tokenizer)
    config = tiny_config(vocab_size=len(shapes_tokenizer))
    config.llm.intermediate_size = 48
    save_pretrained(
        Bagel(config, BagelAutoencoder(config.vae)), tmp_path / "other", tokenizer=shapes_tokenizer
    )
    with pytest.raises(
        ValueError, match=r"mis-shaped: .*mlp_moe_gen\.down_proj\.weight \(\(32, 48\) vs \(32, 64\)\)"
    ):
        _run(tmp_path, tmp_path / "teacher", tmp_path / "other")


def test_deployment_prefills_with_the_original_weights(tiny_bagel, shapes_tokenizer) -> None:
    """Edits: the deployed student equals a model holding the student's generation weights whose context
    was prefilled by the teacher; text-to-image: it equals the plain student."""
    student = _distilled(tiny_bagel)
    weights = GenerationWeights.from_model(student)
    deployed = DeployedInferencer(copy.deepcopy(tiny_bagel), shapes_tokenizer, weights)
    plain = BagelInferencer(student, shapes_tokenizer)
    source = Image.new("RGB", (32, 32), "red")
    kwargs = {"num_timesteps": 3, "seed": 0}
    t2i = [inf.text_to_image("a red circle", cfg=default_t2i_cfg(), **kwargs)[0] for inf in (deployed, plain)]
    assert t2i[0].tobytes() == t2i[1].tobytes()
    edits = [
        inf.edit(source, "make it blue", cfg=default_edit_cfg(), **kwargs)[0] for inf in (deployed, plain)
    ]
    assert edits[0].tobytes() != edits[1].tobytes()
    assert deployed.model.text_guidance_embedder.mlp[2].weight.abs().sum() == 0  # its own stay zero
