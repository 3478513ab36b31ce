"""EMA, BAGEL-folder export and sample logging callbacks, on tiny stages trained for a few CPU steps."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter

from hyperbagel.backbone.checkpoint import from_pretrained
from hyperbagel.backbone.packing import PackedSequence, TextBlock, VaeImage, VitImage, pack
from hyperbagel.callbacks.ema import EMA
from hyperbagel.callbacks.export import BagelExport, export_run, replace_folder
from hyperbagel.callbacks.sample_logger import SampleLogger
from hyperbagel.lightning_modules.pretrain import PretrainStage


class PackedImages(Dataset):
    """`length` deterministic packs: [ViT image, question, answer with loss, noisy VAE image]."""

    def __init__(self, stage: PretrainStage, length: int) -> None:
        self.stage, self.length = stage, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> PackedSequence:
        generator = torch.Generator().manual_seed(index)
        image = torch.rand(3, 16, 16, generator=generator) * 2 - 1
        encode = self.stage.tokenizer.encode
        sample = [
            VitImage(image),
            TextBlock(encode("what color is the circle ?", add_special_tokens=False)),
            TextBlock(encode(["red", "blue"][index % 2], add_special_tokens=False), loss=True),
            VaeImage(pixels=image, noisy=True),
        ]
        return pack([[sample]], self.stage.model.config)


class ReseedEachStep(Callback):
    """Training noise seeded by the global step, so a resumed run draws what an uninterrupted one does."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(trainer.global_step)


