"""Manual-optimization base: one step per optimizer per (accumulated) batch, exact resume, NaN faults."""

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from hyperbagel.callbacks.ema import EMA
from hyperbagel.lightning_modules.manual import ManualStage, NonFiniteLossError, OptimizerSpec

from helpers import CountSteps, quiet_trainer


class TwoModels(ManualStage):
    """The tiny backbone's latent projections as "generator" plus a linear "critic", each with a loss
    drawn from `batch_generator`; `nan_at` makes the critic's loss NaN at those batch indexes."""

    def __init__(self, nan_at: tuple[int, ...] = (), **kwargs) -> None:
        kwargs.setdefault("optimizer", partial(torch.optim.AdamW, lr=1e-2))
        kwargs.setdefault("lr_scheduler", partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.7))
        super().__init__(model="tiny", tokenizer="shapes", trainable=["vae2llm.*", "llm2vae.*"], **kwargs)
        self.critic = nn.Linear(16, 1)
        self.nan_at = nan_at
        self.calls: list[str] = []

    def optimizer_specs(self) -> list[OptimizerSpec]:
        critic = OptimizerSpec(
            "critic", list(self.critic.parameters()), partial(torch.optim.SGD, lr=0.1), gradient_clip_val=0.5
        )
        return [*super().optimizer_specs(), critic]

    def _generator_loss(self) -> torch.Tensor:
        x = self.randn((3, self.model.config.latent_token_dim), like=self.model.vae2llm.weight)
        return (self.model.llm2vae(self.model.vae2llm(x)) - 1.0).pow(2).mean()

    def training_updates(self, batch, batch_idx) -> None:
        self.calls.append("generator")
        self.update("generator", {"loss": self._generator_loss()})
        x = self.randn((4, 16))
        critic = (self.critic(x) - batch.float()).pow(2).mean()
        if batch_idx in self.nan_at:
            critic = critic * math.nan
        self.calls.append("critic")
        self.update("critic", {"loss": critic, "mean": self.critic(x).mean()})

    def compute_losses(self, batch, stage):
        return {"loss": self._generator_loss()}


def _trainer(tmp_path: Path, max_steps: int, callbacks: list, **kwargs) -> Trainer:
    return quiet_trainer(tmp_path, max_steps, callbacks, **kwargs)


class ResumableBatches:
    """Batches `i % 7`; the position is saved in the checkpoint, so a resumed run reads what comes next."""

    def __init__(self, length: int = 64) -> None:
        self.length, self.position = length, 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        while self.position < self.length:
            self.position += 1
            yield torch.tensor((self.position - 1) % 7)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _loader(length: int = 64) -> ResumableBatches:
    return ResumableBatches(length)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_each_optimizer_steps_once_per_accumulated_batch(tmp_path, accumulate) -> None:
    seed_everything(0)
    stage = TwoModels(accumulate_grad_batches=accumulate)
    counter = CountSteps()
    trainer = _trainer(tmp_path, 3, [counter])
    trainer.fit(stage, _loader())
    assert counter.counts == [3, 3]
    assert trainer.global_step == 3
    assert stage.calls == ["generator", "critic"] * (3 * accumulate)
    generator, critic = trainer.optimizers
    assert generator.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.7**3)  # scheduler stepped per step
    assert all(p.grad is None for p in stage.parameters())  # zeroed after each step


def test_gradient_clipping_bounds_each_models_norm(tmp_path) -> None:
    seed_everything(0)
    stage = TwoModels(gradient_clip_val=1e-3)
    norms: dict[str, float] = {}

    class Record(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            pass

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            for key in ("train/generator/grad_norm", "train/critic/grad_norm"):
                norms[key] = float(trainer.callback_metrics[key])

    before = {n: p.detach().clone() for n, p in stage.critic.named_parameters()}
    trainer = _trainer(tmp_path, 1, [Record()])
    trainer.fit(stage, _loader())
    assert set(norms) == {"train/generator/grad_norm", "train/critic/grad_norm"}
    # the critic's SGD step is bounded by lr * clip (0.1 * 0.5) even though its raw norm is larger
    step = torch.cat([(p.detach() - before[n]).flatten() for n, p in stage.critic.named_parameters()])
    assert norms["train/critic/grad_norm"] > 0.5
    assert float(step.norm()) == pytest.approx(0.1 * 0.5, rel=1e-4)


def _state(stage: TwoModels, ema: EMA) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in stage.state_dict().items()}
    state.update({f"ema.{k}": v.clone() for k, v in ema.ema_state_dict().items()})
    return state


def test_resume_from_mid_run_checkpoint_is_bit_exact(tmp_path, recwarn) -> None:
    steps = 6

    def run(root: Path, max_steps: int, ckpt_path: str | None = None) -> tuple[TwoModels, EMA, Trainer]:
        seed_everything(0)
        stage = TwoModels(accumulate_grad_batches=2)
        ema = EMA(decay=0.5)
        checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=steps // 2, save_top_k=-1)
        trainer = _trainer(root, max_steps, [ema, checkpoints])
        trainer.fit(stage, _loader(), ckpt_path=ckpt_path)
        return stage, ema, trainer

    straight, straight_ema, _ = run(tmp_path / "straight", steps)
    run(tmp_path / "first_half", steps // 2)
    middle = tmp_path / "first_half" / f"epoch=0-step={steps // 2}.ckpt"
    resumed, resumed_ema, trainer = run(tmp_path / "resumed", steps, str(middle))
    assert trainer.global_step == steps
    expected, got = _state(straight, straight_ema), _state(resumed, resumed_ema)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not torch.equal(straight.critic.weight, TwoModels().critic.weight)  # training did move it
    # so Lightning's warning that manual-optimization checkpoints hold the post-step state is not shown
    assert not [w for w in recwarn if "Using ModelCheckpoint with manual" in str(w.message)]


def test_nonfinite_loss_stops_naming_step_term_and_checkpoint(tmp_path) -> None:
    seed_everything(0)
    stage = TwoModels(nan_at=(2,))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(NonFiniteLossError) as error:
        _trainer(tmp_path, 5, [checkpoints]).fit(stage, _loader())
    message = str(error.value)
    assert "critic/loss = nan" in message and "critic/mean" not in message
    assert "global step 2" in message
    assert str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt") in message


def test_nonfinite_loss_skips_the_step_when_configured(tmp_path) -> None:
    seed_everything(0)
    stage = TwoModels(nan_at=(1,), on_nonfinite="skip")
    counter = CountSteps()
    trainer = _trainer(tmp_path, 3, [counter])
    trainer.fit(stage, _loader())
    assert trainer.global_step == 3 and stage.nonfinite_total == 1
    # batch 1 stepped the generator before the critic's NaN; the critic skipped it: 4 batches, 3 steps
    assert counter.counts == [4, 3]
    assert all(p.grad is None for p in stage.parameters())


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path) -> None:
    seed_everything(0)
    stage = TwoModels(nan_at=(1, 2, 3), on_nonfinite="skip", max_nonfinite_losses=2)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        _trainer(tmp_path, 6, []).fit(stage, _loader())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="on_nonfinite"):
        TwoModels(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        TwoModels(accumulate_grad_batches=0)
