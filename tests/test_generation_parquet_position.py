"""The parquet distillation data resumes exactly: a restored stream yields the very batches the
interrupted one would have, items waiting in buckets and later turns of an edit chain included."""

import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hyperbagel.datamodules.generation_datamodule import ParquetGenerationDataModule, PositionedBatch
from hyperbagel.datamodules.packed_dataset import BadDataError

from helpers import record_batches, roundtrip

WORDS = ["red", "green", "blue", "yellow"]


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


def color(row: int, salt: int) -> tuple[int, int, int]:
    """A colour per (row, image): targets tell every row apart."""
    return (row * 7 % 256, salt * 50 % 256, (row * 13 + salt) % 256)


def write(path: Path, columns: dict, row_group_size: int = 3) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("generation_parquet")
    t2i = write(
        root / "t2i.parquet",
        {
            "image": [png(color(row, 0)) for row in range(14)],
            "captions": [json.dumps({"a": f"a {WORDS[row % 4]} circle"}) for row in range(14)],
        },
    )
    edit = write(  # two-turn chains: one row gives two items
        root / "edit.parquet",
        {
            "image_list": [[png(color(row, k)) for k in (1, 2, 3)] for row in range(10)],
            "instruction_list": [[[f"make it {WORDS[row % 4]}"], ["make it red"]] for row in range(10)],
        },
    )
    return [{"kind": "t2i", "paths": [t2i]}, {"kind": "edit", "paths": [edit], "weight": 1.5}]


def make_module(groups: list[dict], num_workers: int = 0, **kwargs) -> ParquetGenerationDataModule:
    return ParquetGenerationDataModule(
        groups, "shapes", "tiny", batch_size=3, num_workers=num_workers, **kwargs
    )


def consume(module: ParquetGenerationDataModule, n: int) -> list:
    """Batches as the trainer sees them: each passes on_before_batch_transfer before its step."""
    loader = iter(module.train_dataloader())
    return [module.on_before_batch_transfer(next(loader), 0) for _ in range(n)]


def same(a, b) -> bool:
    return a.kinds == b.kinds and a.texts == b.texts and torch.equal(a.target_images, b.target_images)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_stream_continues_with_the_next_unseen_batches(groups, num_workers):
    total = 14
    reference = consume(make_module(groups, num_workers), total)
    assert {b.kinds[0] for b in reference} == {"t2i", "edit"}
    waited = 0
    for cut in (1, 4, 7, 10):
        interrupted = make_module(groups, num_workers)
        assert all(same(a, b) for a, b in zip(consume(interrupted, cut), reference))
        state = roundtrip(interrupted.state_dict())
        waited += sum(len(c["waiting"]) for c in state["ranks"][0]["cursors"].values())
        restored = make_module(groups, num_workers)
        restored.load_state_dict(state)
        resumed = consume(restored, total - cut)
        assert all(same(a, b) for a, b in zip(resumed, reference[cut:], strict=True)), cut
    assert waited > 0  # the cuts left items waiting in buckets, so their replay was exercised
    fresh = consume(make_module(groups, num_workers), 4)  # without the state: starts over
    assert all(same(a, b) for a, b in zip(fresh, reference))


def describe(batch) -> tuple:
    assert not isinstance(batch, PositionedBatch)  # the module hands the stage the bare batch
    return batch.kinds, batch.texts, batch.target_images.sum().item()


def test_lightning_checkpoint_resume_is_exact(groups, tmp_path):
    reference = record_batches(make_module(groups), 8, describe)
    checkpoint = tmp_path / "step3.ckpt"
    assert record_batches(make_module(groups), 3, describe, save_to=checkpoint) == reference[:3]
    assert "ParquetGenerationDataModule" in torch.load(checkpoint, weights_only=False)
    assert record_batches(make_module(groups), 8, describe, ckpt_path=str(checkpoint)) == reference[3:]


def test_bad_rows_are_skipped_counted_logged_and_capped(tmp_path, caplog):
    path = write(
        tmp_path / "half_bad.parquet",
        {
            "image": [png(color(row, 0)) if row % 2 else b"garbage" for row in range(20)],
            "captions": [json.dumps({"a": "a red circle"})] * 20,
        },
        row_group_size=5,
    )
    groups = [{"kind": "t2i", "paths": [path]}]
    module = make_module(groups, max_bad_fraction=0.6, bad_fraction_min_rows=10)
    with caplog.at_level(logging.WARNING, logger="hyperbagel.datamodules.resumable"):
        consume(module, 4)
    assert module.bad_rows and all(b.file == path and b.row % 2 == 0 for b in module.bad_rows)
    assert module.bad_row_count == len(module.bad_rows) and module.rows_read > module.bad_row_count
    assert "undecodable image" in str(module.bad_rows[0])
    assert f"skipped bad data row 1: {module.bad_rows[0]}" in caplog.messages
    strict = make_module(groups, max_bad_fraction=0.2, bad_fraction_min_rows=10)
    with pytest.raises(BadDataError, match=r"max_bad_fraction 20\.0%"):
        consume(strict, 4)
    with pytest.raises(ValueError, match="kinds"):
        make_module([{"kind": "vlm", "paths": [path]}])


def test_every_ranks_batch_of_a_step_has_one_kind(groups):
    """A sharded model needs it: each stream draws its batches' kinds from a seed without the rank."""
    module = make_module(groups)
    kinds = [
        [b.batch.kinds[0] for _, b in zip(range(12), module._stream(module.groups, None, rank, 2))]
        for rank in (0, 1)
    ]
    assert kinds[0] == kinds[1] and set(kinds[0]) == {"t2i", "edit"}
    texts = [
        [b.batch.texts for _, b in zip(range(4), module._stream(module.groups, None, rank, 2))]
        for rank in (0, 1)
    ]
    assert texts[0] != texts[1]  # the ranks read their own rows
