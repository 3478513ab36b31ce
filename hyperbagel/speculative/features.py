"""The frozen target's side of draft training: its per-layer hidden states for a pack, online or cached.

What is computed (online) or cached (offline) are the RAW taps: all L + 1 hidden states [B, S, H] of
the target (`output_hidden_states`: index i = input of layer i, index L = the last layer's pre-norm
output), i.e. what `DraftHead.fuse` reads. Fused draft inputs cannot be cached: the fusion modules
train. The target's logits are recomputed from the cached last hidden state (final norm + lm_head,
cheap), so an offline epoch runs no target layer at all.

Offline caching is per sample, keyed by the sample's origin (file, row) and a digest of its token and
RoPE ids, so packs may regroup samples across epochs: in a pack every sample attends only to itself
and its RoPE ids restart, so its hidden states are the same alone or packed (up to float rounding).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.packing import PackedSequence
from hyperbagel.datamodules.readers import Origin


def drop_generation_expert(target: Bagel) -> None:
    """Free the generation expert of every decoder layer (and its final norm).

    The draft trainer feeds the target understanding data only (text and ViT tokens), which never
    routes a token to that expert: this halves a MoT target's memory.
    """
    model = target.language_model.model
    for layer in model.layers:
        for name in [n for n, _ in layer.named_children() if n.endswith("_moe_gen")]:
            setattr(layer, name, None)
        for name in [n for n, _ in layer.self_attn.named_children() if n.endswith("_moe_gen")]:
            setattr(layer.self_attn, name, None)
    model.norm_moe_gen = None


def target_logits(target: Bagel, last_hidden: torch.Tensor) -> torch.Tensor:
    """Target logits [n, V] from pre-norm last-layer hidden states [n, H] (understanding expert norm)."""
    language_model = target.language_model
    return language_model.lm_head(language_model.model.norm(last_hidden.to(target.dtype)))


class FeatureStore:
    """One safetensors file per sample under `directory`: its L + 1 hidden states [L + 1, n, H].

    fingerprint: what identifies the target (e.g. its folder, weights file size and time, layer
    count); stored in `target.json` on first use and compared afterwards, so features of another (or a
    retrained) target are never read back silently.
    """

    FINGERPRINT_FILE = "target.json"

    def __init__(
        self, directory: str | Path, fingerprint: dict[str, Any], dtype: torch.dtype | None = None
    ) -> None:
        self.directory = Path(directory)
        self.dtype = dtype
        self.directory.mkdir(parents=True, exist_ok=True)
        stored_path = self.directory / self.FINGERPRINT_FILE
        fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from JSON
        if stored_path.is_file():
            stored = json.loads(stored_path.read_text())
            if stored != fingerprint:
                raise ValueError(
                    f"the feature cache {self.directory} was written for another target ({stored}); this "
                    f"target is {fingerprint}. Use a new cache folder or delete this one"
                )
        else:  # every rank of a run may get here at once: write atomically (same content from each)
            tmp = stored_path.with_name(f".{stored_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, stored_path)

    @staticmethod
    def key(origin: Origin, input_ids: torch.Tensor, position_ids: torch.Tensor) -> str:
        digest = hashlib.sha1(f"{origin.file}\0{origin.row}\0".encode())
        digest.update(input_ids.cpu().numpy().tobytes())
        digest.update(position_ids.cpu().numpy().tobytes())
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["hidden_states"]
        except (SafetensorError, OSError, KeyError) as err:
            raise ValueError(f"corrupt cached target features {path}: {err}; delete it to recompute") from err

    def save(self, key: str, hidden_states: torch.Tensor) -> None:
        """Atomic (temporary name, then rename): an interrupted write never leaves a half file."""
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        tensor = hidden_states.detach().to("cpu", self.dtype).contiguous()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file({"hidden_states": tensor}, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class TargetFeatures:
    """The target's L + 1 hidden states of a pack: computed under no_grad, or read from a `FeatureStore`.

    store: None computes online every time; with a store each sample is computed once and read back
    afterwards (`origins[k]` names the pack's sample k, as `TrainingPack.origins` does).
    """

    def __init__(self, target: Bagel, store: FeatureStore | None = None) -> None:
        self.target = target
        self.store = store

    @torch.no_grad()
    def compute(self, packed: PackedSequence) -> list[torch.Tensor]:
        if packed.vae_images:
            raise ValueError(
                "the draft trainer's target runs its understanding expert only, but this pack holds "
                f"{len(packed.vae_images)} VAE images; train the draft on understanding (vlm) data"
            )
        output = self.target.forward_packed(packed, output_hidden_states=True)
        return output.hidden_states

    def __call__(self, packed: PackedSequence, origins: Sequence[Origin] | None = None) -> list[torch.Tensor]:
        if self.store is None:
            return self.compute(packed)
        if origins is None:
            raise ValueError("offline target features need the origins of the pack's samples")
        spans = self._spans(packed, origins)
        cached = [self.store.load(key) for key, _, _ in spans]
        if all(c is not None for c in cached):
            return self._assemble(packed, spans, cached)
        hidden_states = self.compute(packed)
        stacked = torch.stack(hidden_states)  # [L + 1, B, S, H]
        for (key, row, index), found in zip(spans, cached):
            if found is None:
                self.store.save(key, stacked[:, row, index.to(stacked.device)])
        return hidden_states

    def _spans(
        self, packed: PackedSequence, origins: Sequence[Origin]
    ) -> list[tuple[str, int, torch.Tensor]]:
        """(cache key, row, positions in the row) of every sample of the pack."""
        sample_ids = packed.sample_ids.cpu()
        count = int(sample_ids.max()) + 1 if sample_ids.numel() else 0
        if count != len(origins):
            raise ValueError(f"the pack holds {count} samples but {len(origins)} origins were given")
        spans = []
        for sample, origin in enumerate(origins):
            rows, index = (sample_ids == sample).nonzero(as_tuple=True)
            row = int(rows[0])
            key = self.store.key(origin, packed.input_ids[row, index], packed.position_ids[row, index])
            spans.append((key, row, index))
        return spans

    def _assemble(
        self,
        packed: PackedSequence,
        spans: list[tuple[str, int, torch.Tensor]],
        cached: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        rows, seq = packed.shape
        layers, _, hidden = cached[0].shape
        device, dtype = self.target.device, self.target.dtype
        stacked = torch.zeros(layers, rows, seq, hidden, device=device, dtype=dtype)
        for (key, row, index), tensor in zip(spans, cached):
            if tensor.shape != (layers, index.numel(), hidden):
                raise ValueError(
                    f"cached target features {self.store.path(key)} have shape {tuple(tensor.shape)}, "
                    f"expected {(layers, index.numel(), hidden)}"
                )
            stacked[:, row, index.to(device)] = tensor.to(device, dtype)
        return list(stacked.unbind(0))
