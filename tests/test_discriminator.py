"""Adversarial discriminator callback: losses by hand, frozen generator term, updates, checkpoint, warning."""

import logging
from functools import partial

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from hyperbagel.callbacks.discriminator import (
    AdversarialDiscriminator,
    Discriminator,
    TokenDiscriminator,
    accuracy,
    discriminator_loss,
    generator_adversarial_loss,
)
from hyperbagel.lightning_modules.manual import ManualStage
from hyperbagel.lightning_modules.pretrain import PretrainStage

from helpers import quiet_trainer


class ToyGAN(ManualStage):
    """Generator: the tiny backbone's `llm2vae` applied to noise; real samples: constant tokens."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("optimizer", partial(torch.optim.AdamW, lr=1e-2))
        super().__init__(model="tiny", tokenizer="shapes", trainable=["llm2vae.*"], **kwargs)

    def discriminator(self) -> AdversarialDiscriminator:
        return next(cb for cb in self.trainer.callbacks if isinstance(cb, AdversarialDiscriminator))

    def fake(self) -> torch.Tensor:
        return self.model.llm2vae(self.randn((2, 4, self.model.config.hidden_size)))

    def real(self) -> torch.Tensor:
        return torch.ones(2, 4, self.model.config.latent_token_dim)

    def training_updates(self, batch, batch_idx) -> None:
        critic, t = self.discriminator(), torch.tensor(0.5)
        fake = self.fake()
        adversarial = critic.generator_loss(fake, t)
        self.update("generator", {"loss": adversarial, "adversarial": adversarial})
        critic.update(self, self.real(), fake, t)

    def compute_losses(self, batch, stage):
        return {"loss": self.fake().pow(2).mean()}


class SignOfMean(Discriminator):
    """Logit = scale * mean of a token's channels: real (+1) and fake (-1) tokens are told apart always."""

    def attach(self, model) -> None:
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, t, condition=None):
        return [self.scale * x.mean(dim=-1)]


class AlwaysWins(ToyGAN):
    def fake(self) -> torch.Tensor:
        return -torch.ones(2, 4, self.model.config.latent_token_dim) + 0 * super().fake()


def _trainer(tmp_path, steps: int, callbacks: list) -> Trainer:
    return quiet_trainer(tmp_path, steps, callbacks)


def _loader(length: int = 32):
    return torch.utils.data.DataLoader(torch.zeros(length), batch_size=None)


def _token_critic(**kwargs) -> AdversarialDiscriminator:
    kwargs.setdefault("optimizer", partial(torch.optim.AdamW, lr=1e-3, betas=(0.0, 0.99)))
    return AdversarialDiscriminator(TokenDiscriminator(width=16, layers=2, heads=2), **kwargs)


def test_losses_and_accuracy_by_hand() -> None:
    real = [torch.tensor([2.0, 0.5]), torch.tensor([-1.0])]
    fake = [torch.tensor([-3.0, 0.0]), torch.tensor([0.5])]
    hinge_head0 = (0.0 + 0.5) / 2 + (0.0 + 1.0) / 2
    hinge_head1 = 2.0 + 1.5
    assert float(discriminator_loss(real, fake, "hinge")) == pytest.approx((hinge_head0 + hinge_head1) / 2)
    softplus = torch.nn.functional.softplus
    ns_head0 = float(softplus(-real[0]).mean() + softplus(fake[0]).mean())
    ns_head1 = float(softplus(torch.tensor(1.0)) + softplus(torch.tensor(0.5)))
    assert float(discriminator_loss(real, fake, "non_saturating")) == pytest.approx((ns_head0 + ns_head1) / 2)
    assert float(generator_adversarial_loss(fake, "hinge")) == pytest.approx((1.5 + -0.5) / 2)
    assert float(accuracy(real, fake)) == pytest.approx(3 / 6)  # 2.0, 0.5 real right; -3.0 fake right


def test_generator_term_reaches_the_sample_but_not_the_discriminator() -> None:
    seed_everything(0)
    stage = ToyGAN()
    stage.configure_model()
    critic = _token_critic()
    critic.build(stage)
    fake = torch.randn(2, 4, stage.model.config.latent_token_dim, requires_grad=True)
    critic.generator_loss(fake, torch.tensor(0.3)).backward()
    assert fake.grad is not None and float(fake.grad.abs().sum()) > 0
    assert all(p.grad is None and p.requires_grad for p in critic.discriminator.parameters())


def test_training_updates_the_discriminator_once_per_batch_and_resumes_exactly(tmp_path) -> None:
    def run(root, steps, ckpt_path=None):
        seed_everything(0)
        stage, critic = ToyGAN(), _token_critic(gradient_clip_val=0.5)
        checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
        trainer = _trainer(root, steps, [critic, checkpoints])
        counts = []
        stage.on_train_start = lambda: critic.optimizer.register_step_post_hook(lambda *_: counts.append(1))
        trainer.fit(stage, _loader(), ckpt_path=ckpt_path)
        return stage, critic, trainer, len(counts)

    stage, critic, trainer, steps = run(tmp_path / "straight", 4)
    assert steps == 4 and trainer.global_step == 4
    assert {
        "train/discriminator/loss",
        "train/discriminator/accuracy",
        "train/discriminator/grad_norm",
    } <= set(trainer.callback_metrics)
    saved = torch.load(tmp_path / "straight" / "epoch=0-step=2.ckpt", weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if k.startswith("AdversarialDiscriminator"))
    assert {"discriminator", "optimizer", "scheduler", "win_streak"} <= set(state)

    resumed_stage, resumed, _, resumed_steps = run(
        tmp_path / "resumed", 4, str(tmp_path / "straight" / "epoch=0-step=2.ckpt")
    )
    assert resumed_steps == 2
    for (name, a), b in zip(
        critic.discriminator.state_dict().items(), resumed.discriminator.state_dict().values()
    ):
        assert torch.equal(a, b), name
    assert torch.equal(stage.model.llm2vae.weight, resumed_stage.model.llm2vae.weight)


def test_a_discriminator_that_always_wins_is_reported(tmp_path, caplog) -> None:
    seed_everything(0)
    critic = AdversarialDiscriminator(
        SignOfMean(), win_patience=3, optimizer=partial(torch.optim.SGD, lr=0.0)
    )
    with caplog.at_level(logging.WARNING, logger="hyperbagel.callbacks.discriminator"):
        _trainer(tmp_path, 7, [critic]).fit(AlwaysWins(), _loader())
    warnings = [r.getMessage() for r in caplog.records if "correctly for" in r.getMessage()]
    assert len(warnings) == 2 and "for 3 batches in a row" in warnings[0] and "for 6 batches" in warnings[1]
    assert critic.win_streak == 7


def test_only_manual_stages_and_known_losses_are_accepted(tmp_path) -> None:
    with pytest.raises(ValueError, match="discriminator loss"):
        AdversarialDiscriminator(TokenDiscriminator(), loss="wasserstein")
    with pytest.raises(TypeError, match="ManualStage"):
        _trainer(tmp_path, 1, [_token_critic()]).fit(PretrainStage(model="tiny"), _loader())
