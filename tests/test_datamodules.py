"""BAGEL-format readers, CFG dropout, packing budgets, rank/worker sharding, exact resume, data modules."""

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torch.utils.data import DataLoader

from hyperbagel.backbone.config import SpecialTokenIds, tiny_config
from hyperbagel.backbone.image_transforms import target_size, vae_input, vit_input
from hyperbagel.backbone.packing import NOISE, TextBlock, VaeImage, VitImage, sample_length
from hyperbagel.datamodules.cfg_dropout import CfgDropout
from hyperbagel.datamodules.interleaved import InterleavedDataModule
from hyperbagel.datamodules.packed_dataset import (
    BadDataError,
    DataGroup,
    PackedDataset,
    keep_pack,
    normalise_groups,
)
from hyperbagel.datamodules.readers import BadRow, EditReader, Origin, T2IReader, VLMReader
from hyperbagel.datamodules.shapes_datamodule import SETTINGS_FILE, ShapesDataModule
from hyperbagel.datamodules.shapes_tokenizer import build_shapes_tokenizer

from helpers import record_batches, roundtrip

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# --- fixtures and file builders ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return build_shapes_tokenizer()


@pytest.fixture(scope="module")
def config(tok):
    config = tiny_config()
    config.special_tokens = SpecialTokenIds.from_tokenizer(tok)
    return config


def image(color=RED, size=(8, 8)) -> Image.Image:
    return Image.new("RGB", size, color)


def png(color=RED, size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    image(color, size).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, columns: dict, row_group_size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path.resolve())


def write_jsonl(path: Path, lines: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path.resolve())


def vlm_row(images, question="what color is the circle ?", answer="red"):
    placeholders = "<image>\n" * (len(images) if isinstance(images, list) else 1)
    return {
        "image": images,
        "conversations": [
            {"from": "human", "value": placeholders + question},
            {"from": "gpt", "value": answer},
        ],
    }


COLORS = [RED, GREEN, BLUE, (255, 255, 0)]
WORDS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> dict:
    """A clean mixture: 24 t2i rows (2 files), 10 edit rows (some chains), 12 vlm rows."""
    root = tmp_path_factory.mktemp("mixture")
    t2i = []
    for f in range(2):
        rows = range(12 * f, 12 * f + 12)
        t2i.append(
            write_parquet(
                root / "t2i" / f"part-{f}.parquet",
                {
                    "image": [png(COLORS[i % 4]) for i in rows],
                    "captions": [json.dumps({"a": f"a {WORDS[i % 4]} circle"}) for i in rows],
                },
                row_group_size=3,
            )
        )
    edit = write_parquet(
        root / "edit" / "part-0.parquet",
        {
            "image_list": [
                [png(COLORS[i % 4]), png(COLORS[(i + 1) % 4])] + [png()] * (i % 2) for i in range(10)
            ],
            "instruction_list": [
                [["make it blue", "turn it blue"]] + [["make it red"]] * (i % 2) for i in range(10)
            ],
        },
        row_group_size=2,
    )
    (root / "vlm" / "images").mkdir(parents=True)
    for k, color in enumerate(COLORS):
        image(color).save(root / "vlm" / "images" / f"{k}.png")
    vlm = write_jsonl(
        root / "vlm" / "train.jsonl", [vlm_row(f"{i % 4}.png", answer=WORDS[i % 4]) for i in range(12)]
    )
    groups = [
        {"kind": "t2i", "paths": [str(root / "t2i")], "weight": 2.0},
        {"kind": "edit", "paths": [edit], "weight": 1.0},
        {"kind": "vlm", "paths": [vlm], "image_root": str(root / "vlm" / "images"), "weight": 1.0},
    ]
    return {"root": root, "t2i": t2i, "edit": edit, "vlm": vlm, "groups": groups}


def dataset(groups, tok, config, **kwargs) -> PackedDataset:
    defaults = {"expected_tokens": 60, "max_tokens": 100, "max_tokens_per_sample": 80}
    return PackedDataset(groups, tok, config, **{**defaults, **kwargs})


def take(iterable, n):
    iterator = iter(iterable)
    return [next(iterator) for _ in range(n)]


