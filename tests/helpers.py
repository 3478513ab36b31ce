"""Helpers shared by the tests: a quiet CPU Trainer, a batch recorder, an optimizer-step counter, the
installed `hyperbagel` command, the benchmark scripts as modules and a fixed training pack."""

import importlib.util
import io
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset

from hyperbagel.backbone.packing import PackedSequence, TextBlock, VaeImage, VitImage, pack


def quiet_trainer(tmp_path: Path, max_steps: int, callbacks: list[Callback] = (), **options: Any) -> Trainer:
    """A CPU Trainer in `tmp_path` with no logger, progress bar or model summary, that checkpoints only
    when a ModelCheckpoint is among the callbacks; `options` override any Trainer argument."""
    callbacks = list(callbacks)
    settings = {
        "accelerator": "cpu",
        "max_steps": max_steps,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
        "default_root_dir": tmp_path,
        "callbacks": callbacks,
    }
    return Trainer(**(settings | options))


class BatchRecorder(LightningModule):
    """Trains nothing; keeps `describe(batch)` for every training batch it is handed (data-order tests)."""

    def __init__(self, describe: Callable[[Any], Any]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.describe = describe
        self.seen: list = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(self.describe(batch))
        return self.weight.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def record_batches(
    datamodule: Any,
    max_steps: int,
    describe: Callable[[Any], Any],
    ckpt_path: str | None = None,
    save_to: Path | None = None,
) -> list:
    """`describe(batch)` of each batch a quiet fit of `max_steps` consumes (optionally resumed from, or
    saved to, a checkpoint)."""
    recorder = BatchRecorder(describe)
    trainer = quiet_trainer(Path(save_to).parent if save_to else Path.cwd(), max_steps)
    trainer.fit(recorder, datamodule=datamodule, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return recorder.seen


def roundtrip(state: Any) -> Any:
    """`state` through torch.save / torch.load, as a checkpoint carries it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


class CountSteps(Callback):
    """Counts `step()` calls of every optimizer the stage owns (`counts[i]` for optimizer i)."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.counts = [0] * len(trainer.optimizers)
        for i, optimizer in enumerate(trainer.optimizers):
            optimizer.register_step_post_hook(lambda *_, i=i: self.counts.__setitem__(i, self.counts[i] + 1))


def run_hyperbagel(*args: str, timeout: int = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the `hyperbagel` console script installed beside this Python, capturing its output."""
    script = shutil.which("hyperbagel", path=str(Path(sys.executable).parent))
    return subprocess.run([script, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def load_benchmark(name: str) -> ModuleType:
    """`benchmarks/<name>.py` imported as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FixedPacks(Dataset):
    """The same few packs over and over: enough to see a real objective fall."""

    def __init__(self, config, length: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        image = lambda side: torch.rand(3, side, side, generator=generator) * 2 - 1  # noqa: E731
        samples = [
            [TextBlock([10, 11, 12]), VaeImage(pixels=image(16), noisy=True)],
            [VitImage(image(8)), TextBlock([13, 14]), TextBlock([20, 21, 22], loss=True)],
            [
                VaeImage(pixels=image(16)),
                VitImage(image(8)),
                TextBlock([15]),
                VaeImage(pixels=image(16), noisy=True),
            ],
        ]
        self.packed = pack([samples], config)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> PackedSequence:
        return self.packed
