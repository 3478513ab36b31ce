"""Chat over images from `hyperbagel predict`: contexts, the prompt data module, and CLI runs on tiny
checkpoints whose answers must equal `BagelInferencer.chat`'s (greedy speculative decoding is lossless)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import save_pretrained
from hyperbagel.backbone.inference import BagelInferencer
from hyperbagel.backbone.packing import TextBlock, VitImage
from hyperbagel.cli import main
from hyperbagel.speculative.chat import ChatDataModule, ChatModule, ChatRequest, chat_sample
from hyperbagel.speculative.draft_head import DraftHead, DraftHeadConfig
from hyperbagel.speculative.export import export_draft_head

CHAT = "hyperbagel.speculative.chat"
QUESTIONS = ["describe the image .", "what colour is the circle ?"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One thread for tiny models; argv without pytest's flags for in-process CLI runs."""
    monkeypatch.setattr(sys, "argv", ["hyperbagel"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_images_go_first_or_where_the_placeholders_stand(tiny_bagel: Bagel, shapes_tokenizer) -> None:
    red, blue = Image.new("RGB", (16, 16), (200, 30, 30)), Image.new("RGB", (8, 8), (30, 30, 200))
    plain = chat_sample(tiny_bagel.config, shapes_tokenizer, "what colour ?", red)
    assert [type(b) for b in plain] == [VitImage, TextBlock]
    assert plain[1].ids == _ids(shapes_tokenizer, "what colour ?")

    placed = chat_sample(tiny_bagel.config, shapes_tokenizer, "left <image> right <image>", [red, blue])
    assert [type(b) for b in placed] == [TextBlock, VitImage, TextBlock, VitImage]
    assert [placed[0].ids, placed[2].ids] == [_ids(shapes_tokenizer, "left"), _ids(shapes_tokenizer, "right")]
    assert placed[1].pixels.shape[-1] != placed[3].pixels.shape[-1]  # the red one, then the blue one
    with pytest.raises(ValueError, match="1 <image> placeholders for 2 images"):
        chat_sample(tiny_bagel.config, shapes_tokenizer, "<image> which ?", [red, blue])


def _write_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, colour in enumerate([(200, 30, 30), (30, 160, 60)]):
        Image.new("RGB", (16, 16), colour).save(folder / f"scene{i}.png")
        names.append(f"scene{i}.png")
    return names


def _write_jsonl(path: Path, names: list[str]) -> None:
    rows = [
        {"image": names[0], "conversations": [{"from": "human", "value": f"<image>\n{QUESTIONS[0]}"}]},
        {
            "id": "x",
            "image": [names[1]],
            "conversations": [
                {"from": "human", "value": QUESTIONS[1]},
                {"from": "gpt", "value": "green"},
            ],
        },
    ]
    path.write_text("".join(json.dumps(row) + "\n\n" for row in rows))  # blank lines are skipped


def test_data_module_reads_an_understanding_jsonl(tmp_path: Path) -> None:
    names = _write_images(tmp_path / "images")
    _write_jsonl(tmp_path / "chat.jsonl", names)
    data = ChatDataModule(jsonl=str(tmp_path / "chat.jsonl"), image_root=str(tmp_path / "images"))
    data.setup("predict")
    root = tmp_path / "images"
    assert data.requests == [
        ChatRequest(0, f"<image>\n{QUESTIONS[0]}", [str(root / names[0])], None),
        ChatRequest(1, QUESTIONS[1], [str(root / names[1])], "green"),
    ]
    prompts = ChatDataModule(QUESTIONS, [str(root / names[0]), ""], batch_size=2)
    prompts.setup("predict")
    assert next(iter(prompts.predict_dataloader())) == [
        ChatRequest(0, QUESTIONS[0], [str(root / names[0])]),
        ChatRequest(1, QUESTIONS[1], []),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "chat.jsonl:1: invalid JSON"),
        ('{"conversations": []}', "chat.jsonl:1: needs a non-empty 'conversations'"),
        ('{"conversations": [{"from": "gpt", "value": "a"}]}', "chat.jsonl:1: conversations\\[0\\] must be"),
    ],
)
def test_bad_rows_are_refused_naming_the_line(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "chat.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        ChatDataModule(jsonl=str(tmp_path / "chat.jsonl")).setup("predict")


def test_bad_arguments_and_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="either prompts"):
        ChatDataModule()
    with pytest.raises(ValueError, match="1 image paths for 2 prompts"):
        ChatDataModule(QUESTIONS, ["a.png"])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ChatDataModule(QUESTIONS[:1], [str(tmp_path / "missing.png")]).setup("predict")