# --- readers --------------------------------------------------------------------------------------------
def test_t2i_reader_blocks_resize_and_bad_rows(tmp_path, tok, config):
    captions = {"a": "a red circle", "b": "a blue square"}
    path = write_parquet(
        tmp_path / "t2i.parquet",
        {
            "image": [png(size=(40, 24)), b"not an image", png(), png(), png()[:40], png()],
            "captions": [
                json.dumps(captions),
                json.dumps(captions),
                None,
                '{"p": "a green triangle"}',
                "{}",
                "oops",
            ],
        },
        row_group_size=2,
    )
    results = list(T2IReader([path], tok, config))
    assert [origin for origin, _ in results] == [Origin(path, r) for r in range(6)]
    good = {origin.row: result for origin, result in results if not isinstance(result, BadRow)}
    bad = {origin.row: result for origin, result in results if isinstance(result, BadRow)}
    assert sorted(good) == [0, 3] and sorted(bad) == [1, 2, 4, 5]
    assert "undecodable image" in bad[1].reason and bad[1].file == path and bad[1].row == 1
    assert "missing field 'captions'" in bad[2].reason
    assert "undecodable image" in bad[4].reason
    assert "not JSON" in bad[5].reason
    text, vae = good[0]
    assert isinstance(text, TextBlock) and not text.loss
    assert text.ids in (tok.encode(c, add_special_tokens=False) for c in captions.values())
    assert isinstance(vae, VaeImage) and vae.noisy and vae.latents is None
    # BAGEL's resize rule with the config's VAE stride and sides: aspect kept, longer side capped.
    stride, largest = config.image_stride, config.vae_max_image_size
    width, height = target_size(40, 24, stride, largest, config.vae_min_image_size)
    assert vae.pixels.shape == (3, height, width) and width == largest and height % stride == 0
    assert abs(height / width - 24 / 40) <= stride / width
    assert torch.allclose(vae.pixels[0], torch.ones(height, width))
    assert torch.allclose(vae.pixels[1:], -torch.ones(2, height, width))
    assert good[3][0].ids == tok.encode("a green triangle", add_special_tokens=False)


def test_t2i_missing_column_marks_every_row_bad(tmp_path, tok, config):
    path = write_parquet(tmp_path / "t2i.parquet", {"image": [png(), png()]}, row_group_size=1)
    results = list(T2IReader([path], tok, config))
    assert [r.reason for _, r in results] == ["missing field 'captions'"] * 2


def test_t2i_caption_is_picked_at_random(tmp_path, tok, config):
    reader = T2IReader([], tok, config)
    raw = {"image": png(), "captions": json.dumps({"a": "a red circle", "b": "a blue square"})}
    picked = {tuple(reader.build(raw, np.random.default_rng(s))[0].ids) for s in range(40)}
    assert len(picked) == 2


def test_edit_reader_single_turn_multi_turn_chain_and_bad_rows(tmp_path, tok, config):
    path = write_parquet(
        tmp_path / "edit.parquet",
        {
            "image_list": [
                [png(RED), png(BLUE)],
                [png(RED), png(GREEN), png(BLUE)],
                [png(RED), png(GREEN), png(BLUE)],
                [png(RED), b"\x89PNG broken"],
                [png(RED), png(BLUE)],
                [png(RED)],
            ],
            "instruction_list": [
                [["make it blue", "turn it blue"]],
                [["make it green"], ["make it blue", "turn it blue"]],
                [["make it green"]],
                [["make it blue"]],
                [[]],
                [],
            ],
        },
        row_group_size=4,
    )
    results = dict(EditReader([path], tok, config))
    single, chain = results[Origin(path, 0)], results[Origin(path, 1)]
    kinds = [(type(b).__name__, getattr(b, "noisy", None), getattr(b, "loss", None)) for b in chain]
    turn = [
        ("VaeImage", False, None),
        ("VitImage", None, None),
        ("TextBlock", None, False),
        ("VaeImage", True, None),
    ]
    assert kinds == turn * 2 and len(single) == 4
    red, green, blue = (vae_input(image(c), config) for c in (RED, GREEN, BLUE))
    assert torch.equal(chain[0].pixels, red) and torch.equal(chain[3].pixels, green)
    assert torch.equal(chain[4].pixels, green) and torch.equal(
        chain[7].pixels, blue
    )  # target re-enters clean
    assert torch.equal(chain[5].pixels, vit_input(image(GREEN), config))
    assert chain[2].ids == tok.encode("make it green", add_special_tokens=False)
    assert chain[6].ids in (tok.encode(t, add_special_tokens=False) for t in ("make it blue", "turn it blue"))
    reasons = {origin.row: r.reason for origin, r in results.items() if isinstance(r, BadRow)}
    assert sorted(reasons) == [2, 3, 4, 5]
    assert "1 turns for 3 images" in reasons[2]
    assert "undecodable image in image_list[1]" in reasons[3]
    assert "non-empty list" in reasons[4]
    assert "at least 2" in reasons[5]


