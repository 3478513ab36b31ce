"""The installed ``hyperbagel`` command: help, config printing, a real tiny fit, bad-config errors."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hyperbagel.cli import main
from hyperbagel.cpu_precision import cpu_training_precision

BORING = "lightning.pytorch.demos.boring_classes"
MODEL_AND_DATA = ["--model", f"{BORING}.BoringModel", "--data", f"{BORING}.BoringDataModule"]
FIT_FLAGS = "--trainer.accelerator cpu --trainer.logger false --trainer.enable_checkpointing false".split()


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def _script() -> str:
    script = shutil.which("hyperbagel", path=str(Path(sys.executable).parent))
    assert script is not None, "the hyperbagel console script is not installed next to this Python"
    return script


def test_help_lists_subcommands(tmp_path: Path) -> None:
    result = _run([_script(), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in result.stdout


def test_module_entry_point_matches_script(tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "hyperbagel", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: hyperbagel ")
    assert "predict" in result.stdout


def test_print_config_resolves_class_paths_without_optimizer_options(tmp_path: Path) -> None:
    result = _run([_script(), "fit", "--print_config", *MODEL_AND_DATA], tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"class_path: {BORING}.BoringModel" in result.stdout
    config = yaml.safe_load(result.stdout)
    assert config["data"]["class_path"] == f"{BORING}.BoringDataModule"
    assert "optimizer" not in config and "lr_scheduler" not in config


def test_fit_trains_and_saves_resolved_config(tmp_path: Path) -> None:
    config_file = tmp_path / "boring.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 7,
                "model": {"class_path": f"{BORING}.BoringModel"},
                "data": {"class_path": f"{BORING}.BoringDataModule"},
            }
        )
    )
    root = tmp_path / "run"
    fit_args = [
        "fit",
        "--config",
        str(config_file),
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        str(root),
    ]
    result = _run([_script(), *fit_args, *FIT_FLAGS], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "`max_steps=2` reached" in result.stdout + result.stderr
    saved = yaml.safe_load((root / "config.yaml").read_text())
    assert saved["seed_everything"] == 7
    assert saved["trainer"]["max_steps"] == 2


def test_unknown_config_key_fails_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  class_path: {BORING}.BoringModel\ntrainer:\n  max_stepz: 2\n")
    result = _run([_script(), "fit", "--config", str(bad)], tmp_path)
    assert result.returncode != 0
    assert "max_stepz" in result.stderr


def test_rerun_into_same_dir_overwrites_saved_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["hyperbagel"])
    root = tmp_path / "run"
    for steps in (1, 2):
        quiet = "--trainer.enable_progress_bar false --trainer.enable_model_summary false".split()
        steps_and_dir = ["--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root)]
        main(["fit", *MODEL_AND_DATA, "--seed_everything", "0", *steps_and_dir, *quiet, *FIT_FLAGS])
        assert yaml.safe_load((root / "config.yaml").read_text())["trainer"]["max_steps"] == steps


@pytest.mark.parametrize(("slowdown", "expected"), [(8.0, "32-true"), (0.4, "bf16-mixed")])
def test_bf16_on_a_cpu_without_native_bf16_trains_in_float32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slowdown: float, expected: str
) -> None:
    monkeypatch.setattr(sys, "argv", ["hyperbagel"])
    monkeypatch.setattr("hyperbagel.cpu_precision.bf16_slowdown_on_cpu", lambda: slowdown)
    root = tmp_path / "run"
    quiet = "--trainer.enable_progress_bar false --trainer.enable_model_summary false".split()
    args = ["fit", *MODEL_AND_DATA, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(root)]
    args += ["--trainer.precision", "bf16-mixed", *quiet, *FIT_FLAGS]
    if expected == "32-true":
        with pytest.warns(UserWarning, match="8.0x as long as a float32 one"):
            main(args)
    else:
        main(args)
    assert yaml.safe_load((root / "config.yaml").read_text())["trainer"]["precision"] == expected


def test_bf16_fallback_only_where_training_runs_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hyperbagel.cpu_precision.bf16_slowdown_on_cpu", lambda: 8.0)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cpu_training_precision("32-true", "cpu") == "32-true"
    assert cpu_training_precision("bf16-mixed", "gpu") == "bf16-mixed"
    with pytest.warns(UserWarning, match="no native bf16"):
        assert cpu_training_precision("bf16-mixed", "auto") == "32-true"
