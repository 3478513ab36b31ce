"""The draft-head stage (frozen target, TTT loss, offline features, export) and answer regeneration."""

import dataclasses
import json

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hyperbagel.backbone.image_transforms import vit_input
from hyperbagel.backbone.packing import TextBlock, VitImage, pack
from hyperbagel.datamodules.packed_dataset import TrainingPack, keep_pack
from hyperbagel.datamodules.readers import Origin
from hyperbagel.lightning_modules.draft_head import DraftHeadExport, DraftHeadModule, answer_token_counts
from hyperbagel.speculative.draft_head import DraftHeadConfig
from hyperbagel.speculative.export import load_draft_head
from hyperbagel.speculative.features import FeatureStore
from hyperbagel.speculative.regenerate import main as regenerate_main
from hyperbagel.speculative.ttt import acceptance_length

from helpers import quiet_trainer, run_hyperbagel


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


# --- the stage ----------------------------------------------------------------------------------------
def _vqa_samples(generator):
    image = lambda: torch.rand(3, 8, 8, generator=generator) * 2 - 1  # noqa: E731
    return [
        [VitImage(image()), TextBlock([10, 11, 12]), TextBlock([20, 21, 22, 23, 24, 25], loss=True)],
        [VitImage(image()), TextBlock([13, 14]), TextBlock([26, 27, 28, 29], loss=True)],
        [TextBlock([15, 16]), VitImage(image()), TextBlock([30, 31, 32, 33, 34], loss=True)],
    ]


class FixedPacks(Dataset):
    """One understanding pack, again and again (as a TrainingPack, with the origins of its samples)."""

    def __init__(self, config, length: int = 64) -> None:
        samples = _vqa_samples(torch.Generator().manual_seed(0))
        self.pack = TrainingPack(
            packed=pack([samples], config),
            origins=[Origin("fixed.jsonl", row) for row in range(len(samples))],
            groups=["vqa"] * len(samples),
            num_samples=len(samples),
            num_tokens=0,
            bad_rows=[],
            stream=0,
            num_streams=1,
            cursor=None,
        )
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> TrainingPack:
        return self.pack


def _trainer(tmp_path, steps: int, callbacks=()) -> L.Trainer:
    return quiet_trainer(tmp_path, steps, callbacks)


def _stage(**kwargs) -> DraftHeadModule:
    torch.manual_seed(0)
    kwargs.setdefault("model", "tiny")
    kwargs.setdefault("draft", DraftHeadConfig(num_layers=1))
    kwargs.setdefault("optimizer", lambda params: torch.optim.AdamW(params, lr=1e-2))
    return DraftHeadModule(num_steps=3, **kwargs)


def test_only_the_draft_trains_and_only_it_is_checkpointed(tmp_path) -> None:
    stage = _stage()
    stage.configure_model()
    target = stage.target
    target_before = {k: v.clone() for k, v in target.state_dict().items()}
    data = FixedPacks(target.config)
    first = stage.compute_losses(data.pack, "val")["loss"].item()
    _trainer(tmp_path, 12).fit(stage, DataLoader(data, batch_size=None, collate_fn=keep_pack))
    last = stage.compute_losses(data.pack, "val")["loss"].item()
    assert last < 0.8 * first  # a near-uniform tiny target: the KL term starts small
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in target_before.items())
    assert not any("_moe_gen" in key for key in target_before)  # the generation expert is gone
    assert all(key.startswith("draft_head.") for key in stage.state_dict())
    trainable = {name for name, _ in stage.trainable_named_parameters()}
    assert trainable == {f"draft_head.{n}" for n, p in stage.draft_head.named_parameters() if p.requires_grad}
    assert "draft_head.embed_tokens.weight" not in trainable and "draft_head.fc2.weight" in trainable