def test_vlm_reader_placeholders_loss_flags_and_bad_rows(tmp_path, tok, config):
    images = tmp_path / "images"
    images.mkdir()
    image(RED).save(images / "r.png")
    image(BLUE, size=(12, 8)).save(images / "b.png")
    two_turns = {
        "image": ["r.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "is <image> left of <image> ?"},
            {"from": "gpt", "value": "one"},
            {"from": "human", "value": "what color ?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    lines = [
        vlm_row("r.png"),
        two_turns,
        "",
        {
            "image": "r.png",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}],
        },
        {"image": "r.png", "conversations": []},
        vlm_row("missing.png"),
        "{not json",
        {"image": "r.png", "conversations": [{"from": "human", "value": "<image>"}]},
        {"conversations": [{"from": "human", "value": "what ?"}, {"from": "gpt", "value": "a red circle"}]},
        {
            "image": "r.png",
            "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image>"}],
        },
    ]
    path = write_jsonl(tmp_path / "vlm.jsonl", lines)
    results = dict(VLMReader([path], tok, config, image_root=str(images), lines_per_unit=3))
    assert sorted(o.row for o in results) == [0, 1, 3, 4, 5, 6, 7, 8, 9]  # blank line 2 is no row

    def layout(sample):
        return [("vit",) if isinstance(b, VitImage) else (tok.decode(b.ids), b.loss) for b in sample]

    assert layout(results[Origin(path, 0)]) == [
        ("vit",),
        ("what color is the circle ?", False),
        ("red", True),
    ]
    sample = results[Origin(path, 1)]
    assert layout(sample) == [
        ("is", False),
        ("vit",),
        ("left of", False),
        ("vit",),
        ("?", False),
        ("one", True),
        ("what color ?", False),
        ("red", True),
    ]
    assert torch.equal(sample[1].pixels, vit_input(image(RED), config))
    assert torch.equal(sample[3].pixels, vit_input(image(BLUE, (12, 8)), config))
    assert layout(results[Origin(path, 8)]) == [("what ?", False), ("a red circle", True)]
    reasons = {o.row: r.reason for o, r in results.items() if isinstance(r, BadRow)}
    assert sorted(reasons) == [3, 4, 5, 6, 7, 9]
    assert "0 <image> placeholders for 1 images" in reasons[3]
    assert "empty conversations" in reasons[4]
    assert "not found" in reasons[5]
    assert "invalid JSON" in reasons[6]
    assert "no gpt turn" in reasons[7]
    assert "gpt turn holding <image>" in reasons[9]