@pytest.fixture
def checkpoints(tmp_path: Path, tiny_bagel: Bagel, shapes_tokenizer) -> tuple[Path, Path]:
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial norms: answers that vary (see test_speculative_benchmark)
        for name, p in tiny_bagel.language_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    save_pretrained(tiny_bagel, tmp_path / "teacher", tokenizer=shapes_tokenizer)
    export_draft_head(DraftHead.from_target(tiny_bagel, DraftHeadConfig()), tmp_path / "draft")
    return tmp_path / "teacher", tmp_path / "draft"


def _predict(tmp_path: Path, model_flags: list[str], data_flags: list[str], out: Path) -> list[dict]:
    main(
        ["predict", "--model", f"{CHAT}.ChatModule", *model_flags, "--model.output", str(out)]
        + ["--model.max_new_tokens", "10", "--data", f"{CHAT}.ChatDataModule", *data_flags]
        + ["--trainer.accelerator", "cpu", "--trainer.logger", "false"]
        + ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
        + ["--seed_everything", "0"]
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_cli_predict_answers_like_the_inferencer(
    tmp_path: Path, checkpoints, tiny_bagel, shapes_tokenizer
) -> None:
    teacher, draft = checkpoints
    names = _write_images(tmp_path / "images")
    _write_jsonl(tmp_path / "chat.jsonl", names)
    images = [Image.open(tmp_path / "images" / name).convert("RGB") for name in names]
    inferencer = BagelInferencer(tiny_bagel, shapes_tokenizer)
    expected = [inferencer.chat([q], [[im]], max_new_tokens=10)[0] for q, im in zip(QUESTIONS, images)]

    data = ["--data.jsonl", str(tmp_path / "chat.jsonl"), "--data.image_root", str(tmp_path / "images")]
    for mode in ("chain", "tree"):
        flags = ["--model.model", str(teacher), "--model.draft", str(draft), "--model.mode", mode]
        answers = _predict(tmp_path, flags, data, tmp_path / f"{mode}.jsonl")
        assert [a["answer"] for a in answers] == expected
        assert [a["index"] for a in answers] == [0, 1] and answers[1]["reference"] == "green"
        assert all(a["acceptance_length"] >= 1.0 and a["target_forwards"] >= 1 for a in answers)

    plain = _predict(
        tmp_path,
        ["--model.model", str(teacher)],
        [
            "--data.prompts",
            json.dumps(QUESTIONS),
            "--data.images",
            json.dumps([str(tmp_path / "images" / n) for n in names]),
        ]
        + ["--data.batch_size", "2"],
        tmp_path / "plain.jsonl",
    )
    assert [a["answer"] for a in plain] == expected
    assert "acceptance_length" not in plain[0] and plain[0]["answer_tokens"] >= 1


def test_compile_draft_compiles_the_loaded_head(checkpoints, monkeypatch) -> None:
    teacher, draft = checkpoints
    compiled = []
    monkeypatch.setattr(DraftHead, "compile", lambda head: compiled.append(head))
    for flag in (False, True):
        module = ChatModule(str(teacher), str(draft), compile_draft=flag)
        module.configure_model()
    assert compiled == [module.draft_head]
