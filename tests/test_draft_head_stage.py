"""The draft-head stage (frozen target, TTT loss, offline features, export) and answer regeneration."""

import json

import pytest
import torch
from PIL import Image

from hyperbagel.backbone.image_transforms import vit_input
from hyperbagel.backbone.packing import TextBlock, VitImage, pack
from hyperbagel.speculative.regenerate import main as regenerate_main


def _greedy_without_cache(model, context, max_new_tokens):
    """Plain greedy answer by full forwards (no KV cache): the reference the regenerator must match."""
    im_end = model.config.special_tokens.im_end
    ids = []
    while len(ids) < max_new_tokens:
        packed = pack([[[*context, TextBlock(ids)]]], model.config)
        with torch.no_grad():
            hidden = model.forward_packed(packed).hidden[0, packed.valid_lengths[0] - 2]
        token = int(model.language_model.lm_head(hidden).argmax())
        if token == im_end:
            return ids, True
        ids.append(token)
    return ids, False


@pytest.fixture
def answering_bagel(tiny_bagel):
    """A tiny model whose greedy answers differ by prompt and sometimes end early (`<|im_end|>` takes the
    place of one frequent token)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tiny_bagel.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
        head = tiny_bagel.language_model.lm_head.weight
        head[tiny_bagel.config.special_tokens.im_end] = head[25]
    return tiny_bagel


def test_regenerate_answers_with_the_target(answering_bagel, shapes_tokenizer, tmp_path, capsys) -> None:
    model, tokenizer = answering_bagel, shapes_tokenizer
    model.save_pretrained(tmp_path / "target", tokenizer=tokenizer)
    images = tmp_path / "images"
    images.mkdir()
    colours = {"a.png": (200, 30, 30), "b.png": (30, 30, 200), "c.png": (30, 200, 30)}
    for name, colour in colours.items():
        Image.new("RGB", (16, 16), colour).save(images / name)
    questions = ["what color is the circle ?", "how many shapes are there ?", "describe the image ."]
    rows = [
        {
            "id": "one",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{questions[0]}"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {
            "id": "missing",
            "image": "nowhere.png",
            "conversations": [{"from": "human", "value": "<image>\nred ?"}, {"from": "gpt", "value": "yes"}],
        },
        {
            "id": "two turns",
            "image": "a.png",
            "extra": [1, 2],
            "conversations": [
                {"from": "human", "value": f"<image>\n{questions[0]}"},
                {"from": "gpt", "value": "two"},
                {"from": "human", "value": questions[2]},
                {"from": "gpt", "value": "a square ."},
            ],
        },
        {
            "id": "three",
            "image": "c.png",
            "conversations": [
                {"from": "human", "value": f"{questions[2]} <image>"},
                {"from": "gpt", "value": "green"},
            ],
        },
        {
            "id": "four",
            "image": "b.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{questions[1]}"},
                {"from": "gpt", "value": "red"},
            ],
        },
    ]
    data = tmp_path / "vqa.jsonl"
    data.write_text(
        "\n".join([json.dumps(r) for r in rows[:2]] + ["{not json"] + [json.dumps(r) for r in rows[2:]])
    )
    max_new = 8

    expected = {}
    for row in rows[:1] + rows[2:]:
        image = VitImage(vit_input(Image.open(images / row["image"]).convert("RGB"), model.config))
        context, answers, complete = [], [], True
        for turn in row["conversations"]:
            if turn["from"] == "gpt":
                ids, finished = _greedy_without_cache(model, context, max_new)
                complete &= finished
                answers.append(tokenizer.decode(ids))
                context.append(TextBlock(ids, loss=True))
                continue
            before, _, after = turn["value"].partition("<image>")
            context += [
                TextBlock(tokenizer.encode(t.strip(), add_special_tokens=False))
                for t in [before]
                if t.strip()
            ]
            if "<image>" in turn["value"]:
                context.append(image)
            context += (
                [TextBlock(tokenizer.encode(after.strip(), add_special_tokens=False))]
                if after.strip()
                else []
            )
        if complete:
            expected[row["id"]] = answers
    assert "two turns" in expected and len(expected) < 4, (
        "the fixture should give complete and cut-off answers"
    )

    out = tmp_path / "out" / "regenerated.jsonl"
    regenerate_main(
        [
            "--model",
            str(tmp_path / "target"),
            "--data",
            str(data),
            "--out",
            str(out),
            "--image-root",
            str(images),
            "--batch-size",
            "2",
            "--max-new-tokens",
            str(max_new),
            "--device",
            "cpu",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert (report["rows_read"], report["bad_rows"], report["rows_written"]) == (6, 2, len(expected))
    assert report["truncated_rows"] == 4 - len(expected)
    assert "image file" in report["first_bad_rows"][0] and "invalid JSON" in report["first_bad_rows"][1]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert {
        r["id"]: [t["value"] for t in r["conversations"] if t["from"] == "gpt"] for r in written
    } == expected
    originals = {r["id"]: r for r in rows}
    for row in written:  # everything but the answers is kept
        original = originals[row["id"]]
        assert {k: v for k, v in row.items() if k != "conversations"} == {
            k: v for k, v in original.items() if k != "conversations"
        }
        assert [t for t in row["conversations"] if t["from"] == "human"] == [
            t for t in original["conversations"] if t["from"] == "human"
        ]