def test_offline_features_are_computed_once_and_read_back(tmp_path) -> None:
    stage = _stage(feature_cache=str(tmp_path / "features"))
    stage.configure_model()
    data = FixedPacks(stage.target.config)
    online = _stage()
    online.configure_model()
    expected = online.compute_losses(data.pack, "val")
    first = stage.compute_losses(data.pack, "val")
    assert len(list((tmp_path / "features").rglob("*.safetensors"))) == 3  # one file per sample
    stage.target.forward_packed = None  # a second pass must not run the target
    second = stage.compute_losses(data.pack, "val")
    for name in expected:
        torch.testing.assert_close(first[name], expected[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(second[name], expected[name], rtol=0, atol=1e-6)
    samples = _vqa_samples(torch.Generator().manual_seed(0))
    reordered = dataclasses.replace(data.pack, packed=pack([samples[::-1]], stage.target.config))
    with pytest.raises(TypeError):  # other contents under the same origins: new keys, the target must run
        stage.compute_losses(reordered, "val")
    with pytest.raises(ValueError, match="another target"):
        FeatureStore(tmp_path / "features", {"model": "something else"})
    torch.manual_seed(1)  # another random tiny target must not read these features
    with pytest.raises(ValueError, match="another target"):
        DraftHeadModule(model="tiny", feature_cache=str(tmp_path / "features")).configure_model()


def test_answer_token_counts_and_the_reduced_vocabulary(shapes_tokenizer, tmp_path) -> None:
    data = tmp_path / "vqa.jsonl"
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "<image>\nred ?"},
                {"from": "gpt", "value": "red circle"},
            ]
        },
        {
            "conversations": [
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "and ?"},
                {"from": "gpt", "value": "blue"},
            ]
        },
    ]
    data.write_text("\n".join([json.dumps(rows[0]), "{broken", "", json.dumps(rows[1])]) + "\n")
    ids = {
        word: shapes_tokenizer.convert_tokens_to_ids(word) for word in ("red", "circle", "blue", "<|im_end|>")
    }
    vocab = len(shapes_tokenizer)
    counts = answer_token_counts([str(data)], shapes_tokenizer, vocab, ids["<|im_end|>"])
    expected = torch.zeros(vocab, dtype=torch.long)
    for word, count in (("red", 2), ("circle", 1), ("blue", 1), ("<|im_end|>", 3)):
        expected[ids[word]] = count
    assert torch.equal(counts, expected)
    first_row_only = answer_token_counts([str(data)], shapes_tokenizer, vocab, ids["<|im_end|>"], max_rows=1)
    assert int(first_row_only.sum()) == 3

    counts_file = tmp_path / "counts.pt"
    torch.save(counts, counts_file)
    stage = _stage(draft=DraftHeadConfig(num_layers=1, draft_vocab_size=8), token_counts=str(counts_file))
    stage.configure_model()
    specials = stage.target.config.special_tokens.to_dict().values()
    draft_ids = stage.draft_head.to_target_ids(torch.arange(8))
    assert set(draft_ids.tolist()) == {
        *specials,
        ids["red"],
        ids["circle"],
        ids["blue"],
        0,
    }  # 0: a zero-count tie
    with pytest.raises(ValueError, match="needs token counts"):
        _stage(draft=DraftHeadConfig(num_layers=1, draft_vocab_size=8)).configure_model()


