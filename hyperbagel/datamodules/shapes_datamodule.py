"""The shapes world as training data, through the same BAGEL-format readers as real data.

`prepare_data` exports the world's train and validation splits with `export_shapes_world` (once; a
settings file in the data root says what was exported, and changed settings re-export), then the
module reads the parquet / jsonl files like any other `InterleavedDataModule`.
"""

from __future__ import annotations

import json
from pathlib import Path

from hyperbagel.datamodules.interleaved import InterleavedDataModule
from hyperbagel.datamodules.packed_dataset import DataGroup
from hyperbagel.datamodules.shapes_export import export_shapes_world

SETTINGS_FILE = "export_settings.json"
EXPORT_LAYOUT = 2  # version of what the exporter writes: data roots exported by an older one are re-exported


def shapes_groups(root: Path, split: str, weights: dict[str, float]) -> list[DataGroup]:
    """Groups reading an exported split; a kind of weight 0 is left out."""
    candidates = {
        "t2i": DataGroup(
            kind="t2i",
            name="t2i",
            paths=[str(root / "t2i" / split)],
            parquet_info=str(root / "t2i" / "parquet_info" / f"{split}.json"),
        ),
        "editing": DataGroup(
            kind="edit",
            name="editing",
            paths=[str(root / "editing" / split)],
            parquet_info=str(root / "editing" / "parquet_info" / f"{split}.json"),
        ),
        "vqa": DataGroup(
            kind="vlm",
            name="vqa",
            paths=[str(root / "vqa" / f"{split}.jsonl")],
            image_root=str(root / "vqa" / "images"),
        ),
        "vqa_text": DataGroup(kind="vlm", name="vqa_text", paths=[str(root / "vqa_text" / f"{split}.jsonl")]),
    }
    groups = []
    for name, group in candidates.items():
        if weights[name] > 0:
            group.weight = weights[name]
            groups.append(group)
    if not groups:
        raise ValueError("at least one of the weights (t2i, edit, vqa, text_vqa) must be > 0")
    return groups


class ShapesDataModule(InterleavedDataModule):
    """Shapes-world t2i, editing and understanding data in BAGEL's formats, packed.

    Args:
        model_config: preset name or checkpoint folder (see `InterleavedDataModule`).
        data_root: where the world is exported (created if missing).
        n_train / n_val: samples per kind (t2i, editing, vqa) in the train / validation split; n_val 0
            disables validation.
        vqa_follow_ups: extra short-answer turns per understanding row (more answers per image encoding).
        canvas_size / world_seed: the world's image size and seed.
        row_group_size: parquet row-group size (the unit of sharding across ranks and workers).
        t2i_weight / edit_weight / vqa_weight: sampling weights of the three groups (0 leaves one out).
        text_vqa_weight: sampling weight of the same questions asked about the scene's written description
            instead of its image (text only; 0, the default, leaves them out).
        Every other argument is `InterleavedDataModule`'s.
    """

    def __init__(
        self,
        model_config: str,
        data_root: str = "data/shapes",
        n_train: int = 2000,
        n_val: int = 64,
        vqa_follow_ups: int = 0,
        canvas_size: int = 64,
        world_seed: int = 0,
        row_group_size: int = 32,
        t2i_weight: float = 1.0,
        edit_weight: float = 1.0,
        vqa_weight: float = 1.0,
        text_vqa_weight: float = 0.0,
        tokenizer: str = "shapes",
        expected_tokens: int = 32768,
        max_tokens: int = 36864,
        max_tokens_per_sample: int = 16384,
        text_dropout: float = 0.1,
        vit_dropout: float = 0.3,
        vae_dropout: float = 0.3,
        seed: int = 0,
        num_workers: int = 0,
        max_bad_fraction: float = 0.05,
        bad_fraction_min_rows: int = 100,
        strict_resume: bool = True,
    ) -> None:
        if n_train < 1 or n_val < 0:
            raise ValueError(f"need n_train >= 1 and n_val >= 0, got {n_train} and {n_val}")
        self.data_root = Path(data_root)
        self.export_settings = {
            split: {
                "n": n,
                "vqa_follow_ups": vqa_follow_ups,
                "canvas_size": canvas_size,
                "seed": world_seed,
                "row_group_size": row_group_size,
                "layout": EXPORT_LAYOUT,
            }
            for split, n in (("train", n_train), ("val", n_val))
        }
        weights = {"t2i": t2i_weight, "editing": edit_weight, "vqa": vqa_weight, "vqa_text": text_vqa_weight}
        super().__init__(
            groups=shapes_groups(self.data_root, "train", weights),
            tokenizer=tokenizer,
            model_config=model_config,
            val_groups=shapes_groups(self.data_root, "val", weights) if n_val > 0 else None,
            expected_tokens=expected_tokens,
            max_tokens=max_tokens,
            max_tokens_per_sample=max_tokens_per_sample,
            text_dropout=text_dropout,
            vit_dropout=vit_dropout,
            vae_dropout=vae_dropout,
            seed=seed,
            num_workers=num_workers,
            max_bad_fraction=max_bad_fraction,
            bad_fraction_min_rows=bad_fraction_min_rows,
            strict_resume=strict_resume,
        )

    def prepare_data(self) -> None:
        """Export each split whose files are missing or were exported with other settings."""
        settings_path = self.data_root / SETTINGS_FILE
        done = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        for split, settings in self.export_settings.items():
            if settings["n"] == 0 or done.get(split) == settings:
                continue
            n = settings["n"]
            export_shapes_world(
                self.data_root,
                n_t2i=n,
                n_edit=n,
                n_vqa=n,
                vqa_follow_ups=settings["vqa_follow_ups"],
                split=split,
                canvas_size=settings["canvas_size"],
                seed=settings["seed"],
                row_group_size=settings["row_group_size"],
            )
            done[split] = settings
            settings_path.write_text(json.dumps(done, indent=1))
