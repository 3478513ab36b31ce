"""Every shipped stage config parses through the installed CLI (class paths, init args, interpolation)."""

import inspect
from pathlib import Path

import pytest
import yaml

from hyperbagel.cli import HyperBagelCLI
from hyperbagel.datamodules.shapes_datamodule import ShapesDataModule
from hyperbagel.distillation.generation_weights import is_generation_key

from helpers import run_hyperbagel

ROOT = Path(__file__).parents[1] / "configs"
CONFIGS = sorted(ROOT.rglob("*.yaml"))
BORING_DATA = "lightning.pytorch.demos.boring_classes.BoringDataModule"
LAYERED_OVER = {  # ablation config -> the config it is layered over
    **{path: ROOT / "shapes" / "draft_head.yaml" for path in ROOT.glob("shapes/draft_head_ablations/*.yaml")},
    ROOT / "shapes" / "distill_ablations" / "tscd_mse.yaml": ROOT / "shapes" / "distill_tscd.yaml",
    ROOT / "shapes" / "distill_ablations" / "tscd_rollout.yaml": ROOT / "shapes" / "distill_tscd.yaml",
    ROOT / "shapes" / "distill_ablations" / "dmd_sde.yaml": ROOT / "shapes" / "distill_dmdo.yaml",
}


def _holds(settings: dict, subset: dict) -> bool:
    """Whether nested `settings` carry every value of nested `subset`."""
    return all(
        _holds(settings.get(key) or {}, value) if isinstance(value, dict) else settings.get(key) == value
        for key, value in subset.items()
    )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(config: Path) -> None:
    base = LAYERED_OVER.get(config)
    assert base or not config.parent.name.endswith("_ablations"), f"say what {config} is layered over"
    layers = [base, config] if base else [config]
    result = run_hyperbagel(
        "fit", *(arg for layer in layers for arg in ("--config", str(layer))), "--print_config", timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: hyperbagel." in result.stdout
    if base:  # the override lands, the base's other settings stay, and the run writes to its own folders
        printed = yaml.safe_load(result.stdout)
        expected = yaml.safe_load(config.read_text())
        assert _holds(printed["model"]["init_args"], expected["model"]["init_args"])
        if "draft" in printed["model"]["init_args"]:
            assert printed["model"]["init_args"]["draft"]["num_layers"] == 1
        callbacks = printed["trainer"]["callbacks"]
        assert len(callbacks) == len(expected["trainer"]["callbacks"])
        assert all(map(_holds, callbacks, expected["trainer"]["callbacks"]))
        assert config.stem in printed["trainer"]["logger"]["init_args"]["name"]


@pytest.mark.parametrize("override", ["command line", "overlay config"])
def test_a_later_max_steps_reaches_the_schedules_interpolated_total(override: str, tmp_path: Path) -> None:
    """`total_steps: ${trainer.max_steps}` must follow the max_steps the run ends with, not the first file's
    (resolved per file, a 7000-step run decayed its cosine over the config's 1200 and idled at the floor)."""
    if override == "command line":
        args = ["--trainer.max_steps", "7000"]
    else:
        overlay = tmp_path / "longer.yaml"
        overlay.write_text("trainer:\n  max_steps: 7000\n")
        args = ["--config", str(overlay)]
    config = ROOT / "shapes" / "distill_tscd.yaml"
    result = run_hyperbagel("fit", "--config", str(config), *args, "--print_config", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["trainer"]["max_steps"] == 7000
    assert printed["model"]["init_args"]["lr_scheduler"]["init_args"]["total_steps"] == 7000


EXPORT_SETTINGS = ("n_train", "n_val", "vqa_follow_ups", "canvas_size", "world_seed", "row_group_size")


def test_shapes_configs_sharing_a_data_root_export_it_alike() -> None:
    """Configs reading one exported world must agree on its export settings, or each run re-exports it."""
    defaults = inspect.signature(ShapesDataModule.__init__).parameters
    by_root: dict[str, dict[str, tuple]] = {}
    for config in CONFIGS:
        data = yaml.safe_load(config.read_text()).get("data") or {}
        if not data.get("class_path", "").endswith("ShapesDataModule"):
            continue
        args = data.get("init_args", {})
        settings = tuple(args.get(name, defaults[name].default) for name in EXPORT_SETTINGS)
        by_root.setdefault(args.get("data_root", defaults["data_root"].default), {})[config.name] = settings
    assert by_root
    for root, settings in by_root.items():
        assert len(set(settings.values())) == 1, f"{root}: {settings}"


STAGE_TRAINS = {  # stage class -> what trains when a config does not say
    "hyperbagel.lightning_modules.pretrain.PretrainStage": "all",
    "hyperbagel.lightning_modules.distill_cfg.CFGDistillStage": "generation",
    "hyperbagel.lightning_modules.distill_tscd.DistillTSCDStage": "generation",
    "hyperbagel.lightning_modules.distill_dmdo.DistillDMDOStage": "generation",
}


@pytest.mark.parametrize("class_path", sorted(STAGE_TRAINS), ids=lambda p: p.rsplit(".", 1)[1])
def test_stage_built_by_the_cli_trains_its_default_parameters(class_path: str) -> None:
    """LightningCLI passes `trainable: null` explicitly, so a stage's default must survive that."""
    cli = HyperBagelCLI(
        args=["--model", class_path, "--model.init_args.model", "tiny", "--data", BORING_DATA],
        run=False,
    )
    stage = cli.model
    stage.configure_model()
    trained = {name.removeprefix("model.") for name, _ in stage.trainable_named_parameters()}
    frozen_by_design = {n for n, p in stage.model.named_parameters() if n.endswith("pos_embed")}
    everything = {n for n, _ in stage.model.named_parameters()} - frozen_by_design
    expected = everything if STAGE_TRAINS[class_path] == "all" else set(filter(is_generation_key, everything))
    assert trained == expected
