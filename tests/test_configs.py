"""Every shipped stage config parses through the installed CLI (class paths, init args, interpolation)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