def test_parquet_info_index_and_per_sample_budget(tmp_path, tok, config):
    path = write_parquet(
        tmp_path / "data" / "part-0.parquet",
        {
            "image": [png()] * 5,
            "captions": [json.dumps({"p": c}) for c in ["a red circle", "a red circle and a blue square"] * 2]
            + ['{"p": "red"}'],
        },
        row_group_size=2,
    )
    info = tmp_path / "info.json"
    info.write_text(json.dumps({path: {"num_row_groups": 3, "num_rows": 5}}))
    raw = {"image": png(), "captions": '{"p": "a red circle"}'}
    short = sample_length(T2IReader([], tok, config).build(raw, np.random.default_rng(0)), config)
    indexed = list(T2IReader([], tok, config, max_tokens_per_sample=short, parquet_info=str(info)))
    listed = list(T2IReader([str(tmp_path / "data")], tok, config, max_tokens_per_sample=short))
    assert [o for o, _ in indexed] == [o for o, _ in listed] == [Origin(path, r) for r in range(5)]
    bad = [o.row for o, r in indexed if isinstance(r, BadRow)]
    assert bad == [1, 3]
    assert f"{short + 4} tokens exceeds the per-sample budget {short}" in indexed[1][1].reason


# --- CFG dropout ----------------------------------------------------------------------------------------
def within(count, n, p, sigmas=4.0):
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_cfg_dropout_rates_and_protected_blocks():
    pixels = torch.zeros(3, 16, 16)
    clean, vit, text, noisy = (
        VaeImage(pixels=pixels),
        VitImage(pixels),
        TextBlock([1, 2]),
        VaeImage(pixels, noisy=True),
    )
    answer = TextBlock([3], loss=True)
    edit = [clean, vit, text, noisy]
    dropout = CfgDropout(text=0.1, vit=0.4, vae=0.2)
    rng = np.random.default_rng(0)
    n = 4000
    kept = {"clean": 0, "vit": 0, "text": 0, "noisy": 0, "vit_and_vae_dropped": 0}
    for _ in range(n):
        out = dropout.apply(edit, rng)
        kept["clean"] += any(b is clean for b in out)
        kept["vit"] += any(b is vit for b in out)
        kept["text"] += any(b is text for b in out)
        kept["noisy"] += any(b is noisy for b in out)
        kept["vit_and_vae_dropped"] += not any(b is vit or b is clean for b in out)
    assert kept["noisy"] == n
    assert (
        within(n - kept["text"], n, 0.1)
        and within(n - kept["vit"], n, 0.4)
        and within(n - kept["clean"], n, 0.2)
    )
    assert within(kept["vit_and_vae_dropped"], n, 0.4 * 0.2)  # independent per block
    assert not within(n - kept["vit"], n, 0.3)  # the test can tell 0.4 from 0.3
    understanding = [vit, text, answer]
    assert all(dropout.apply(understanding, rng) == understanding for _ in range(200))
    generation_with_loss_text = [answer, noisy]
    assert all(dropout.apply(generation_with_loss_text, rng) == generation_with_loss_text for _ in range(200))
    with pytest.raises(ValueError, match="not in"):
        CfgDropout(text=1.5)


def test_cfg_dropout_rate_realised_in_packs(mixture, tok, config):
    data = dataset(
        [mixture["groups"][0]], tok, config, expected_tokens=80, max_tokens=100, dropout=CfgDropout(text=0.5)
    )
    samples = texts = 0
    for pack in take(data, 60):
        samples += pack.num_samples
        kinds = pack.packed.split_kinds
        texts += int((kinds != NOISE).sum())  # a t2i sample is [caption?, noisy VAE]
    assert samples > 400 and within(samples - texts, samples, 0.5)


