"""`GenerationBatch`es of the shapes world for the distillation stages (text-to-image prompts and edits).

Each batch holds one task kind, so a text-to-image batch never pays for the image-CFG pass of edits;
batches are made once per split from a seeded permutation and the loader shuffles their order. The
world's samples are light (scenes and text): images are rendered and transformed when a batch is made.
Targets are the world's exact renders (for edits the exact edited scene), i.e. the clean latents the
CFG-distillation stage noises.
"""

from __future__ import annotations

import random
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from hyperbagel.datamodules.interleaved import load_model_config, load_tokenizer
from hyperbagel.datamodules.shapes import EditSample, ShapesWorld, T2ISample
from hyperbagel.distillation.batches import TASKS, GenerationBatch, GenerationItem, edit_item, t2i_item

SPLITS = ("train", "val", "test")


def _unwrap(batch: GenerationBatch) -> GenerationBatch:
    """DataLoader collate for a dataset whose items already are batches (picklable, unlike a lambda)."""
    return batch


class ShapesGenerationBatches(Dataset):
    """Fixed batches of one split: `n` samples of each kind, cut into single-kind batches.

    Args:
        world: the shapes world drawing the samples.
        split: "train", "val" or "test".
        n: samples per kind.
        kinds: task kinds to include ("t2i", "edit").
        batch_size: samples per batch; a kind's last partial batch is dropped when `drop_last`.
        tokenizer / config: text encoding and the model's image transforms.
        seed: the permutation of each kind's samples into batches (None keeps the world's order).
    """

    def __init__(
        self,
        world: ShapesWorld,
        split: str,
        n: int,
        kinds: list[str],
        batch_size: int,
        tokenizer: Any,
        config: Any,
        seed: int | None = 0,
        drop_last: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.config = config
        self.batches: list[list[T2ISample | EditSample]] = []
        for kind in kinds:
            samples = list(world.samples(kind, split, n))
            if seed is not None:
                random.Random(f"{seed}|{kind}|{split}").shuffle(samples)
            stop = len(samples) - len(samples) % batch_size if drop_last else len(samples)
            self.batches += [samples[i : i + batch_size] for i in range(0, stop, batch_size)]
        if not self.batches:
            raise ValueError(
                f"the {split} split has no batch: {n} samples per kind with batch_size {batch_size}"
            )

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> GenerationBatch:
        return GenerationBatch.collate([self._item(sample) for sample in self.batches[index]])

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _item(self, sample: T2ISample | EditSample) -> GenerationItem:
        if isinstance(sample, T2ISample):
            return t2i_item(sample.prompt, self._encode(sample.prompt), self.config, sample.image)
        return edit_item(
            sample.source_image,
            sample.instruction,
            self._encode(sample.instruction),
            self.config,
            sample.target_image,
        )


class GenerationDataModule(LightningDataModule):
    """Shapes-world text-to-image and editing batches for the distillation stages.

    Args:
        model_config: preset name or checkpoint folder (image transforms and special token ids).
        tokenizer: "shapes" or a tokenizer folder.
        kinds: task kinds ("t2i", "edit").
        n_train / n_val / n_test: samples per kind in each split (0 disables validation / testing).
        batch_size: samples per batch (single-kind batches).
        canvas_size / world_seed: the world's canvas and seed (splits do not depend on the seed).
        seed: how samples are grouped into training batches.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        model_config: str,
        tokenizer: str = "shapes",
        kinds: list[str] | None = None,
        n_train: int = 2000,
        n_val: int = 16,
        n_test: int = 0,
        batch_size: int = 8,
        canvas_size: int = 64,
        world_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.kinds = list(kinds or TASKS)
        unknown = sorted(set(self.kinds) - set(TASKS))
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {TASKS}, got {self.kinds}")
        if n_train < batch_size or n_val < 0 or n_test < 0:
            raise ValueError(
                f"need n_train >= batch_size ({batch_size}) and n_val, n_test >= 0; got {n_train}, {n_val}, "
                f"{n_test}"
            )
        self.tokenizer = load_tokenizer(tokenizer)
        self.config = load_model_config(model_config, self.tokenizer)
        self.world = ShapesWorld(canvas_size, world_seed)
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.datasets: dict[str, ShapesGenerationBatches] = {}

    def split(self, name: str) -> ShapesGenerationBatches:
        """The batches of a split (built on first use)."""
        if name not in self.datasets:
            train = name == "train"
            self.datasets[name] = ShapesGenerationBatches(
                self.world,
                name,
                self.sizes[name],
                self.kinds,
                self.batch_size,
                self.tokenizer,
                self.config,
                seed=self.seed if train else None,
                drop_last=train,
            )
        return self.datasets[name]

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.split(name),
            batch_size=None,
            shuffle=shuffle,
            collate_fn=_unwrap,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) if self.sizes["val"] else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", shuffle=False) if self.sizes["test"] else []
