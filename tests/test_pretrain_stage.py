"""Stage 0 and the base stage: BAGEL's objective trains, selection of trainable parts, loss guard."""

import math

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from hyperbagel.backbone import language_model
from hyperbagel.backbone.checkpoint import save_pretrained
from hyperbagel.lightning_modules.base import NonFiniteLossError
from hyperbagel.lightning_modules.pretrain import PretrainStage
from hyperbagel.lightning_modules.schedules import WarmupCosineLR

from helpers import FixedPacks, quiet_trainer, run_hyperbagel


def _fit(stage: PretrainStage, steps: int, tmp_path) -> L.Trainer:
    stage.configure_model()
    loader = DataLoader(FixedPacks(stage.model.config), batch_size=None)
    trainer = quiet_trainer(tmp_path, steps)
    trainer.fit(stage, loader)
    return trainer


def test_objective_falls_and_frozen_parts_stay(tmp_path) -> None:
    torch.manual_seed(0)
    stage = PretrainStage(
        model="tiny",
        frozen=["vit_model.*"],
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        ce_weight=1.0,
    )
    stage.configure_model()
    vit_before = {k: v.clone() for k, v in stage.model.vit_model.state_dict().items()}
    first = stage.compute_losses(FixedPacks(stage.model.config).packed, "val")
    _fit(stage, 40, tmp_path)
    last = stage.compute_losses(FixedPacks(stage.model.config).packed, "val")
    assert last["ce"] < 0.5 * first["ce"] and last["mse"] < first["mse"]
    assert all(torch.equal(v, stage.model.vit_model.state_dict()[k]) for k, v in vit_before.items())
    names = {name for name, _ in stage.trainable_named_parameters()}
    assert names and not any(n.startswith("model.vit_model.") or n.endswith("pos_embed") for n in names)
    assert "model.llm2vae.weight" in names


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path) -> None:
    stage = PretrainStage(model="tiny", max_nonfinite_losses=3)
    stage.compute_losses = lambda batch, stage_name: {"loss": torch.tensor(math.nan, requires_grad=True)}
    stage.configure_model()
    before = {k: v.clone() for k, v in stage.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="4 non-finite losses in a row") as error:
        _fit(stage, 10, tmp_path)
    assert "train/loss = nan" in str(error.value) and "no checkpoint written yet" in str(error.value)
    assert stage.nonfinite_total == 4
    assert all(torch.equal(v, stage.model.state_dict()[k]) for k, v in before.items())


def test_bitsandbytes_8bit_optimizer_and_schedule_from_callables(tmp_path) -> None:
    stage = PretrainStage(
        model="tiny",
        optimizer=lambda params: bnb.optim.AdamW8bit(params, lr=1e-3, min_8bit_size=256),
        lr_scheduler=lambda optimizer: WarmupCosineLR(optimizer, warmup_steps=2, total_steps=6),
    )
    trainer = _fit(stage, 4, tmp_path)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        1e-3 * WarmupCosineLR.factor(trainer.lr_scheduler_configs[0].scheduler, 4)
    )


def test_a_stage_from_a_checkpoint_folder_trains_with_activation_checkpointing(
    tmp_path, tiny_bagel, shapes_tokenizer, monkeypatch
) -> None:
    """`from_pretrained` returns an eval-mode model; the stage must still recompute its decoder layers."""
    save_pretrained(tiny_bagel, tmp_path / "model", shapes_tokenizer)
    recomputed = []

    def counting_checkpoint(function, *args, **kwargs):
        recomputed.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(language_model, "checkpoint", counting_checkpoint)
    stage = PretrainStage(model=str(tmp_path / "model"), gradient_checkpointing=True)
    _fit(stage, 1, tmp_path)
    assert len(recomputed) == tiny_bagel.config.llm.num_hidden_layers
    assert all(module.training for module in stage.model.modules())


def test_nothing_trainable_is_refused() -> None:
    stage = PretrainStage(model="tiny", trainable=["model.nothing.*"])
    with pytest.raises(ValueError, match="no parameter is trainable"):
        stage.configure_model()


def test_stage0_fits_through_the_cli_with_tensorboard(tmp_path) -> None:
    """`hyperbagel fit` on a tiny model and a tiny exported shapes world writes TensorBoard scalars."""

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tmp_path / "stage0.yaml"
    config.write_text(
        f"""
seed_everything: 0
model:
  class_path: hyperbagel.lightning_modules.pretrain.PretrainStage
  init_args: {{model: tiny, tokenizer: shapes}}
data:
  class_path: hyperbagel.datamodules.shapes_datamodule.ShapesDataModule
  init_args:
    {{model_config: tiny, data_root: {tmp_path / "data"}, n_train: 8, n_val: 4, canvas_size: 24,
      expected_tokens: 200, max_tokens: 300, max_tokens_per_sample: 200}}
trainer:
  accelerator: cpu
  max_steps: 3
  val_check_interval: 3
  check_val_every_n_epoch: null
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_checkpointing: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {tmp_path / "logs"}, name: stage0}}
"""
    )
    result = run_hyperbagel("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    events = next((tmp_path / "logs" / "stage0").rglob("events.out.tfevents.*"))
    scalars = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/ce", "train/mse", "val/loss", "data/rows_read", "data/bad_rows"} <= set(
        scalars
    )


def test_warmup_cosine_schedule_values() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosineLR(optimizer, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([0.5, 1.0, 1.0, 0.8682, 0.55, 0.2318, 0.1, 0.1], abs=1e-4)
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        WarmupCosineLR(optimizer, warmup_steps=5, total_steps=5)