# --- packing ---------------------------------------------------------------------------------------------
def test_packing_budgets_greedy_rule_masks_and_rope(mixture, tok, config, tmp_path):
    long_caption = write_parquet(
        tmp_path / "long.parquet",
        {"image": [png()] * 4, "captions": [json.dumps({"p": "a red circle " * n}) for n in (40, 40, 40, 1)]},
        row_group_size=4,
    )
    groups = [*mixture["groups"], {"kind": "t2i", "paths": [long_caption], "name": "long"}]
    data = dataset(groups, tok, config, expected_tokens=90, max_tokens=120, max_tokens_per_sample=100)
    packs = take(data, 40)
    bad = [b for p in packs for b in p.bad_rows]
    assert bad and all(b.file == long_caption and "per-sample budget 100" in b.reason for b in bad)
    for pack, following in zip(packs, packs[1:]):
        packed = pack.packed
        assert packed.shape == (1, pack.num_tokens) and pack.num_tokens <= 120
        sample_ids = packed.sample_ids[0]
        assert len(set(sample_ids.tolist())) == pack.num_samples == len(pack.origins)
        if pack.num_tokens < 90:  # closed early only because the next sample did not fit
            assert pack.num_tokens + int((following.packed.sample_ids[0] == 0).sum()) > 120
        mask = packed.block_mask()[0]
        same_sample = sample_ids[:, None] == sample_ids[None, :]
        assert not (mask & ~same_sample).any()
        splits = packed.split_ids[0]
        noise = packed.split_kinds[splits] == NOISE
        assert not (mask & noise[None, :] & (splits[:, None] != splits[None, :])).any()
        for s in range(pack.num_samples):
            first = int((sample_ids == s).nonzero()[0])
            assert packed.position_ids[0, first] == 0  # RoPE restarts per sample
        assert packed.input_ids[0, 0] == config.special_tokens.im_start or packed.input_ids[0, 0] == (
            config.special_tokens.vision_start
        )
    assert sum(p.num_tokens >= 90 for p in packs) > len(packs) // 2


def test_budget_arguments_are_checked(mixture, tok, config):
    with pytest.raises(ValueError, match="max_tokens_per_sample"):
        dataset(mixture["groups"], tok, config, max_tokens=50, max_tokens_per_sample=60)
    with pytest.raises(ValueError, match="expected_tokens"):
        dataset(mixture["groups"], tok, config, expected_tokens=200, max_tokens=100)


# --- bad rows -------------------------------------------------------------------------------------------
def half_bad_t2i(path: Path) -> str:
    return write_parquet(
        path,
        {
            "image": [png() if i % 2 else b"garbage" for i in range(20)],
            "captions": [json.dumps({"p": "a red circle"})] * 20,
        },
        row_group_size=5,
    )


def test_max_bad_fraction_stops_with_files_and_rows(tmp_path, tok, config):
    path = half_bad_t2i(tmp_path / "half_bad.parquet")
    data = dataset(
        [{"kind": "t2i", "paths": [path]}], tok, config, max_bad_fraction=0.2, bad_fraction_min_rows=10
    )
    with pytest.raises(BadDataError, match=r"max_bad_fraction 20\.0%") as error:
        take(data, 50)
    message = str(error.value)
    assert path in message and "row " in message and "undecodable image" in message


def test_bad_rows_are_counted_by_the_datamodule(tmp_path, tok):
    path = half_bad_t2i(tmp_path / "half_bad.parquet")
    module = InterleavedDataModule(
        groups=[{"kind": "t2i", "paths": [path]}],
        tokenizer="shapes",
        model_config="tiny",
        expected_tokens=20,
        max_tokens=40,
        max_tokens_per_sample=40,
        max_bad_fraction=0.6,
        bad_fraction_min_rows=10,
    )
    packs = consume(module, 6)
    assert module.bad_row_count == len(module.bad_rows) == sum(len(p.bad_rows) for p in packs) > 0
    assert all(b.file == path and b.row % 2 == 0 for b in module.bad_rows)
    assert module.rows_read == module.bad_row_count + sum(p.num_samples for p in packs)


def all_good_t2i_origins(paths):
    return {
        o
        for p in paths
        for o, r in T2IReader([p], build_shapes_tokenizer(), tiny_config())
        if not isinstance(r, BadRow)
    }


# --- sharding -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row_group_size", [2, 100])  # whole units per shard / rows split within units
def test_ranks_and_workers_read_disjoint_shares(tmp_path, tok, config, row_group_size):
    path = write_parquet(
        tmp_path / "t2i.parquet",
        {"image": [png()] * 20, "captions": [json.dumps({"p": "a red circle"})] * 20},
        row_group_size=row_group_size,
    )
    groups = [{"kind": "t2i", "paths": [path]}]
    every_row = {Origin(path, r) for r in range(20)}
    shares = []
    for rank in range(2):
        data = dataset(groups, tok, config, infinite=False, rank=rank, world_size=2)
        loader = DataLoader(data, batch_size=None, num_workers=2, collate_fn=keep_pack)
        by_stream = {0: [], 1: []}
        for pack in loader:
            assert pack.cursor is None
            by_stream[pack.stream] += pack.origins
        shares += list(by_stream.values())
    assert all(shares) and sum(len(s) for s in shares) == 20 and set().union(*shares) == every_row
    # Training streams shuffle, and their first epochs still partition the data.
    epoch = []
    for rank in range(2):
        data = dataset(groups, tok, config, expected_tokens=1, rank=rank, world_size=2)
        epoch.append([p.origins[0] for p in take(data, 10)])
    assert set(epoch[0]).isdisjoint(epoch[1]) and set(epoch[0]) | set(epoch[1]) == every_row
    assert epoch[0] != sorted(epoch[0])


