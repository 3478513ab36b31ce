"""Fully sharded data parallel for a Bagel (FSDP2, `torch.distributed.fsdp.fully_shard`).

Why one unit per called module instead of one per model: the stages call a Bagel through its methods
(prefill, velocity, decode, training losses), not through one `forward`, and FSDP2 gathers a unit's
parameters only while that unit's module is being *called*. So every decoder layer is a unit, and so is
each module outside the layers that holds parameters and is only ever called (`SHARDED_MODULES`). What
stays whole on every rank is frozen and read directly (the ViT, `lm_head`, the position tables); a
trainable parameter left whole would never have its gradients averaged across ranks, so `shard_bagel`
refuses one by name.

Side models (a teacher, a fake score, a discriminator's backbone) cannot be swapped into a sharded model
(`GenerationWeights`), so under sharding they are separate Bagels sharded the same way: `clone_sharded`
copies a sharded model shard by shard, without ever gathering it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from hyperbagel.backbone.bagel import Bagel

# modules outside the decoder layers that hold parameters and are only used by calling them
SHARDED_MODULES: tuple[str, ...] = (
    "language_model.model.embed_tokens",
    "language_model.model.norm",
    "language_model.model.norm_moe_gen",
    "connector",
    "time_embedder",
    "vae2llm",
    "llm2vae",
    "text_guidance_embedder",
    "img_guidance_embedder",
)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` holds FSDP2-sharded parameters."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _units(model: Bagel) -> Iterator[nn.Module]:
    yield from model.language_model.model.layers
    for name in SHARDED_MODULES:
        owner, _, leaf = name.rpartition(".")
        module = getattr(model.get_submodule(owner) if owner else model, leaf)
        if module is not None:
            yield module


def _shard_units(model: Bagel, mesh: DeviceMesh) -> None:
    """Every unit is called on its own, so each is an FSDP root, and FSDP keeps a root's parameters
    gathered after forward (expecting the backward next) unless told otherwise: frozen units, whose
    backward never comes, would stay whole on every rank."""
    for unit in _units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)


def shard_bagel(model: Bagel, mesh: DeviceMesh) -> Bagel:
    """Shard `model` in place over the 1-D data-parallel `mesh` (each unit's parameters split on dim 0)."""
    if is_sharded(model):
        raise ValueError("this Bagel is already sharded")
    _shard_units(model, mesh)
    whole = [n for n, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if whole:
        raise ValueError(
            "under sharding only parameters of the decoder layers and of "
            f"{', '.join(SHARDED_MODULES)} can train (the others would never have their gradients "
            f"averaged across ranks); freeze these or train without sharding: {', '.join(whole[:20])}"
        )
    return model


@torch.no_grad()
def clone_sharded(model: Bagel) -> Bagel:
    """A separate Bagel equal to the sharded `model`, sharded the same way, built on the meta device and
    filled shard by shard (no rank ever holds a whole copy). The autoencoder is shared, not copied."""
    mesh = mesh_of(model)
    with torch.device("meta"):
        clone = Bagel(model.config)
    if model.has_guidance_embedders:
        with torch.device("meta"):
            clone.add_guidance_embedders()
    _shard_units(clone, mesh)
    clone.to_empty(device=model.device)
    theirs = local_tensors(model)
    for name, mine in local_tensors(clone).items():
        mine.copy_(theirs[name])
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, param in clone.named_parameters():
        param.requires_grad_(grads[name])
    clone.autoencoder = model._autoencoder
    return clone.train(model.training)


def local_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, as this rank holds it (its shard of a sharded one)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: t.to_local() if isinstance(t, DTensor) else t for name, t in tensors.items()}


def mesh_of(model: nn.Module) -> DeviceMesh:
    """The mesh a sharded model's parameters are spread over (side copies are sharded over the same)."""
    for param in model.parameters():
        if isinstance(param, DTensor):
            return param.device_mesh
    raise ValueError("the model is not sharded")


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """The whole state dict of a sharded model on rank 0 (CPU tensors), empty on the others. A collective:
    every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def gathered(value: Any) -> Any:
    """`value` (nested dicts / lists / tuples of tensors, e.g. a callback's or optimizer's state) with every
    DTensor replaced by its whole tensor on rank 0's CPU and by an empty placeholder elsewhere. Lightning
    saves callback states from rank 0 alone, so sharded state must be whole there, and only there: eight
    whole copies of a 7B model's EMA would not fit a node's memory. A collective when it holds DTensors:
    every rank must call it."""
    if isinstance(value, DTensor):
        whole = value.full_tensor()
        return whole.cpu() if dist.get_rank() == 0 else torch.empty(0)
    if isinstance(value, dict):
        return {key: gathered(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(gathered(item) for item in value)
    return value


def resharded_like(value: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """A whole tensor cut like `template` when that is a DTensor (each rank keeps its own shard, no
    communication; `value` keeps its dtype), else `value` itself."""
    if not isinstance(template, DTensor):
        return value
    whole = value.to(template.device)
    return distribute_tensor(whole, template.device_mesh, template.placements, src_data_rank=None)


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `optimizer.load_state_dict` of gathered state: cut the whole per-parameter tensors (moments)
    of sharded parameters back into shards like their parameters."""
    sharded = [p for group in optimizer.param_groups for p in group["params"] if isinstance(p, DTensor)]
    for param in sharded:
        state = optimizer.state.get(param, {})
        for key, item in state.items():
            if torch.is_tensor(item) and item.shape == param.shape:
                state[key] = resharded_like(item, param)


def check_optimizer_shards(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer that cannot update sharded parameters (bitsandbytes' kernels take plain
    tensors; DTensor has no rule for them), naming it, before the first step fails deep inside it."""
    sharded = any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"])
    if sharded and type(optimizer).__module__.startswith("bitsandbytes"):
        name = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
        raise ValueError(
            f"{name} cannot update sharded (FSDP2) parameters; use torch.optim.AdamW, whose state is "
            "sharded with the parameters"
        )
