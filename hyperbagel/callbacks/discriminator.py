"""Adversarial discriminator as a callback: any stage can add an adversarial term without owning a critic.

The callback owns a multi-head discriminator, its optimizer and schedule, and its checkpoint state. A
stage asks it for the generator's adversarial term (`generator_loss`, through a frozen discriminator)
and hands it real and fake samples once per batch (`update`), which trains the discriminator through the
stage's `update` so accumulation, clipping, non-finite checks and step counting are the stage's. It logs
the discriminator's loss, logits and accuracy, and warns when it wins outright (every real and fake
sample classified right) for `win_patience` steps in a row, which usually means the generator's
adversarial signal has collapsed.

Two discriminators: `BagelDiscriminator` (the paper's: heads on several intermediate layers of a
trainable copy of the model's generation side, reading the latent tokens in the sample's context) and
`TokenDiscriminator` (a small transformer over latent tokens, no context; for tests and quick runs).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.distributed.tensor import DTensor

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.embeddings import TimestepEmbedder
from hyperbagel.backbone.inference import ImageContexts
from hyperbagel.backbone.packing import VaeImage, pack
from hyperbagel.backbone.sharding import (
    check_optimizer_shards,
    gathered,
    reshard_optimizer_state,
    resharded_like,
)
from hyperbagel.distillation.side_copies import SideCopy, generation_copy

log = logging.getLogger(__name__)

DISCRIMINATOR_LOSSES = ("hinge", "non_saturating")


def default_discriminator_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with GAN betas (0.0, 0.99): momentum lags a moving target."""
    return torch.optim.AdamW(params, lr=1e-5, betas=(0.0, 0.99), weight_decay=0.0)


class Discriminator(nn.Module):
    """Scores latent tokens x [B, N, D] at flow time t; returns one logit tensor per head (>0 = real)."""

    @abstractmethod
    def attach(self, model: Bagel) -> None:
        """Build the parts that depend on the generator (sizes, initial weights); called once."""

    @abstractmethod
    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: Any = None) -> list[torch.Tensor]:
        """Per-head logits, each [B, ...]; `condition` is whatever the stage conditions generation on."""