# --- resume -----------------------------------------------------------------------------------------------
def make_module(groups, num_workers=0, **kwargs):
    budgets = {"expected_tokens": 60, "max_tokens": 100, "max_tokens_per_sample": 80}
    return InterleavedDataModule(
        groups=groups,
        tokenizer="shapes",
        model_config="tiny",
        num_workers=num_workers,
        **{**budgets, **kwargs},
    )


def consume(module, n):
    """Packs as the trainer sees them: each passes on_before_batch_transfer before its step."""
    packs = []
    for pack in take(module.train_dataloader(), n):
        packs.append(module.on_before_batch_transfer(pack, 0))
    return packs


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_next_unseen_samples(mixture, num_workers):
    n, m = 3, 5
    reference = consume(make_module(mixture["groups"], num_workers), n + m)
    if num_workers:
        assert [p.stream for p in reference] == [k % 2 for k in range(n + m)]
    interrupted = make_module(mixture["groups"], num_workers)
    consume(interrupted, n)
    state = roundtrip(interrupted.state_dict())
    restored = make_module(mixture["groups"], num_workers)
    restored.load_state_dict(state)
    resumed = consume(restored, m)
    assert [p.origins for p in resumed] == [p.origins for p in reference[n:]]
    assert all(torch.equal(a.packed.input_ids, b.packed.input_ids) for a, b in zip(resumed, reference[n:]))
    assert restored.rows_read == sum(p.num_samples for p in reference)
    fresh = consume(make_module(mixture["groups"], num_workers), m)  # without the state: starts over
    assert [p.origins for p in fresh] != [p.origins for p in reference[n:]]


def test_resume_with_other_worker_count_is_refused_or_restarted(mixture):
    module = make_module(mixture["groups"], num_workers=0)
    consume(module, 2)
    state = module.state_dict()
    other = make_module(mixture["groups"], num_workers=2)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="strict_resume"):
        other.train_dataloader()
    lenient = make_module(mixture["groups"], num_workers=0, strict_resume=False)
    state["world_size"] = 2
    lenient.load_state_dict(state)
    with pytest.warns(UserWarning, match="restarting"):
        lenient.train_dataloader()
    assert lenient.position.cursors == {}


def origins(pack):
    return pack.origins


def test_lightning_checkpoint_resume_is_exact(mixture, tmp_path):
    reference = record_batches(make_module(mixture["groups"]), 6, origins)
    checkpoint = tmp_path / "step2.ckpt"
    assert record_batches(make_module(mixture["groups"]), 2, origins, save_to=checkpoint) == reference[:2]
    assert "InterleavedDataModule" in torch.load(checkpoint, weights_only=False)
    resumed = record_batches(make_module(mixture["groups"]), 6, origins, ckpt_path=str(checkpoint))
    assert resumed == reference[2:]


def test_pack_moves_to_device_with_its_images(mixture, tok, config):
    pack = next(
        p for p in dataset(mixture["groups"], tok, config) if p.packed.vit_images and p.packed.vae_images
    )
    moved = move_data_to_device(pack, torch.device("meta"))
    tensors = [moved.packed.input_ids, moved.packed.vae_index, *moved.packed.vit_images]
    tensors += [image.pixels for image in moved.packed.vae_images]
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.origins == pack.origins and pack.packed.input_ids.device.type == "cpu"
    assert [i.noisy for i in moved.packed.vae_images] == [i.noisy for i in pack.packed.vae_images]


