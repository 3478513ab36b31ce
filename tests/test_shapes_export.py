"""The exporter writes BAGEL-format files that read back to exactly what the world generated."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hyperbagel.datamodules.shapes import ShapesWorld
from hyperbagel.datamodules.shapes_export import export_shapes_world, main
from hyperbagel.datamodules.shapes_scene import Scene
from hyperbagel.datamodules.shapes_text import describe_scene


def _decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    info = export_shapes_world(
        out,
        n_t2i=11,
        n_edit=9,
        n_vqa=7,
        vqa_follow_ups=2,
        split="val",
        canvas_size=32,
        seed=2,
        rows_per_file=5,
        row_group_size=2,
    )
    return out, info


def test_t2i_parquet(exported):
    out, info = exported
    entry = info["t2i_pretrain"]["shapes_val"]
    files = sorted((out / "t2i" / "val").glob("*.parquet"))
    assert entry["num_files"] == len(files) == 3 and entry["num_total_samples"] == 11
    index = json.loads((out / "t2i" / "parquet_info" / "val.json").read_text())
    assert set(index) == {str(f.resolve()) for f in files}
    rows = []
    for f in files:
        pf = pq.ParquetFile(f)
        assert index[str(f.resolve())] == {
            "num_row_groups": pf.num_row_groups,
            "num_rows": pf.metadata.num_rows,
        }
        assert pf.num_row_groups == -(-pf.metadata.num_rows // 2)
        rows += pf.read().to_pylist()
    expected = ShapesWorld(canvas_size=32, seed=2).samples("t2i", "val", 11)
    assert len(rows) == 11
    for row, sample in zip(rows, expected, strict=True):
        assert json.loads(row["captions"]) == {"prompt": sample.prompt}
        assert row["category"] == sample.category
        assert Scene.from_json(row["scene"]) == sample.scene
        assert np.array_equal(_decode(row["image"]), np.asarray(sample.image))


def test_edit_parquet(exported):
    out, info = exported
    entry = info["unified_edit"]["shapes_val"]
    index = json.loads(open(entry["parquet_info_path"]).read())
    rows = [r for path in sorted(index) for r in pq.read_table(path).to_pylist()]
    assert sum(v["num_rows"] for v in index.values()) == entry["num_total_samples"] == 9
    expected = ShapesWorld(canvas_size=32, seed=2).samples("edit", "val", 9)
    for row, sample in zip(rows, expected, strict=True):
        source, target = row["image_list"]
        assert np.array_equal(_decode(source), np.asarray(sample.source_image))
        assert np.array_equal(_decode(target), np.asarray(sample.target_image))
        assert row["instruction_list"] == [list(sample.instructions)]
        assert row["instruction_list"][0][0] == sample.instruction
        assert row["kind"] == sample.kind
        assert [Scene.from_json(x) for x in json.loads(row["scenes"])] == [sample.source, sample.target]


def test_vqa_jsonl(exported):
    out, info = exported
    entry = info["vlm_sft"]["shapes_val"]
    lines = open(entry["jsonl_path"]).read().splitlines()
    expected = ShapesWorld(canvas_size=32, seed=2).samples("vqa", "val", 7)
    assert len(lines) == entry["num_total_samples"] == 7
    ids = set()
    for line, sample in zip(lines, expected, strict=True):
        row = json.loads(line)
        ids.add(row["id"])
        human, gpt, *follow_ups = row["conversations"]
        assert human == {"from": "human", "value": "<image>\n" + sample.question}
        assert gpt == {"from": "gpt", "value": sample.answer}
        expected_follow_ups = ShapesWorld(canvas_size=32, seed=2).follow_up_questions(
            sample.scene, 2, key=f"val|{len(ids) - 1}"
        )
        assert [
            (q["value"], a["value"]) for q, a in zip(follow_ups[::2], follow_ups[1::2])
        ] == expected_follow_ups
        assert len(follow_ups) == 4 and [t["from"] for t in follow_ups] == ["human", "gpt"] * 2
        image_path = out / "vqa" / "images" / row["image"]
        assert image_path.parent.name == "val" and entry["data_dir"] == str(out / "vqa" / "images")
        assert np.array_equal(np.asarray(Image.open(image_path).convert("RGB")), np.asarray(sample.image))
    assert len(ids) == 7


def test_text_vqa_jsonl_asks_the_image_rows_questions_about_the_description(exported):
    out, info = exported
    entry = info["text_sft"]["shapes_val"]
    assert entry["jsonl_path"] == str(out / "vqa_text" / "val.jsonl") and entry["num_total_samples"] == 7
    image_rows = [json.loads(line) for line in open(info["vlm_sft"]["shapes_val"]["jsonl_path"])]
    text_rows = [json.loads(line) for line in open(entry["jsonl_path"])]
    expected = ShapesWorld(canvas_size=32, seed=2).samples("vqa", "val", 7)
    for text_row, image_row, sample in zip(text_rows, image_rows, expected, strict=True):
        assert "image" not in text_row and text_row["id"] == image_row["id"]
        first, *rest = text_row["conversations"]
        assert first == {"from": "human", "value": f"{describe_scene(sample.scene)}\n{sample.question}"}
        assert rest == image_row["conversations"][1:]  # same answer, same follow-up turns


def test_dataset_info_merges_splits_and_cli(exported, capsys):
    out, _ = exported
    main(
        [
            "--out",
            str(out),
            "--split",
            "test",
            "--n-t2i",
            "3",
            "--n-edit",
            "0",
            "--n-vqa",
            "2",
            "--canvas-size",
            "32",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"t2i_pretrain", "vlm_sft", "text_sft"}
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info["t2i_pretrain"]) == {"shapes_val", "shapes_test"}
    assert set(info["unified_edit"]) == {"shapes_val"}
    assert pq.read_table(out / "t2i" / "test" / "part-00000.parquet").num_rows == 3
    with pytest.raises(ValueError, match="split"):
        export_shapes_world(out, split="dev")
