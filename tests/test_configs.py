"""Every shipped stage config parses through the installed CLI (class paths, init args, interpolation)."""

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hyperbagel.datamodules.shapes_datamodule import ShapesDataModule

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(config: Path) -> None:
    script = shutil.which("hyperbagel", path=str(Path(sys.executable).parent))
    result = subprocess.run(
        [script, "fit", "--config", str(config), "--print_config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: hyperbagel." in result.stdout


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