# --- configuration ----------------------------------------------------------------------------------------
def test_groups_from_yaml_and_checked(mixture):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(InterleavedDataModule, "data")
    groups = "\n".join(
        f"    - {{kind: {g['kind']}, paths: {json.dumps(g['paths'])}, weight: {g['weight']}"
        + (f", image_root: {g['image_root']}}}" if "image_root" in g else "}")
        for g in mixture["groups"]
    )
    config = parser.parse_string(f"data:\n  tokenizer: shapes\n  model_config: tiny\n  groups:\n{groups}\n")
    module = parser.instantiate_classes(config).data
    assert [(g.name, g.kind, g.weight) for g in module.groups] == [
        ("t2i", "t2i", 2.0),
        ("edit", "edit", 1.0),
        ("vlm", "vlm", 1.0),
    ]
    with pytest.raises(ValueError, match="known kinds"):
        normalise_groups([{"kind": "video", "paths": []}])
    with pytest.raises(ValueError, match="unique"):
        normalise_groups([DataGroup("t2i", name="x"), DataGroup("edit", name="x")])
    assert [g.name for g in normalise_groups([DataGroup("t2i"), DataGroup("t2i")])] == ["t2i0", "t2i1"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_module([{"kind": "t2i", "paths": ["/no/such/file.parquet"]}]).train_dataloader()


# --- shapes world ---------------------------------------------------------------------------------------
def test_shapes_datamodule_exports_once_and_reads_through_the_readers(tmp_path):
    kwargs = {"model_config": "tiny", "data_root": str(tmp_path / "shapes"), "n_train": 6, "n_val": 2}
    kwargs |= {"canvas_size": 32, "row_group_size": 2, "expected_tokens": 200, "max_tokens": 300}
    module = ShapesDataModule(**kwargs, max_tokens_per_sample=300)
    module.prepare_data()
    settings = json.loads((tmp_path / "shapes" / SETTINGS_FILE).read_text())
    assert settings["train"]["n"] == 6 and settings["val"]["n"] == 2
    part = tmp_path / "shapes" / "t2i" / "train" / "part-00000.parquet"
    stamp = part.stat().st_mtime_ns
    ShapesDataModule(**kwargs).prepare_data()
    assert part.stat().st_mtime_ns == stamp  # not exported again
    # A root an older exporter wrote (no layout version, no reading rows) is exported again.
    older = {split: {k: v for k, v in done.items() if k != "layout"} for split, done in settings.items()}
    (tmp_path / "shapes" / SETTINGS_FILE).write_text(json.dumps(older))
    shutil.rmtree(tmp_path / "shapes" / "vqa_text")
    ShapesDataModule(**kwargs).prepare_data()
    assert (tmp_path / "shapes" / "vqa_text" / "train.jsonl").is_file()
    assert json.loads((tmp_path / "shapes" / SETTINGS_FILE).read_text()) == settings
    packs = consume(module, 6)
    assert {g for p in packs for g in p.groups} == {"t2i", "editing", "vqa"}
    assert not module.bad_rows
    val = list(module.val_dataloader())
    origins = [o for p in val for o in p.origins]
    assert len(origins) == len(set(origins)) == 6 and all("val" in o.file for o in origins)
    assert sorted(g for p in val for g in p.groups) == ["editing"] * 2 + ["t2i"] * 2 + ["vqa"] * 2
    only_gen = ShapesDataModule(**kwargs, vqa_weight=0.0)
    assert [g.name for g in only_gen.groups] == ["t2i", "editing"]
    reading_mix = {"t2i_weight": 0.0, "edit_weight": 0.0, "vqa_weight": 0.0, "text_vqa_weight": 1.0}
    reading = ShapesDataModule(**kwargs, **reading_mix, max_tokens_per_sample=300)
    assert [g.name for g in reading.groups] == ["vqa_text"]
    packs = consume(reading, 2)
    assert {g for p in packs for g in p.groups} == {"vqa_text"} and not reading.bad_rows
    assert all(not p.packed.vit_images and not p.packed.vae_images and len(p.packed.ce_labels) for p in packs)