class RecordWeights(Callback):
    """Trainable weights at fit start and after each optimizer step."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def _record(self, pl_module) -> None:
        self.snapshots.append({n: p.detach().clone() for n, p in pl_module.trainable_named_parameters()})

    def on_fit_start(self, trainer, pl_module) -> None:
        self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(pl_module)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


def _stage(**kwargs) -> PretrainStage:
    seed_everything(0)
    stage = PretrainStage(model="tiny", tokenizer="shapes", optimizer=_adamw, **kwargs)
    stage.configure_model()
    return stage


def _loader(stage: PretrainStage, length: int) -> DataLoader:
    return DataLoader(PackedImages(stage, length), batch_size=1, collate_fn=lambda x: x[0])


def _trainer(tmp_path: Path, callbacks: list[Callback], max_steps: int, **kwargs) -> Trainer:
    options = {
        "accelerator": "cpu",
        "max_steps": max_steps,
        "logger": TensorBoardLogger(tmp_path / "logs"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def test_ema_averages_only_trainable_weights_exactly(tmp_path: Path) -> None:
    stage = _stage(frozen=["vit_model.*"])
    frozen_before = {n: p.detach().clone() for n, p in stage.named_parameters() if n.startswith("model.vit_")}
    ema, record = EMA(decay=0.6), RecordWeights()
    _trainer(tmp_path, [record, ema, ReseedEachStep()], max_steps=3).fit(stage, _loader(stage, 3))

    averaged = ema.ema_state_dict()
    trainable = [n for n, _ in stage.trainable_named_parameters()]
    assert list(averaged) == trainable
    assert not any(n.startswith("model.vit_model.") for n in averaged)
    assert any(n.startswith("model.vit_model.") for n in frozen_before)
    for name, before in frozen_before.items():
        torch.testing.assert_close(stage.get_parameter(name), before, rtol=0, atol=0)

    assert len(record.snapshots) == 4
    expected = dict(record.snapshots[0])
    for snapshot in record.snapshots[1:]:
        expected = {n: 0.6 * expected[n] + 0.4 * snapshot[n] for n in expected}
    moved = 0
    for name in trainable:
        torch.testing.assert_close(averaged[name], expected[name], rtol=1e-5, atol=1e-6)
        moved += not torch.allclose(averaged[name], record.snapshots[-1][name])
    assert moved > len(trainable) // 2  # the average really lags the weights
    assert ema.num_updates == 3


def test_ema_schedule_start_step_every_n_and_warmup(tmp_path: Path) -> None:
    stage = _stage(trainable=["llm2vae.*", "vae2llm.*"])
    ema, record = EMA(decay=0.9, start_step=1, update_every_n_steps=2, warmup=True), RecordWeights()
    _trainer(tmp_path, [record, ema], max_steps=5).fit(stage, _loader(stage, 5))

    snapshots = record.snapshots
    expected = dict(snapshots[1])  # copied until the start step, then updated at steps 3 and 5
    for n, step in enumerate((3, 5)):
        decay = min(0.9, (1 + n) / (10 + n))
        expected = {k: decay * expected[k] + (1 - decay) * snapshots[step][k] for k in expected}
    for name, value in ema.ema_state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
    assert ema.num_updates == 2


def test_ema_state_resumes_bit_exactly(tmp_path: Path) -> None:
    def run(callbacks, max_steps, ckpt_path=None):
        stage = _stage()
        ema = EMA(decay=0.7, cpu_offload=True)
        trainer = _trainer(
            tmp_path, [ema, ReseedEachStep(), *callbacks], max_steps=max_steps, enable_checkpointing=True
        )
        trainer.fit(stage, _loader(stage, 2), ckpt_path=ckpt_path)
        return stage, ema

    whole_stage, whole = run([], 4)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    run([checkpoints], 2)
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(saved) == 1
    state = torch.load(saved[0], weights_only=False)["callbacks"]
    assert any(key.startswith("EMA") and value["num_updates"] == 2 for key, value in state.items())
    resumed_stage, resumed = run([], 4, ckpt_path=saved[0])

    assert resumed.num_updates == whole.num_updates == 4
    for name, value in whole.ema_state_dict().items():
        assert value.device.type == "cpu"
        assert torch.equal(resumed.ema_state_dict()[name], value), name
    for name, value in whole_stage.state_dict().items():
        assert torch.equal(resumed_stage.state_dict()[name], value), name


def test_export_writes_loadable_raw_and_ema_folders(tmp_path: Path) -> None:
    stage = _stage(frozen=["vit_model.*"])
    ema = EMA(decay=0.5, use_for_validation=True)
    raw_export = BagelExport(tmp_path / "raw", on_validation=True)
    ema_export = BagelExport(tmp_path / "ema", use_ema=True, dtype="float32")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "stale.txt").write_text("previous export")
    trainer = _trainer(tmp_path, [raw_export, ema, ema_export], max_steps=2, limit_val_batches=1)
    trainer.fit(stage, _loader(stage, 2), _loader(stage, 1))

    raw = from_pretrained(tmp_path / "raw").state_dict()
    assert not (tmp_path / "raw" / "stale.txt").exists()
    (kept,) = tmp_path.glob("raw.replaced-*")  # the unrecorded folder was kept, not deleted
    assert (kept / "stale.txt").read_text() == "previous export"
    assert (tmp_path / "raw" / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    model_state = stage.model.state_dict()
    assert raw.keys() == model_state.keys()
    for key, value in model_state.items():
        assert torch.equal(raw[key], value), key

    averaged = {name.removeprefix("model."): value for name, value in ema.ema_state_dict().items()}
    exported = from_pretrained(tmp_path / "ema").state_dict()
    differs = 0
    for key, value in model_state.items():
        assert torch.equal(exported[key], averaged.get(key, value)), key
        differs += key in averaged and not torch.equal(value, averaged[key])
    assert differs > 0

    # a checkpoint taken while the average is swapped in still stores the raw weights
    with ema.swapped_in(stage):
        assert torch.equal(stage.model.llm2vae.weight, averaged["llm2vae.weight"])
        trainer.save_checkpoint(tmp_path / "swapped.ckpt")
    stored = torch.load(tmp_path / "swapped.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(stored["model.llm2vae.weight"], model_state["llm2vae.weight"])
    assert torch.equal(stage.model.llm2vae.weight, model_state["llm2vae.weight"])


def test_export_rejects_use_ema_without_ema(tmp_path: Path) -> None:
    stage = _stage()
    trainer = _trainer(tmp_path, [BagelExport(tmp_path / "out", use_ema=True)], max_steps=1)
    with pytest.raises(ValueError, match="needs an EMA callback"):
        trainer.fit(stage, _loader(stage, 1))
    with pytest.raises(ValueError, match="dtype"):
        BagelExport(tmp_path / "out", dtype="bf16")


def test_export_keeps_another_runs_folder_and_replaces_its_own(tmp_path: Path) -> None:
    stage = _stage()
    first = BagelExport(tmp_path / "out", every_n_train_steps=1)
    _trainer(tmp_path, [first], max_steps=3).fit(stage, _loader(stage, 3))
    assert export_run(tmp_path / "out") == {"run_id": first.run_id, "global_step": 3}
    assert not list(tmp_path.glob("out.replaced-*"))  # steps 1-3 of one run replace each other

    probe = BagelExport(tmp_path / "out")
    probe_trainer = _trainer(tmp_path, [probe], max_steps=1)
    with pytest.warns(UserWarning, match="another run \\(step 3\\)"):
        probe_trainer.fit(_stage(), _loader(stage, 1))
    (kept,) = tmp_path.glob("out.replaced-*")
    assert export_run(kept)["run_id"] == first.run_id
    assert export_run(tmp_path / "out")["run_id"] == probe.run_id

    probe_trainer.save_checkpoint(tmp_path / "probe.ckpt")
    resumed = BagelExport(tmp_path / "out")
    resumed_trainer = _trainer(tmp_path, [resumed], max_steps=2)
    resumed_trainer.fit(_stage(), _loader(stage, 2), ckpt_path=tmp_path / "probe.ckpt")
    assert resumed.run_id == probe.run_id
    assert export_run(tmp_path / "out") == {"run_id": probe.run_id, "global_step": 2}
    assert len(list(tmp_path.glob("out.replaced-*"))) == 1


def test_export_writes_nothing_when_the_run_fails_before_its_first_step(tmp_path: Path) -> None:
    class FailsAtStart(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            raise RuntimeError("set-up failed")

    stage = _stage()
    with pytest.raises(RuntimeError, match="set-up failed"):
        trainer = _trainer(tmp_path, [BagelExport(tmp_path / "out"), FailsAtStart()], max_steps=2)
        trainer.fit(stage, _loader(stage, 2))
    assert not (tmp_path / "out").exists()


def test_replace_folder_swaps_whole_folders(tmp_path: Path) -> None:
    old, new = tmp_path / "export", tmp_path / ".export.tmp"
    old.mkdir()
    (old / "a.txt").write_text("old")
    new.mkdir()
    (new / "b.txt").write_text("new")
    replace_folder(new, old)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert [p.name for p in old.iterdir()] == ["b.txt"]


def _events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_sample_logger_writes_images_and_text(tmp_path: Path) -> None:
    stage = _stage()
    picture = Image.new("RGB", (16, 16), "red")
    picture.save(tmp_path / "red.png")
    sampler = SampleLogger(
        edit_examples=[(tmp_path / "red.png", "make the square blue")],
        shapes_world=True,
        num_examples=2,
        image_size=16,
        num_timesteps=3,
        max_new_tokens=3,
    )
    assert (len(sampler.t2i_prompts), len(sampler.edit_examples), len(sampler.vqa_examples)) == (2, 1, 2)
    logger = TensorBoardLogger(tmp_path / "logs")
    trainer = _trainer(tmp_path, [sampler], max_steps=1, logger=logger, limit_val_batches=1)
    trainer.fit(stage, _loader(stage, 1), _loader(stage, 1))

    events = _events(Path(logger.log_dir))
    images = set(events.Tags()["images"])
    assert {"samples/t2i", "samples/edit", "samples/vqa_images"} <= images
    texts = set(events.Tags()["tensors"])
    assert {"samples/t2i_prompts/text_summary", "samples/edit_instructions/text_summary"} <= texts
    vqa = events.Tensors("samples/vqa/text_summary")[0]
    table = vqa.tensor_proto.string_val[0].decode()
    assert sampler.vqa_examples[0].question in table and "expected" in table
    edit = events.Images("samples/edit")[0]
    assert (edit.width, edit.height) == (2 * 16 + 3 * 2, 16 + 2 * 2)  # [source | edited] with padding
    assert events.Images("samples/t2i")[0].step == 1


def test_sample_logger_restores_module_modes_and_skips_other_loggers(tmp_path: Path) -> None:
    stage = _stage()
    model = stage.model.train()
    model.vit_model.eval()
    sampler = SampleLogger(t2i_prompts=["a red circle"], image_size=16, num_timesteps=2)
    with SummaryWriter(str(tmp_path / "direct")) as writer:
        sampler.log_samples(model, stage.tokenizer, writer, step=7)
    assert model.training and model.language_model.training and not model.vit_model.training
    assert "samples/t2i" in _events(tmp_path / "direct").Tags()["images"]

    trainer = _trainer(tmp_path, [sampler], max_steps=1, logger=CSVLogger(tmp_path), limit_val_batches=1)
    with pytest.warns(UserWarning, match="TensorBoard only"):
        trainer.fit(stage, _loader(stage, 1), _loader(stage, 1))
    with pytest.raises(ValueError, match="nothing to sample"):
        SampleLogger()