def _head(width: int, hidden: int) -> nn.Sequential:
    """LayerNorm -> Linear -> SiLU -> Linear(1): one per-token logit from one layer's features."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, 1))


class TokenDiscriminator(Discriminator):
    """A light discriminator: latent tokens + time embedding through a few transformer layers, one head
    after each layer (per-token logits). It ignores the condition.

    Args:
        width: transformer width. layers: transformer layers (= heads). heads: attention heads.
    """

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.width, self.num_layers, self.num_heads = width, layers, heads
        self.time_embedder = TimestepEmbedder(width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.heads = nn.ModuleList(_head(width, width) for _ in range(layers))
        self.input: nn.Linear | None = None

    def attach(self, model: Bagel) -> None:
        if self.input is None:
            self.input = nn.Linear(model.config.latent_token_dim, self.width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: Any = None) -> list[torch.Tensor]:
        if self.input is None:
            raise RuntimeError("TokenDiscriminator.attach(model) must run before it scores anything")
        time = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        h = self.input(x.to(self.input.weight.dtype)) + self.time_embedder(time)[:, None]
        logits = []
        for block, head in zip(self.blocks, self.heads):
            h = block(h)
            logits.append(head(h).squeeze(-1))
        return logits


class BagelDiscriminator(Discriminator):
    """The paper's discriminator: a trainable copy of the model's generation side (initialised from the
    model it is attached to; it shares the model's frozen understanding weights, or is a separate sharded
    copy under sharding) reads the latent tokens in their context, and one head per chosen layer turns that
    layer's latent-token features into per-token logits.

    Args:
        layers: hidden-state indexes the heads read (i = input of decoder layer i, num_layers = the last
            layer's output); default four evenly spaced ones ending at the last.
        head_hidden: width of each head's MLP.

    The condition is the stage's `ImageContexts` (its conditional rows are queried). The forward runs
    without activation checkpointing: its backward happens outside the weights' `applied` context.
    """

    def __init__(self, layers: Sequence[int] | None = None, head_hidden: int = 256) -> None:
        super().__init__()
        self.requested_layers = list(layers) if layers is not None else None
        self.head_hidden = head_hidden
        self.layers: list[int] = []
        self.backbone: SideCopy | None = None
        self.heads = nn.ModuleList()
        self._model: tuple[Bagel, ...] = ()  # the shared model, not a submodule (not in state_dict)

    def attach(self, model: Bagel) -> None:
        if self.backbone is not None:
            return
        num_layers = model.config.llm.num_hidden_layers
        layers = self.requested_layers or sorted({max(1, num_layers * k // 4) for k in (1, 2, 3, 4)})
        bad = [layer for layer in layers if not 0 <= layer <= num_layers]
        if bad:
            raise ValueError(f"discriminator layers {bad} are outside 0..{num_layers} of this model")
        self.layers = layers
        self.backbone = generation_copy(model, trainable=True)
        self.heads = nn.ModuleList(_head(model.config.hidden_size, self.head_hidden) for _ in layers)
        self._model = (model,)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: Any = None) -> list[torch.Tensor]:
        if self.backbone is None:
            raise RuntimeError("BagelDiscriminator.attach(model) must run before it scores anything")
        if not isinstance(condition, ImageContexts):
            raise TypeError(
                f"BagelDiscriminator needs the batch's ImageContexts, got {type(condition).__name__}"
            )
        model, (rows, tokens, _) = self._model[0], x.shape
        cache = condition.cache if rows == condition.cache.batch_size else condition.cache.narrow(0, rows)
        h, w = condition.grid
        patch = model.config.latent_patch_size
        query = VaeImage(latents=torch.zeros(1, h * patch, w * patch), noisy=True)
        packed = pack([[[query]]] * rows, model.config, rope_start=cache.rope_cursor[:rows])
        time = torch.as_tensor(t, dtype=torch.float32, device=model.device).reshape(-1)
        time = (time.expand(rows) if time.numel() == 1 else time).repeat_interleave(tokens)
        with self.backbone.applied(model) as backbone:
            decoder = backbone.language_model.model
            checkpointing, decoder.gradient_checkpointing = decoder.gradient_checkpointing, False
            try:
                out = backbone.forward_packed(
                    packed, x.reshape(rows * tokens, -1), time, cache=cache, output_hidden_states=True
                )
            finally:
                decoder.gradient_checkpointing = checkpointing
        logits = []
        for layer, head in zip(self.layers, self.heads):
            features = model.gather(out.hidden_states[layer], packed.vae_index).reshape(rows, tokens, -1)
            logits.append(head(features.to(head[0].weight.dtype)).squeeze(-1))
        return logits


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Hinge `relu(1 - D(real)) + relu(1 + D(fake))` or non-saturating
    `softplus(-D(real)) + softplus(D(fake))`, each a mean over elements, averaged over heads."""
    if kind == "hinge":
        terms = [F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean() for r, f in zip(real, fake)]
    else:
        terms = [F.softplus(-r.float()).mean() + F.softplus(f.float()).mean() for r, f in zip(real, fake)]
    return torch.stack(terms).mean()


def generator_adversarial_loss(fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Hinge `-D(fake)` or non-saturating `softplus(-D(fake))`, mean over elements, averaged over heads."""
    if kind == "hinge":
        return torch.stack([-f.float().mean() for f in fake]).mean()
    return torch.stack([F.softplus(-f.float()).mean() for f in fake]).mean()


def accuracy(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Fraction of logits on the right side of 0 (real > 0, fake < 0), over all heads and elements."""
    right = [(r > 0).float().flatten() for r in real] + [(f < 0).float().flatten() for f in fake]
    return torch.cat(right).mean()


def find_discriminator(trainer: Trainer) -> AdversarialDiscriminator | None:
    """The trainer's `AdversarialDiscriminator` callback, if it has one (stages add its term only then)."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, AdversarialDiscriminator)), None)


class AdversarialDiscriminator(Callback):
    """Owns a discriminator for the stage it is attached to (a `ManualStage`).

    Args:
        discriminator: the network (default `BagelDiscriminator()`, the paper's), built from the stage's
            model at fit start.
        loss: "hinge" or "non_saturating".
        optimizer / lr_scheduler: factories for the discriminator's optimizer and schedule.
        gradient_clip_val: clip the discriminator's gradient norm.
        win_patience: warn after this many steps in a row at accuracy 1 (0 disables the warning).
    """

    def __init__(
        self,
        discriminator: Discriminator | None = None,
        loss: str = "hinge",
        optimizer: OptimizerCallable = default_discriminator_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = 1.0,
        win_patience: int = 200,
    ) -> None:
        if loss not in DISCRIMINATOR_LOSSES:
            raise ValueError(f"discriminator loss must be one of {DISCRIMINATOR_LOSSES}, got {loss!r}")
        if win_patience < 0:
            raise ValueError(f"win_patience must be >= 0, got {win_patience}")
        self.discriminator = discriminator if discriminator is not None else BagelDiscriminator()
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.gradient_clip_val = gradient_clip_val
        self.win_patience = win_patience
        self.win_streak = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self._pending: dict[str, Any] | None = None

    # --- lifecycle -------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from hyperbagel.lightning_modules.manual import ManualStage  # the stages import this module

        if not isinstance(pl_module, ManualStage):
            raise TypeError(
                "AdversarialDiscriminator trains through a ManualStage's update(); "
                f"got {type(pl_module).__name__}"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.build(pl_module)

    def build(self, pl_module: LightningModule) -> None:
        """Build the discriminator from the stage's model, its optimizer and schedule; apply a checkpoint."""
        if self.optimizer is None:
            self.discriminator.attach(pl_module.model)
            self.discriminator.to(pl_module.device).train()
            params = [p for p in self.discriminator.parameters() if p.requires_grad]
            self.optimizer = self.optimizer_factory(params)
            check_optimizer_shards(self.optimizer)
            self.scheduler = self.scheduler_factory(self.optimizer) if self.scheduler_factory else None
        self._apply_pending()

    def _apply_pending(self) -> None:
        if self._pending is not None:
            state, self._pending = self._pending, None
            own, stored = self.discriminator.state_dict(), state["discriminator"]
            stored = {k: resharded_like(v, own[k]) if k in own else v for k, v in stored.items()}
            self.discriminator.load_state_dict(stored)
            self.optimizer.load_state_dict(state["optimizer"])
            reshard_optimizer_state(self.optimizer)
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.win_streak = state["win_streak"]

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return dict(self._pending or {})
        return {  # a sharded backbone's state whole on rank 0, which alone saves callback states
            "discriminator": gathered(self.discriminator.state_dict()),
            "optimizer": gathered(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "win_streak": self.win_streak,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Kept until `build`, or applied at once when built already: strategies that restore after their
        setup (sharded ones) restore after `on_fit_start`, where the discriminator is built."""
        if state_dict:
            self._pending = state_dict
            if self.optimizer is not None:
                self._apply_pending()

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Average the discriminator's gradients over ranks: it lives outside the strategy's wrapper (a
        sharded backbone's gradients are averaged by FSDP already)."""
        if optimizer is not self.optimizer or trainer.world_size == 1:
            return
        for param in self.discriminator.parameters():
            if param.grad is not None and not isinstance(param.grad, DTensor):
                torch.distributed.all_reduce(param.grad)
                param.grad.div_(trainer.world_size)

    # --- what stages call ------------------------------------------------------------------------------
    def _require_built(self) -> None:
        if self.optimizer is None:
            raise RuntimeError("the discriminator is built at fit start; call build(stage) before using it")

    def generator_loss(self, fake: torch.Tensor, t: torch.Tensor, condition: Any = None) -> torch.Tensor:
        """The generator's adversarial term; gradients reach `fake` but not the discriminator."""
        self._require_built()
        flags = [(p, p.requires_grad) for p in self.discriminator.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            return generator_adversarial_loss(self.discriminator(fake, t, condition), self.loss)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def update(
        self,
        pl_module: LightningModule,
        real: torch.Tensor,
        fake: torch.Tensor,
        t: torch.Tensor,
        condition: Any = None,
    ) -> dict[str, torch.Tensor]:
        """One discriminator update on detached `real` and `fake` samples through the stage's `update`."""
        self._require_built()
        real_logits = self.discriminator(real.detach(), t, condition)
        fake_logits = self.discriminator(fake.detach(), t, condition)
        losses = {
            "loss": discriminator_loss(real_logits, fake_logits, self.loss),
            "accuracy": accuracy(real_logits, fake_logits),
            "real_logit": torch.stack([r.float().mean() for r in real_logits]).mean(),
            "fake_logit": torch.stack([f.float().mean() for f in fake_logits]).mean(),
        }
        if pl_module.update("discriminator", losses, self.optimizer, self.scheduler, self.gradient_clip_val):
            self._watch(float(losses["accuracy"]), pl_module.global_step)
        return losses

    def _watch(self, batch_accuracy: float, step: int) -> None:
        self.win_streak = self.win_streak + 1 if batch_accuracy >= 1.0 else 0
        if self.win_patience and self.win_streak and self.win_streak % self.win_patience == 0:
            log.warning(
                "the discriminator has classified every real and fake sample correctly for %d batches in a "
                "row (global step %d): the generator's adversarial term may carry no useful gradient; "
                "consider a lower discriminator learning rate, a lighter discriminator or a larger "
                "consistency weight",
                self.win_streak,
                step,
            )