def test_8bit_target_with_a_float_draft(tiny_bagel, shapes_tokenizer, tmp_path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    tiny_bagel.save_pretrained(tmp_path / "target", tokenizer=shapes_tokenizer)
    stage = _stage(model=str(tmp_path / "target"), quantize="8bit")
    stage.configure_model()
    layer = stage.target.language_model.model.layers[-1]
    assert isinstance(layer.mlp.down_proj, bnb.nn.Linear8bitLt) and layer.mlp_moe_gen is None
    assert all(p.dtype == torch.float32 for p in stage.draft_head.parameters())
    reference = tiny_bagel.language_model.model.layers[-1].mlp.down_proj.weight
    torch.testing.assert_close(
        stage.draft_head.layers[0].mlp.down_proj.weight, reference
    )  # copied before quantizing
    loss = stage.compute_losses(FixedPacks(stage.target.config).pack, "train")["loss"]
    assert torch.isfinite(loss) and loss.requires_grad


def test_export_every_n_steps_and_on_an_exception(tmp_path) -> None:
    folder = tmp_path / "head"

    def written_equals_current(pl_module) -> bool:
        written = load_draft_head(folder, pl_module.target).state_dict()
        current = pl_module.draft_head.state_dict()
        return written.keys() == current.keys() and all(torch.equal(written[k], current[k]) for k in current)

    class Probe(L.Callback):
        """After the export's hook: the folder holds step 2's head; step 3 stops the run."""

        def __init__(self) -> None:
            self.seen: dict[int, bool] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= 2:
                self.seen[trainer.global_step] = written_equals_current(pl_module)
            if trainer.global_step == 3:
                raise RuntimeError("stopped")

    stage = _stage()
    stage.configure_model()
    data = DataLoader(FixedPacks(stage.target.config), batch_size=None, collate_fn=keep_pack)
    probe = Probe()
    with pytest.raises(RuntimeError, match="stopped"):
        _trainer(tmp_path, 10, [DraftHeadExport(folder, every_n_train_steps=2), probe]).fit(stage, data)
    assert probe.seen == {2: True, 3: False}  # written at step 2, not at step 3
    assert written_equals_current(stage)  # ... until the exception
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["architectures"] == ["HyperBagelDraftHead"] and config["hyperbagel_draft"]["num_layers"] == 1
    )
    assert config["hyperbagel_training"] == {
        "ce_weight": stage.ce_weight,
        "num_steps": stage.num_steps,
        "step_decay": stage.step_decay,
    }


def test_draft_head_fits_through_the_cli(tmp_path) -> None:
    """`hyperbagel fit` on the tiny preset and a tiny shapes export (understanding data only) logs the TTT
    scalars and the acceptance estimate and writes the head, with a vocabulary counted from the data."""

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tmp_path / "draft_head.yaml"
    config.write_text(
        f"""
seed_everything: 0
model:
  class_path: hyperbagel.lightning_modules.draft_head.DraftHeadModule
  init_args:
    model: tiny
    tokenizer: shapes
    draft: {{num_layers: 1, draft_vocab_size: 40}}
    num_steps: 3
data:
  class_path: hyperbagel.datamodules.shapes_datamodule.ShapesDataModule
  init_args:
    {{model_config: tiny, data_root: {tmp_path / "data"}, n_train: 8, n_val: 4, canvas_size: 24,
      t2i_weight: 0.0, edit_weight: 0.0, vqa_weight: 1.0,
      expected_tokens: 200, max_tokens: 300, max_tokens_per_sample: 200}}
trainer:
  accelerator: cpu
  max_steps: 3
  val_check_interval: 3
  check_val_every_n_epoch: null
  limit_val_batches: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_checkpointing: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {tmp_path / "logs"}, name: draft_head}}
  callbacks:
    - class_path: hyperbagel.lightning_modules.draft_head.DraftHeadExport
      init_args: {{dirpath: {tmp_path / "head"}}}
"""
    )
    result = run_hyperbagel("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    events = next((tmp_path / "logs" / "draft_head").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events)).Reload()
    scalars = set(accumulator.Tags()["scalars"])
    wanted = {
        "train/loss",
        "train/loss_1",
        "train/kl_2",
        "train/ce_0",
        "train/acc_1",
        "val/loss",
        "val/acc_2",
    }
    assert wanted | {"val/acceptance_length"} <= scalars
    tau = accumulator.Scalars("val/acceptance_length")[-1].value
    accuracies = [accumulator.Scalars(f"val/acc_{j}")[-1].value for j in range(3)]
    assert tau == pytest.approx(acceptance_length(accuracies), abs=1e-5)
    head = json.loads((tmp_path / "head" / "config.json").read_text())
    assert head["draft_vocab_size"] == 40 and (tmp_path / "head" / "model.safetensors").is_file()
