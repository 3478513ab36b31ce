"""Write the stage's backbone as a BAGEL checkpoint folder during and after training.

The folder is what BAGEL's tooling, the next distillation stage (`model: <folder>`) and the serving
exporters load. A new export is written next to the destination and renamed over it only when complete,
so an interrupted export never leaves a half folder and the previous export survives until then.
Each export records which run wrote it (`export_run.json`); a run's first export moves a folder written by
another run aside (`<folder>.replaced-<time>`) instead of deleting it, so a short probe pointed at the same
folder never destroys a long run's weights. A run resumed from its checkpoint keeps its identity.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from hyperbagel.backbone.checkpoint import save_pretrained
from hyperbagel.backbone.sharding import full_state_dict, is_sharded
from hyperbagel.callbacks.ema import chosen_weights, require_ema

EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EXPORT_RUN_FILE = "export_run.json"


def export_run(folder: Path) -> dict[str, Any] | None:
    """The `{"run_id", "global_step"}` record of the run that wrote `folder` (None if missing/unreadable)."""
    try:
        record = json.loads((folder / EXPORT_RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def set_aside(folder: Path) -> Path:
    """Rename `folder` to an unused `<folder>.replaced-<UTC time>` beside it and return the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = folder.with_name(f"{folder.name}.replaced-{stamp}")
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = folder.with_name(f"{folder.name}.replaced-{stamp}-{suffix}")
    os.replace(folder, aside)
    return aside


def replace_folder(staging: Path, destination: Path) -> None:
    """Move the complete `staging` folder to `destination`, replacing what is there.

    The old folder is set aside by rename first and deleted only after the new one is in place.
    """
    aside = destination.with_name(f".{destination.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    if destination.exists():
        os.replace(destination, aside)
    os.replace(staging, destination)
    shutil.rmtree(aside, ignore_errors=True)


class FolderExport(Callback, ABC):
    """When to write an export folder: every `every_n_train_steps` optimizer steps, optionally after each
    validation, at fit end, and (rank 0, best effort) when training stops on an exception or Ctrl-C after
    at least one step, so a stopped run keeps its latest weights. Subclasses say what to write in
    `write(pl_module)`.

    Args:
        dirpath: the folder to (re)write; each write replaces it only when complete.
        use_ema: export the average of the trainer's `EMA` callback instead of the raw weights.
        dtype: "bfloat16", "float16" or "float32" for the written tensors; None keeps the training dtype.
        every_n_train_steps: also export every this many optimizer steps.
        on_validation: also export after every validation (not the sanity check).

    Rank 0 writes; every rank waits at a barrier until it is done. The run identity is callback state, so
    it is saved in Lightning checkpoints and a resumed run goes on replacing its own exports.
    """

    def __init__(
        self,
        dirpath: str | Path,
        use_ema: bool = False,
        dtype: str | None = None,
        every_n_train_steps: int | None = None,
        on_validation: bool = False,
    ) -> None:
        if dtype is not None and dtype not in EXPORT_DTYPES:
            raise ValueError(f"export dtype must be one of {sorted(EXPORT_DTYPES)} or None, got {dtype!r}")
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be at least 1, got {every_n_train_steps}")
        self.dirpath = Path(dirpath)
        self.use_ema = use_ema
        self.dtype = EXPORT_DTYPES[dtype] if dtype is not None else None
        self.every_n_train_steps = every_n_train_steps
        self.on_validation = on_validation
        self._last_export_step = -1
        self.run_id = uuid.uuid4().hex

    @property
    def state_key(self) -> str:
        """One state per destination, so several exports can share a trainer (and its checkpoints)."""
        return self._generate_state_key(dirpath=str(self.dirpath))

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run_id = state_dict.get("run_id", self.run_id)

    @abstractmethod
    def write(self, pl_module: LightningModule, collected: Any) -> None:
        """Write `self.dirpath` from the module's current weights (and what `collect` returned)."""

    def collect(self, pl_module: LightningModule) -> Any:
        """What only all ranks together can produce for `write` (a sharded model's whole weights); runs on
        every rank, with the chosen weights in place. Nothing by default."""
        return None

    def ready(self, pl_module: LightningModule) -> bool:
        """Whether there is anything to write yet (an exception may come before the model exists)."""
        return getattr(pl_module, "model", None) is not None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.use_ema:
            require_ema(trainer, type(self).__name__)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0:
            self.export(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self.export(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Keep what the run trained; a run that fails before its first step has nothing to keep (writing then
        would only leave a stage's output folder holding its untrained starting point)."""
        if not (trainer.is_global_zero and trainer.global_step > 0 and self.ready(pl_module)):
            return
        if is_sharded(pl_module):
            rank_zero_warn(
                f"{self.dirpath} is not written after the exception: gathering a sharded model needs every "
                "rank; the last checkpoint holds the weights"
            )
            return
        with chosen_weights(trainer, pl_module, self.use_ema, type(self).__name__):
            self._write(trainer, pl_module, None)  # no barrier: the other ranks may be gone

    def export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the folder now (once per global step)."""
        if trainer.global_step == self._last_export_step:
            return
        self._last_export_step = trainer.global_step
        with chosen_weights(trainer, pl_module, self.use_ema, type(self).__name__):
            collected = self.collect(pl_module)
            if trainer.is_global_zero:
                self._write(trainer, pl_module, collected)
        trainer.strategy.barrier(f"{type(self).__name__}_export")

    def _write(self, trainer: Trainer, pl_module: LightningModule, collected: Any) -> None:
        self._keep_other_runs_export()
        self.write(pl_module, collected)
        record = {"run_id": self.run_id, "global_step": trainer.global_step}
        (self.dirpath / EXPORT_RUN_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")

    def _keep_other_runs_export(self) -> None:
        """Move a folder that another run wrote (or that has no record) out of the way, with a warning."""
        if not self.dirpath.exists():
            return
        record = export_run(self.dirpath)
        if record is not None and record.get("run_id") == self.run_id:
            return
        aside = set_aside(self.dirpath)
        written_by = f"another run (step {record.get('global_step')})" if record else "an unrecorded run"
        rank_zero_warn(f"{self.dirpath} held an export of {written_by}; kept it as {aside}")


class BagelExport(FolderExport):
    """Exports `pl_module.model` (and its tokenizer) in BAGEL's checkpoint layout with `save_pretrained`;
    a sharded model is gathered to rank 0 first."""

    def collect(self, pl_module: LightningModule) -> dict[str, torch.Tensor] | None:
        return full_state_dict(pl_module.model) if is_sharded(pl_module.model) else None

    def write(self, pl_module: LightningModule, collected: dict[str, torch.Tensor] | None) -> None:
        parent = self.dirpath.parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".{self.dirpath.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)  # left by a crashed export
        staging.mkdir()
        try:
            save_pretrained(
                pl_module.model, staging, tokenizer=pl_module.tokenizer, dtype=self.dtype, state=collected
            )
            replace_folder(staging, self.dirpath)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
