"""Generation-side weights held apart from the model, so several models share one understanding expert.

Distillation trains only the generation side of BAGEL (the `*_moe_gen` expert, its final norm, the time
embedder, the latent projections and the guidance embedders); the understanding expert, the ViT and the
embeddings stay frozen. Teacher, student and fake-score model therefore differ only in those tensors:
one `Bagel` holds the shared frozen part, and a `GenerationWeights` copy per extra model is swapped in
for the forwards that model runs (`weights.applied(model)`, a `torch.func.functional_call`-style
reparametrisation: the copy's own Parameters sit in the model, so gradients reach the copy). The copy's
parameter names are the Bagel checkpoint keys, so its `state_dict` is a partial BAGEL checkpoint: the
paper's deployment ships distilled generation weights beside the original ones (`save` / `load`,
`DeployedInferencer`).

Caveat: with activation checkpointing a backward recomputes layers with whatever weights the model holds
at that time, so a trainable copy must be back-propagated inside its `applied` context.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import EMA_FILE
from hyperbagel.backbone.inference import BagelInferencer, ImageContexts
from hyperbagel.backbone.sharding import is_sharded

GUIDANCE_PATTERNS: tuple[str, ...] = ("text_guidance_embedder.*", "img_guidance_embedder.*")
GENERATION_PATTERNS: tuple[str, ...] = (
    "language_model.model.layers.*_moe_gen.*",
    "language_model.model.norm_moe_gen.*",
    "time_embedder.*",
    "vae2llm.*",
    "llm2vae.*",
    *GUIDANCE_PATTERNS,
)
GUIDANCE_MODULES: tuple[str, ...] = ("text_guidance_embedder", "img_guidance_embedder")
_SHOWN = 20


def matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def is_generation_key(name: str) -> bool:
    """Whether a Bagel parameter name belongs to the generation side (frozen position tables never do)."""
    return matches(name, GENERATION_PATTERNS) and not name.endswith("pos_embed")


def is_guidance_key(name: str) -> bool:
    return matches(name, GUIDANCE_PATTERNS)


def _listing(kind: str, items: list[str]) -> str:
    more = f", ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{len(items)} {kind}: {', '.join(items[:_SHOWN])}{more}"


def check_generation_keys(
    reference: Mapping[str, tuple[int, ...]],
    candidate: Mapping[str, tuple[int, ...]],
    what: str,
    candidate_adds_guidance: bool = False,
) -> None:
    """Refuse `candidate` generation weights that do not fit a model with `reference` ones.

    Every generation key but the guidance embedders must be present in both with one shape; guidance
    embedders the candidate has must exist in the reference (a CFG teacher may lack them), unless
    `candidate_adds_guidance` (a distilled student compared with its CFG teacher). The error lists every
    offending key.
    """
    ref = {k: tuple(s) for k, s in reference.items() if is_generation_key(k)}
    cand = {k: tuple(s) for k, s in candidate.items() if is_generation_key(k)}
    missing = sorted(k for k in set(ref) - set(cand) if not is_guidance_key(k))
    unexpected = sorted(
        k for k in set(cand) - set(ref) if not (candidate_adds_guidance and is_guidance_key(k))
    )
    mis_shaped = sorted(f"{k} ({cand[k]} vs {ref[k]})" for k in set(ref) & set(cand) if ref[k] != cand[k])
    problems = [
        _listing(kind, keys)
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
        if keys
    ]
    if problems:
        raise ValueError(f"generation keys of {what} do not match the model:\n  " + "\n  ".join(problems))


class GenerationWeights(nn.Module):
    """A copy of a Bagel's generation-side tensors under their Bagel names (nested like the model).

    Args:
        tensors: Bagel name -> tensor (names must be generation keys).
        trainable: whether the copy's parameters require gradients (a fake-score model) or not (a teacher).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], trainable: bool = False) -> None:
        super().__init__()
        foreign = sorted(name for name in tensors if not is_generation_key(name))
        if foreign:
            raise ValueError(
                f"GenerationWeights holds generation keys only; got {_listing('others', foreign)}"
            )
        if not tensors:
            raise ValueError("GenerationWeights needs at least one tensor")
        for name, tensor in tensors.items():
            *path, leaf = name.split(".")
            owner: nn.Module = self
            for part in path:
                child = owner._modules.get(part)
                if child is None:
                    child = nn.Module()
                    owner.add_module(part, child)
                owner = child
            owner.register_parameter(leaf, nn.Parameter(tensor, requires_grad=trainable))

    @classmethod
    def from_model(cls, model: Bagel, trainable: bool = False) -> GenerationWeights:
        """A detached copy of `model`'s current generation-side parameters."""
        tensors = {n: p.detach().clone() for n, p in model.named_parameters() if is_generation_key(n)}
        return cls(tensors, trainable)

    @classmethod
    def load(
        cls, path: str | Path, model: Bagel, trainable: bool = False, check_shared: bool = False
    ) -> GenerationWeights:
        """The generation tensors of a safetensors file (a BAGEL folder's `ema.safetensors`, or a file
        written by `save`), checked against `model` and cast to its device and dtype.

        check_shared: also require every other tensor in the file to equal the model's (the file's model
        must share the frozen understanding weights the copy will run with); the error lists the keys.
        """
        path = Path(path)
        if path.is_dir():
            path = path / EMA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no generation weights file at {path}")
        own = dict(model.named_parameters())
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            check_generation_keys({k: tuple(p.shape) for k, p in own.items()}, shapes, str(path))
            tensors = {
                key: handle.get_tensor(key).to(model.device, model.dtype)
                for key in shapes
                if is_generation_key(key)
            }
            if check_shared:
                differing = sorted(
                    key
                    for key in shapes
                    if not is_generation_key(key)
                    and key in own
                    and not torch.equal(handle.get_tensor(key).to(own[key].device, own[key].dtype), own[key])
                )
                unknown = sorted(k for k in shapes if not is_generation_key(k) and k not in own)
                if differing or unknown:
                    raise ValueError(
                        f"{path} does not share the model's frozen (non-generation) weights: "
                        + "; ".join(
                            _listing(kind, keys)
                            for kind, keys in (("differing", differing), ("unknown", unknown))
                            if keys
                        )
                    )
        return cls(tensors, trainable)

    def save(self, path: str | Path) -> None:
        """Write the copy as safetensors under Bagel names (loadable by `load`)."""
        state = {name: p.detach().to("cpu").contiguous() for name, p in self.named_parameters()}
        save_file(state, str(path), metadata={"format": "pt"})

    @property
    def has_guidance_embedders(self) -> bool:
        return any(is_guidance_key(name) for name, _ in self.named_parameters())

    def check_fits(self, model: Bagel) -> None:
        """Raise listing the keys when this copy cannot be swapped into `model`."""
        own = {name: tuple(p.shape) for name, p in model.named_parameters()}
        mine = {name: tuple(p.shape) for name, p in self.named_parameters()}
        check_generation_keys(own, mine, type(self).__name__)

    def copy_to(self, model: Bagel) -> None:
        """Write this copy into `model`'s own parameters (e.g. to export a model trained as a copy)."""
        self.check_fits(model)
        own = dict(model.named_parameters())
        with torch.no_grad():
            for name, param in self.named_parameters():
                own[name].copy_(param)

    @contextmanager
    def applied(self, model: Bagel) -> Iterator[Bagel]:
        """Within the context `model` computes with this copy's generation weights (and its own rest).

        A copy without guidance embedders (a CFG teacher) also hides the model's embedders, so the model
        samples with CFG as the teacher does; a copy with them needs a model that has them.
        """
        if is_sharded(model) or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            raise ValueError(
                "GenerationWeights cannot swap tensors of FSDP-sharded layers (FSDP installs its own "
                "in every forward); side models of a sharded model are separate copies (side_copies)"
            )
        self.check_fits(model)
        if self.has_guidance_embedders and not model.has_guidance_embedders:
            raise ValueError(
                "these weights have guidance embedders; call model.add_guidance_embedders() first"
            )
        swapped: list[tuple[nn.Module, str, nn.Parameter | None]] = []
        hidden: list[tuple[str, nn.Module | None]] = []
        try:
            for name, param in self.named_parameters():
                owner_name, _, leaf = name.rpartition(".")
                owner = model.get_submodule(owner_name)
                swapped.append((owner, leaf, owner._parameters[leaf]))
                owner._parameters[leaf] = param
            if model.has_guidance_embedders and not self.has_guidance_embedders:
                for attr in GUIDANCE_MODULES:
                    hidden.append((attr, getattr(model, attr)))
                    setattr(model, attr, None)
            yield model
        finally:
            for attr, module in reversed(hidden):
                setattr(model, attr, module)
            for owner, leaf, original in reversed(swapped):
                owner._parameters[leaf] = original


class DeployedInferencer(BagelInferencer):
    """The paper's deployment: the original model prefills every context (clean latents from the original
    generation weights) and the distilled generation weights denoise, one pass per step.

    `model` is the original (CFG) model; it receives zero-initialised guidance embedders, which stay unused
    outside `weights.applied` (prefill embeds no scales), so its own outputs do not change.
    """

    def __init__(self, model: Bagel, tokenizer: Any, weights: GenerationWeights) -> None:
        if weights.has_guidance_embedders:
            model.add_guidance_embedders()
        weights.check_fits(model)
        super().__init__(model, tokenizer)
        self.weights = weights.to(model.device)

    def _sample(self, contexts: ImageContexts, *args: Any, **kwargs: Any) -> list[Image.Image]:
        with self.weights.applied(self.model):
            return super()._sample(contexts, *args, **kwargs)
