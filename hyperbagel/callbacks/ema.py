"""Exponential moving average of the weights a stage trains, and nothing else.

Only `pl_module.trainable_named_parameters()` are averaged: frozen parts never change, so averaging them
would only cost memory, and side models (discriminators, reward models) must keep their raw weights. The
average lives in the checkpoint's callback state, so a resumed run continues it exactly; a checkpoint
that is restored before the model exists (Lightning restores callbacks early) is held until the first
hook that sees the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.distributed.tensor import DTensor

from hyperbagel.backbone.sharding import gathered, resharded_like


def find_ema(trainer: Trainer) -> EMA | None:
    """The trainer's EMA callback, if it has one."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)


def require_ema(trainer: Trainer, user: str) -> EMA:
    """The trainer's EMA callback; a clear error naming `user` when there is none."""
    ema = find_ema(trainer)
    if ema is None:
        raise ValueError(
            f"{user}(use_ema=True) needs an EMA callback in the trainer's callbacks "
            "(add hyperbagel.callbacks.ema.EMA, or set use_ema=False)"
        )
    return ema


def chosen_weights(
    trainer: Trainer, pl_module: LightningModule, use_ema: bool, user: str
) -> AbstractContextManager[None]:
    """Context in which the module holds the EMA average (`use_ema`) or its raw weights, whichever of the
    two is swapped in at the moment (validation may run on the average)."""
    if use_ema:
        return require_ema(trainer, user).swapped_in(pl_module)
    ema = find_ema(trainer)
    return ema.swapped_out(pl_module) if ema is not None else nullcontext()


class EMA(Callback):
    """Keeps `ema = decay * ema + (1 - decay) * weights` of the trainable parameters after optimizer steps.

    Args:
        decay: per-update decay (BAGEL: 0.9999 in pre-training, 0.995 in SFT).
        update_every_n_steps: update once every this many optimizer steps (the decay applies per update).
        start_step: until this global step the average just copies the weights, then it starts averaging.
        warmup: ramp the decay as `min(decay, (1 + n) / (10 + n))` over the first updates n, so an
            average started from random weights forgets them quickly.
        use_for_validation: validate with the averaged weights (swapped in, then swapped back).
        cpu_offload: keep the average in CPU memory instead of next to the weights (not for sharded
            parameters: a shard's average stays sharded beside it).

    The average is kept in at least float32: a 0.9999 update is below bfloat16's resolution.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        warmup: bool = False,
        use_for_validation: bool = False,
        cpu_offload: bool = False,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"EMA update_every_n_steps must be at least 1, got {update_every_n_steps}")
        if start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {start_step}")
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.warmup = warmup
        self.use_for_validation = use_for_validation
        self.cpu_offload = cpu_offload
        self.num_updates = 0
        self._last_step = -1
        self._names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._ema: list[torch.Tensor] = []
        self._pending: dict[str, Any] | None = None
        self._swapped: list[torch.Tensor] | None = None  # the raw weights while the average is swapped in

    # --- state ---------------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return bool(self._ema)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name (as in the LightningModule, "model.…"): averaged tensor}."""
        if not self.initialized and self._pending is not None:
            return dict(self._pending["ema"])
        return dict(zip(self._names, self._ema))

    def state_dict(self) -> dict[str, Any]:
        if not self.initialized:
            return dict(self._pending or {})
        return {
            "ema": gathered(self.ema_state_dict()),  # a shard's average whole on rank 0, which saves it
            "num_updates": self.num_updates,
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._pending = state_dict
        if self.initialized:
            self._load_pending()

    def _load_pending(self) -> None:
        state, self._pending = self._pending, None
        stored = state["ema"]
        missing = sorted(set(self._names) - set(stored))
        unexpected = sorted(set(stored) - set(self._names))
        if missing or unexpected:
            raise ValueError(
                "the checkpoint's EMA does not cover the stage's trainable parameters: "
                f"missing {missing[:10]} ({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}); "
                "the trainable / frozen selection changed since it was saved"
            )
        for name, average in zip(self._names, self._ema):
            if stored[name].shape != average.shape:
                raise ValueError(
                    f"checkpoint EMA of {name} has shape {tuple(stored[name].shape)}, "
                    f"the parameter {tuple(average.shape)}"
                )
            average.copy_(resharded_like(stored[name], average))
        self.num_updates = state["num_updates"]
        self._last_step = state["last_step"]

    @torch.no_grad()
    def _ensure(self, pl_module: LightningModule) -> None:
        """Start the average from the current weights, then apply a checkpoint's average if one waits."""
        if not self.initialized:
            named = pl_module.trainable_named_parameters()
            self._names = [name for name, _ in named]
            self._params = [param for _, param in named]
            self._ema = [self._like(param).copy_(param) for param in self._params]
        if self._pending is not None:
            self._load_pending()

    def _like(self, param: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(param.dtype, torch.float32)
        if isinstance(param, DTensor):  # sharded like the parameter, on its rank's device
            return torch.empty_like(param, dtype=dtype)
        return torch.empty(param.shape, device=self._offload_device(param), dtype=dtype)

    def _offload_device(self, param: torch.Tensor) -> torch.device:
        """Where copies of `param` are kept: the CPU with `cpu_offload`, except for a shard (a DTensor
        stays on its mesh's device; it is 1/world of the parameter anyway)."""
        return torch.device("cpu") if self.cpu_offload and not isinstance(param, DTensor) else param.device

    def _weights_like_ema(self) -> list[torch.Tensor]:
        """The weights on the average's device and dtype (no copy when they already match)."""
        return [p.detach().to(e.device, e.dtype) for p, e in zip(self._params, self._ema)]

    # --- hooks ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure(pl_module)

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._ensure(pl_module)
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._last_step = step
        if step <= self.start_step:
            torch._foreach_copy_(self._ema, self._weights_like_ema())
            return
        if (step - self.start_step) % self.update_every_n_steps:
            return
        torch._foreach_lerp_(self._ema, self._weights_like_ema(), 1.0 - self.current_decay())
        self.num_updates += 1

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.use_for_validation:
            self._ensure(pl_module)
            self._swap_in()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.use_for_validation:
            self._swap_out()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._swap_out()  # never leave the average in place of the weights training continues from

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint written while the average is swapped in still holds the raw weights."""
        if self._swapped is not None:
            for name, raw in zip(self._names, self._swapped):
                checkpoint["state_dict"][name] = raw

    # --- swapping ------------------------------------------------------------------------------------
    @contextmanager
    def swapped_in(self, pl_module: LightningModule) -> Iterator[None]:
        """Run the block with the averaged weights in the module (re-entrant: no-op if already in)."""
        self._ensure(pl_module)
        if self._swapped is not None:
            yield
            return
        self._swap_in()
        try:
            yield
        finally:
            self._swap_out()

    @contextmanager
    def swapped_out(self, pl_module: LightningModule) -> Iterator[None]:
        """Run the block with the raw weights even while the average is swapped in (for validation)."""
        if self._swapped is None:
            yield
            return
        self._swap_out()
        try:
            yield
        finally:
            self._swap_in()

    @torch.no_grad()
    def _swap_in(self) -> None:
        if self._swapped is not None:
            return
        self._swapped = [p.detach().to(self._offload_device(p), copy=True) for p in self._params]
        for param, average in zip(self._params, self._ema):
            param.copy_(average)

    @torch.no_grad()
    def _swap_out(self) -> None:
        if self._swapped is None:
            return
        for param, raw in zip(self._params, self._swapped):
            param.copy_(raw)
        self._swapped = None
