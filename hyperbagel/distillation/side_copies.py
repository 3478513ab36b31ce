"""Side models of the distillation stages (teacher, fake score, learned real score, discriminator backbone)
as whatever the student's parallelism allows.

On one device or under DDP a side model is a `GenerationWeights` copy swapped into the student, so every
model shares one copy of the frozen understanding weights. A sharded (FSDP2) student cannot take swapped
tensors, so there a side model is a `SeparateCopy`: a whole Bagel sharded like the student (the frozen
part costs one more sharded copy per side model). Both answer `applied(student)` with the model to run,
so a stage writes `with side.applied(self.model) as model: ...` and runs under either.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import from_pretrained
from hyperbagel.backbone.sharding import clone_sharded, is_sharded, local_tensors, mesh_of, shard_bagel
from hyperbagel.distillation.generation_weights import (
    GenerationWeights,
    check_generation_keys,
    is_generation_key,
)


class SeparateCopy(nn.Module):
    """A side model held as its own (sharded) Bagel; only its generation side may train.

    Args:
        bagel: the copy (its autoencoder shared with the student's, not duplicated).
        trainable: whether its generation-side parameters require gradients (a fake score) or none do.
    """

    def __init__(self, bagel: Bagel, trainable: bool = False) -> None:
        super().__init__()
        self.bagel = bagel
        for name, param in bagel.named_parameters():
            param.requires_grad_(trainable and is_generation_key(name))

    @property
    def has_guidance_embedders(self) -> bool:
        return self.bagel.has_guidance_embedders

    @contextmanager
    def applied(self, model: Bagel) -> Iterator[Bagel]:
        """The copy itself (it holds the shared frozen weights too); `model` is the student it stands by.
        It runs as the student runs (train mode, activation checkpointing), as a swapped-in copy would."""
        self.bagel.train(model.training)
        decoder = model.language_model.model
        self.bagel.language_model.model.gradient_checkpointing = decoder.gradient_checkpointing
        yield self.bagel


SideCopy = GenerationWeights | SeparateCopy


def generation_copy(model: Bagel, trainable: bool = False) -> SideCopy:
    """A side model equal to `model`'s current generation side."""
    if is_sharded(model):
        return SeparateCopy(clone_sharded(model), trainable)
    return GenerationWeights.from_model(model, trainable)


def clone_copy(copy: SideCopy, trainable: bool) -> SideCopy:
    """An independent side model with `copy`'s weights (e.g. a fake score started at the teacher)."""
    if isinstance(copy, SeparateCopy):
        return SeparateCopy(clone_sharded(copy.bagel), trainable)
    return GenerationWeights({n: p.detach().clone() for n, p in copy.named_parameters()}, trainable)


def load_generation_copy(folder: str | Path, model: Bagel, trainable: bool = False) -> SideCopy:
    """The generation side of the checkpoint `folder` as a side model of `model`, which it must fit and
    whose frozen (non-generation) weights it must share; both are checked and the errors list the keys."""
    if not is_sharded(model):
        return GenerationWeights.load(folder, model, trainable, check_shared=True)
    other = from_pretrained(folder, dtype=model.dtype, load_autoencoder=False)
    own = {name: tuple(p.shape) for name, p in model.named_parameters()}
    check_generation_keys(own, {name: tuple(p.shape) for name, p in other.named_parameters()}, str(folder))
    shard_bagel(other.requires_grad_(False), mesh_of(model))  # moves its shards to the mesh's device
    _check_shared(other, model, folder)  # whole tensors of both are still where they were loaded
    other.autoencoder = model._autoencoder
    return SeparateCopy(other, trainable)


def _check_shared(other: Bagel, model: Bagel, folder: str | Path) -> None:
    """Every rank compares its shards of the frozen weights; the differing keys of all ranks are listed."""
    mine, theirs = local_tensors(other), local_tensors(model)
    differing = [
        name
        for name, tensor in mine.items()
        if not is_generation_key(name) and name in theirs and not torch.equal(tensor, theirs[name])
    ]
    everyone: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, differing)
    differing = sorted({name for names in everyone for name in names})
    if differing:
        raise ValueError(
            f"{folder} does not share the model's frozen (non-generation) weights: {len(differing)} "
            f"differing: {', '.join(differing[:20])}"
        )
