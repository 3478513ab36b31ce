"""Export shapes-world samples in BAGEL's training-data formats.

Layout written under `out_dir` for one split (several splits can share an `out_dir`):

- ``t2i/<split>/part-00000.parquet``, ``part-00001.parquet``, ...: text-to-image rows. Columns ``image``
  (PNG bytes), ``captions`` (JSON string of a dict, here ``{"prompt": <prompt>}``), plus our ``category``
  and ``scene`` (JSON of the ground-truth scene, see ``Scene.to_json``).
- ``editing/<split>/part-00000.parquet``: editing rows. Columns ``image_list`` ([source PNG, target PNG]),
  ``instruction_list`` (one inner list per transition holding alternative phrasings, canonical first),
  plus our ``kind`` and ``scenes`` (JSON list [source, target]).
- ``t2i/parquet_info/<split>.json`` and ``editing/parquet_info/<split>.json``: the row-group index BAGEL's
  parquet readers take as ``parquet_info_path``: ``{<absolute parquet path>: {"num_row_groups": int,
  "num_rows": int}}``.
- ``vqa/<split>.jsonl`` with images ``vqa/images/<split>/000000.png``, ``000001.png``, ...: LLaVA-style rows
  ``{"id", "image": "<split>/000000.png" (relative to vqa/images), "conversations": [{"from": "human",
  "value": "<image>\\n<question>"}, {"from": "gpt", "value": <answer>}, ...], "category", "scene"}``: the
  sample's question first, then `vqa_follow_ups` further short-answer turns about the same image.
- ``vqa_text/<split>.jsonl``: the same questions about the same scenes with the image replaced by the
  scene's written description (``"<description>\\n<question>"``, no ``image`` field): reading comprehension
  for a language model trained from scratch, standing in for the pretrained language model BAGEL starts
  from (README, "Where the teacher stands").
- ``dataset_info.json``: entries shaped like BAGEL's ``DATASET_INFO`` (group -> dataset name -> ``data_dir``,
  ``num_files``, ``num_total_samples``, ``parquet_info_path`` / ``jsonl_path``), merged across calls.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hyperbagel.datamodules.shapes import SPLITS, ShapesWorld
from hyperbagel.datamodules.shapes_text import described_question


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_parquet_dir(
    rows: dict[str, pa.Array], directory: Path, info_path: Path, rows_per_file: int, row_group_size: int
) -> int:
    """Write `rows` as part files of `directory` and their row-group index to `info_path`; returns #files."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("part-*.parquet"):
        stale.unlink()
    table = pa.table(rows)
    index = {}
    n_files = max(1, -(-table.num_rows // rows_per_file))
    for k in range(n_files):
        path = (directory / f"part-{k:05d}.parquet").resolve()
        part = table.slice(k * rows_per_file, rows_per_file)
        pq.write_table(part, path, row_group_size=row_group_size)
        index[str(path)] = {"num_row_groups": pq.ParquetFile(path).num_row_groups, "num_rows": part.num_rows}
    info_path.parent.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps(index, indent=1))
    return n_files


def _conversation(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    """LLaVA turns: each (question, answer) as a human turn then a gpt turn."""
    return [
        {"from": speaker, "value": value}
        for question, answer in turns
        for speaker, value in (("human", question), ("gpt", answer))
    ]


def export_shapes_world(
    out_dir: str | Path,
    n_t2i: int = 1000,
    n_edit: int = 1000,
    n_vqa: int = 1000,
    vqa_follow_ups: int = 0,
    split: str = "train",
    canvas_size: int = 64,
    seed: int = 0,
    rows_per_file: int = 1000,
    row_group_size: int = 32,
) -> dict[str, dict[str, dict]]:
    """Write `split` samples of the world (see module docstring) and return the BAGEL dataset-info
    entries added to ``out_dir/dataset_info.json``. A count of 0 skips that part. `vqa_follow_ups` extra
    question turns per understanding row multiply the answers learned per (costly) image encoding."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if rows_per_file < 1 or row_group_size < 1:
        raise ValueError("rows_per_file and row_group_size must be positive")
    out = Path(out_dir).resolve()
    world = ShapesWorld(canvas_size=canvas_size, seed=seed)
    info: dict[str, dict[str, dict]] = {}
    name = f"shapes_{split}"
    if n_t2i > 0:
        samples = world.samples("t2i", split, n_t2i)
        rows = {
            "image": pa.array([png_bytes(s.image) for s in samples], pa.binary()),
            "captions": pa.array([json.dumps({"prompt": s.prompt}) for s in samples], pa.string()),
            "category": pa.array([s.category for s in samples], pa.string()),
            "scene": pa.array([s.scene.to_json() for s in samples], pa.string()),
        }
        data_dir, info_path = out / "t2i" / split, out / "t2i" / "parquet_info" / f"{split}.json"
        n_files = _write_parquet_dir(rows, data_dir, info_path, rows_per_file, row_group_size)
        info["t2i_pretrain"] = {
            name: {
                "data_dir": str(data_dir),
                "num_files": n_files,
                "num_total_samples": n_t2i,
                "parquet_info_path": str(info_path),
            }
        }
    if n_edit > 0:
        samples = world.samples("edit", split, n_edit)
        rows = {
            "image_list": pa.array(
                [[png_bytes(s.source_image), png_bytes(s.target_image)] for s in samples],
                pa.list_(pa.binary()),
            ),
            "instruction_list": pa.array(
                [[list(s.instructions)] for s in samples], pa.list_(pa.list_(pa.string()))
            ),
            "kind": pa.array([s.kind for s in samples], pa.string()),
            "scenes": pa.array(
                [json.dumps([s.source.to_json(), s.target.to_json()]) for s in samples], pa.string()
            ),
        }
        data_dir, info_path = out / "editing" / split, out / "editing" / "parquet_info" / f"{split}.json"
        n_files = _write_parquet_dir(rows, data_dir, info_path, rows_per_file, row_group_size)
        info["unified_edit"] = {
            name: {
                "data_dir": str(data_dir),
                "num_files": n_files,
                "num_total_samples": n_edit,
                "parquet_info_path": str(info_path),
            }
        }
    if n_vqa > 0:
        samples = world.samples("vqa", split, n_vqa)
        image_root = out / "vqa" / "images"
        (image_root / split).mkdir(parents=True, exist_ok=True)
        jsonl_path = out / "vqa" / f"{split}.jsonl"
        text_path = out / "vqa_text" / f"{split}.jsonl"
        text_path.parent.mkdir(parents=True, exist_ok=True)
        with jsonl_path.open("w") as f, text_path.open("w") as text_f:
            for i, s in enumerate(samples):
                relative = f"{split}/{i:06d}.png"
                s.image.save(image_root / relative, format="PNG")
                follow_ups = world.follow_up_questions(s.scene, vqa_follow_ups, key=f"{split}|{i}")
                row = {"id": f"{name}_{i:06d}", "category": s.category, "scene": s.scene.to_json()}
                image_turns = _conversation([(f"<image>\n{s.question}", s.answer), *follow_ups])
                text_turns = _conversation([(described_question(s.scene, s.question), s.answer), *follow_ups])
                f.write(json.dumps({**row, "image": relative, "conversations": image_turns}) + "\n")
                text_f.write(json.dumps({**row, "conversations": text_turns}) + "\n")
        info["vlm_sft"] = {
            name: {"data_dir": str(image_root), "jsonl_path": str(jsonl_path), "num_total_samples": n_vqa}
        }
        info["text_sft"] = {name: {"jsonl_path": str(text_path), "num_total_samples": n_vqa}}
    index_path = out / "dataset_info.json"
    merged = json.loads(index_path.read_text()) if index_path.exists() else {}
    for group, entries in info.items():
        merged.setdefault(group, {}).update(entries)
    out.mkdir(parents=True, exist_ok=True)
    index_path.write_text(json.dumps(merged, indent=1))
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export the built-in shapes world in BAGEL's data formats.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--n-t2i", type=int, default=1000)
    parser.add_argument("--n-edit", type=int, default=1000)
    parser.add_argument("--n-vqa", type=int, default=1000)
    parser.add_argument("--vqa-follow-ups", type=int, default=0, help="extra question turns per vqa row")
    parser.add_argument("--canvas-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows-per-file", type=int, default=1000)
    parser.add_argument("--row-group-size", type=int, default=32)
    args = parser.parse_args(argv)
    info = export_shapes_world(
        args.out,
        n_t2i=args.n_t2i,
        n_edit=args.n_edit,
        n_vqa=args.n_vqa,
        vqa_follow_ups=args.vqa_follow_ups,
        split=args.split,
        canvas_size=args.canvas_size,
        seed=args.seed,
        rows_per_file=args.rows_per_file,
        row_group_size=args.row_group_size,
    )
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
