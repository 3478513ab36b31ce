"""Stage 1 (CFG distillation): batches of the shapes world, the teacher target, the student, the CLI fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import from_pretrained, save_pretrained
from hyperbagel.backbone.config import tiny_config
from hyperbagel.backbone.flow import euler_sample
from hyperbagel.backbone.inference import build_image_contexts, edit_context_samples, t2i_context_samples
from hyperbagel.backbone.packing import TextBlock, VaeImage
from hyperbagel.datamodules.generation_datamodule import GenerationDataModule, ParquetGenerationDataModule
from hyperbagel.datamodules.shapes import ShapesWorld
from hyperbagel.datamodules.shapes_export import export_shapes_world
from hyperbagel.distillation.batches import (
    GenerationBatch,
    edit_item,
    t2i_item,
    task_loss_weights,
    task_weighted_mean,
)
from hyperbagel.distillation.generation_weights import is_generation_key
from hyperbagel.lightning_modules.distill_cfg import CFGDistillStage

from helpers import quiet_trainer, run_hyperbagel


@pytest.fixture
def teacher_dir(tmp_path: Path, tiny_bagel, shapes_tokenizer) -> Path:
    """A tiny CFG teacher folder (random weights, non-zero velocities)."""
    folder = tmp_path / "teacher"
    save_pretrained(tiny_bagel, folder, tokenizer=shapes_tokenizer)
    return folder


@pytest.fixture
def data() -> GenerationDataModule:
    return GenerationDataModule("tiny", n_train=8, n_val=4, batch_size=4)


def _stage(teacher_dir: Path, **kwargs) -> CFGDistillStage:
    stage = CFGDistillStage(model=str(teacher_dir), tokenizer="shapes", **kwargs)
    stage.configure_model()
    return stage


def _batch(data: GenerationDataModule, kind: str) -> GenerationBatch:
    return next(b for b in data.split("train") if b.kinds[0] == kind)


# --- batches and data -----------------------------------------------------------------------------------
def test_batches_hold_one_task_kind_with_targets_on_the_models_grid(data) -> None:
    batches = list(data.split("train"))
    assert len(batches) == 4 and {tuple(b.kinds) for b in batches} == {("t2i",) * 4, ("edit",) * 4}
    edit = _batch(data, "edit")
    assert edit.grid == (8, 8) and edit.target_images.shape == (4, 3, 32, 32)  # tiny: 32 px, stride 4
    assert edit.no_image is not None and all(len(c) == 3 for c in edit.conditional)  # VAE, ViT, text
    t2i = _batch(data, "t2i")
    assert t2i.no_image is None and t2i.no_text == [[]] * 4
    assert [block.ids for [block] in t2i.conditional] == [
        data.tokenizer.encode(text, add_special_tokens=False) for text in t2i.texts
    ]
    prompts = lambda split: {t for b in data.split(split) if b.kinds[0] == "t2i" for t in b.texts}  # noqa: E731
    assert prompts("val") and prompts("val").isdisjoint(prompts("train"))


def test_items_are_the_inferencers_contexts(data, shapes_tokenizer) -> None:
    sample = ShapesWorld(64, 0).samples("edit", "test", 1)[0]
    ids = shapes_tokenizer.encode(sample.instruction, add_special_tokens=False)
    item = edit_item(sample.source_image, sample.instruction, ids, data.config, sample.target_image)
    conditional, no_text, no_image = edit_context_samples([sample.source_image], [ids], data.config)
    assert item.no_image == no_image[0] and item.conditional[2] == conditional[0][2]
    assert torch.equal(item.conditional[0].pixels, conditional[0][0].pixels)
    assert torch.equal(item.no_text[1].pixels, no_text[0][1].pixels)
    t2i = t2i_item("a red circle", [9, 10], data.config)
    assert (t2i.conditional, t2i.no_text, t2i.grid) == (t2i_context_samples([[9, 10]])[0][0], [], (8, 8))
    with pytest.raises(ValueError, match="share a latent grid"):
        GenerationBatch.collate([t2i, replace_grid(t2i, (4, 4))])
    with pytest.raises(ValueError, match="either every item"):
        GenerationBatch.collate([t2i, item])


def test_parquet_batches_are_the_shapes_items_read_back(tmp_path: Path, data, shapes_tokenizer) -> None:
    """BAGEL-format parquet (the shapes world exported) gives the same items as the world itself."""
    export_shapes_world(tmp_path, n_t2i=6, n_edit=6, n_vqa=0, row_group_size=3)
    groups = [
        {"kind": "t2i", "paths": [str(tmp_path / "t2i" / "train")]},
        {"kind": "edit", "paths": [str(tmp_path / "editing" / "train")], "weight": 2.0},
    ]
    module = ParquetGenerationDataModule(
        groups, "shapes", "tiny", batch_size=2, val_groups=groups[:1], val_batches=2
    )
    batches = [module.on_before_batch_transfer(b, 0) for b, _ in zip(module.train_dataloader(), range(6))]
    assert all(
        len(set(b.kinds)) == 1 and b.grid == (8, 8) and b.target_images.shape == (2, 3, 32, 32)
        for b in batches
    )
    assert {b.kinds[0] for b in batches} == {"t2i", "edit"}
    world = ShapesWorld(64, 0)
    prompts = {s.prompt: s for s in world.samples("t2i", "train", 6)}
    edits = {s.instruction: s for s in world.samples("edit", "train", 6)}
    for batch in batches:
        for i, text in enumerate(batch.texts):
            ids = shapes_tokenizer.encode(text, add_special_tokens=False)
            if batch.kinds[i] == "t2i":
                expected = t2i_item(text, ids, data.config, prompts[text].image)
            else:
                sample = next(s for s in edits.values() if text in s.instructions)
                expected = edit_item(sample.source_image, text, ids, data.config, sample.target_image)
            assert batch.conditional[i][-1] == expected.conditional[-1]
            torch.testing.assert_close(batch.target_images[i], expected.target, atol=1e-6, rtol=0)
            if batch.kinds[i] == "edit":
                assert torch.equal(batch.conditional[i][0].pixels, expected.conditional[0].pixels)
                assert batch.no_image[i] == expected.no_image and not batch.conditional[i][0].noisy
    val = list(module.val_dataloader())
    assert len(val) == 2 and [b.texts for b in val] == [b.texts for b in module.val_dataloader()]


def replace_grid(item, grid):
    from dataclasses import replace

    return replace(item, grid=grid)


def test_clean_tokens_are_the_encoded_targets(data, tiny_bagel) -> None:
    batch = _batch(data, "t2i")
    tokens = batch.clean_tokens(tiny_bagel)
    expected = tiny_bagel.encode_latent_tokens([VaeImage(pixels=p) for p in batch.target_images])
    assert tokens.shape == (4, 64, 16) and torch.equal(tokens, torch.stack(expected))
    with pytest.raises(ValueError, match="no targets"):
        GenerationBatch(["t2i"], [[TextBlock([9])]], [[]], None, (8, 8)).clean_tokens(tiny_bagel)


# --- the stage -----------------------------------------------------------------------------------------
def test_zero_initialised_student_equals_the_teachers_conditional_velocity(teacher_dir, data) -> None:
    stage = _stage(teacher_dir)
    for kind in ("t2i", "edit"):
        targets = stage.teacher_targets(_batch(data, kind), torch.Generator().manual_seed(0))
        student = targets.contexts.velocity(targets.x_t, targets.times, targets.cfgs)
        with stage.as_teacher(), torch.no_grad():
            conditional = targets.contexts.raw_velocity(targets.x_t, targets.times, 4)
        assert torch.equal(student, conditional)
        assert not torch.allclose(targets.velocity, conditional)  # the guided target differs


def test_stage_target_is_the_samplers_guided_velocity(teacher_dir, data, shapes_tokenizer) -> None:
    """Each sample's target equals the velocity BAGEL's sampler computes for it alone, with a separately
    loaded teacher and contexts built by the inferencer's own functions."""
    stage = _stage(teacher_dir)
    teacher = from_pretrained(teacher_dir)
    edits = {s.instruction: s for s in ShapesWorld(64, 0).samples("edit", "train", 8)}
    for kind in ("t2i", "edit"):
        batch = _batch(data, kind)
        targets = stage.teacher_targets(batch, torch.Generator().manual_seed(1))
        assert len({c.text_scale for c in targets.cfgs}) == 4
        for i, cfg in enumerate(targets.cfgs):
            if kind == "t2i":
                ids = [shapes_tokenizer.encode(batch.texts[i], add_special_tokens=False)]
                conditional, no_text = t2i_context_samples(ids)
                contexts = build_image_contexts(teacher, conditional, no_text, None, batch.grid)
            else:
                sample = edits[batch.texts[i]]
                ids = [shapes_tokenizer.encode(sample.instruction, add_special_tokens=False)]
                contexts = build_image_contexts(
                    teacher, *edit_context_samples([sample.source_image], ids, teacher.config), batch.grid
                )
            seen = []
            grid = torch.stack([targets.times[i], torch.tensor(0.0)])
            euler_sample(
                lambda x, t, step, c=contexts, g=cfg: c.velocity(x, t, g),
                targets.x_t[i : i + 1],
                grid,
                callback=lambda step, t, x, v, s=seen: s.append(v),
            )
            # batched vs alone differ by float rounding only (x up to 5 by the guidance scale)
            torch.testing.assert_close(targets.velocity[i : i + 1], seen[0], rtol=1e-4, atol=2e-5)


def test_scales_are_drawn_per_sample_in_their_ranges(teacher_dir) -> None:
    stage = _stage(teacher_dir, text_scale_range=(2.0, 3.0), img_scale_range=(1.5, 1.75))
    cfgs = stage.sample_guidance(["t2i", "edit"] * 50, torch.Generator().manual_seed(0))
    text = [c.text_scale for c in cfgs]
    assert all(2.0 <= s <= 3.0 for s in text) and len(set(text)) == 100
    assert all(c.img_scale == 1.0 and c.renorm_type == "global" for c in cfgs[::2])
    assert all(1.5 <= c.img_scale <= 1.75 and c.renorm_type == "text_channel" for c in cfgs[1::2])
    assert all(c.interval == (0.0, 1.0) for c in cfgs)
    with pytest.raises(ValueError, match="text_scale_range must satisfy 1 <= low <= high"):
        CFGDistillStage(model="tiny", text_scale_range=(0.5, 2.0))


def test_task_weights_scale_each_tasks_loss_and_leave_the_mse_logs(teacher_dir, data) -> None:
    plain, weighted = _stage(teacher_dir), _stage(teacher_dir, task_weights={"t2i": 3.0})
    assert weighted.task_weights == {"t2i": 3.0, "edit": 1.0}
    for kind, factor in (("t2i", 3.0), ("edit", 1.0)):
        batch = _batch(data, kind)
        base, scaled = plain.compute_losses(batch, "val"), weighted.compute_losses(batch, "val")
        torch.testing.assert_close(scaled["loss"], factor * base["loss"])
        torch.testing.assert_close(scaled[f"mse_{kind}"], base[f"mse_{kind}"])
    for bad in ({"t2i": 0.0}, {"vqa": 1.0}):
        with pytest.raises(ValueError, match="task_weights must map tasks"):
            CFGDistillStage(model="tiny", task_weights=bad)


def test_task_weighted_mean_scales_each_sample_by_its_task() -> None:
    losses = torch.tensor([1.0, 2.0, 4.0])
    weighted = task_weighted_mean(losses, ["t2i", "edit", "t2i"], task_loss_weights({"t2i": 0.5}))
    assert float(weighted) == pytest.approx((0.5 + 2.0 + 2.0) / 3)


def test_only_the_generation_side_and_guidance_embedders_train(teacher_dir) -> None:
    stage = _stage(teacher_dir)
    names = {name.removeprefix("model.") for name, _ in stage.trainable_named_parameters()}
    expected = {n for n, p in stage.model.named_parameters() if is_generation_key(n)}
    assert names == expected and "text_guidance_embedder.mlp.2.weight" in names
    assert not any(p.requires_grad for p in stage.teacher_weights.parameters())


def _fit(stage, data, steps: int, tmp_path: Path, loader=None) -> Trainer:
    trainer = quiet_trainer(tmp_path, steps, limit_val_batches=0)
    if loader is None:
        trainer.fit(stage, datamodule=data)
    else:
        trainer.fit(stage, train_dataloaders=loader)
    return trainer


def test_training_moves_only_the_student_and_lowers_the_loss(teacher_dir, data, tmp_path) -> None:
    stage = CFGDistillStage(
        model=str(teacher_dir), tokenizer="shapes", optimizer=lambda p: torch.optim.Adam(p, lr=1e-4)
    )
    stage.configure_model()
    batch = _batch(data, "edit")
    before = stage.compute_losses(batch, "val")["loss"].detach()
    frozen = {n: p.clone() for n, p in stage.model.named_parameters() if not is_generation_key(n)}
    teacher = {n: p.clone() for n, p in stage.teacher_weights.named_parameters()}
    torch.manual_seed(0)
    _fit(stage, data, 8, tmp_path, DataLoader([batch] * 8, batch_size=None, collate_fn=lambda b: b))
    assert stage.compute_losses(batch, "val")["loss"] < 0.9 * before
    assert all(torch.equal(p, frozen[n]) for n, p in stage.model.named_parameters() if n in frozen)
    assert all(torch.equal(p, teacher[n]) for n, p in stage.teacher_weights.named_parameters())
    assert stage.model.text_guidance_embedder.mlp[2].weight.abs().sum() > 0


def test_non_finite_losses_are_skipped_then_stop_the_run(teacher_dir, data, tmp_path) -> None:
    stage = _stage(teacher_dir, max_nonfinite_losses=1)
    with torch.no_grad():
        stage.model.llm2vae.bias.fill_(math.nan)
    with pytest.raises(RuntimeError, match="2 non-finite losses in a row"):
        _fit(stage, data, 4, tmp_path)
    assert stage.nonfinite_total == 2


def test_a_full_teacher_gives_the_same_targets(teacher_dir, data) -> None:
    shared = _stage(teacher_dir)
    full = _stage(teacher_dir, teacher_copy="full")
    assert full.teacher is not None and full.teacher_weights is None
    batch = _batch(data, "edit")
    a = shared.teacher_targets(batch, torch.Generator().manual_seed(3)).velocity
    b = full.teacher_targets(batch, torch.Generator().manual_seed(3)).velocity
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_continuing_from_a_student_needs_a_matching_teacher(teacher_dir, tmp_path, shapes_tokenizer) -> None:
    stage = _stage(teacher_dir)
    save_pretrained(stage.model, tmp_path / "student", tokenizer=shapes_tokenizer)
    with pytest.raises(ValueError, match="already CFG-distilled"):
        _stage(tmp_path / "student")
    continued = CFGDistillStage(model=str(tmp_path / "student"), teacher=str(teacher_dir), tokenizer="shapes")
    continued.configure_model()
    assert continued.model.has_guidance_embedders and not continued.teacher_weights.has_guidance_embedders
    with pytest.raises(ValueError, match="stage 1 needs a CFG teacher"):
        CFGDistillStage(
            model=str(teacher_dir), teacher=str(tmp_path / "student"), tokenizer="shapes"
        ).configure_model()

    config = tiny_config(vocab_size=len(shapes_tokenizer))
    config.llm.intermediate_size = 48
    save_pretrained(Bagel(config), tmp_path / "narrower", tokenizer=shapes_tokenizer)
    wrong = CFGDistillStage(
        model=str(tmp_path / "student"), teacher=str(tmp_path / "narrower"), tokenizer="shapes"
    )
    with pytest.raises(ValueError, match=r"generation keys of .*narrower.* do not match") as error:
        wrong.configure_model()
    assert "layers.0.mlp_moe_gen.down_proj.weight ((32, 48) vs (32, 64))" in str(error.value)


def test_checkpoints_leave_the_teacher_out_and_resume_with_it(teacher_dir) -> None:
    stage = _stage(teacher_dir)
    checkpoint = {"state_dict": dict(stage.state_dict())}
    stage.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("teacher") for k in checkpoint["state_dict"])
    resumed = _stage(teacher_dir)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])  # strict: the teacher keys came back


def test_stage1_fits_through_the_cli_and_exports_a_distilled_model(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tmp_path / "distill_cfg.yaml"
    config.write_text(
        f"""
seed_everything: 0
model:
  class_path: hyperbagel.lightning_modules.distill_cfg.CFGDistillStage
  init_args: {{model: tiny, tokenizer: shapes, grid_examples: 2, grid_timesteps: 3}}
data:
  class_path: hyperbagel.datamodules.generation_datamodule.GenerationDataModule
  init_args: {{model_config: tiny, n_train: 4, n_val: 2, batch_size: 2}}
trainer:
  accelerator: cpu
  max_steps: 3
  val_check_interval: 3
  check_val_every_n_epoch: null
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_checkpointing: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {tmp_path / "logs"}, name: distill_cfg}}
  callbacks:
    - class_path: hyperbagel.callbacks.export.BagelExport
      init_args: {{dirpath: {tmp_path / "student"}}}
"""
    )
    result = run_hyperbagel("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    student = from_pretrained(tmp_path / "student")
    assert student.has_guidance_embedders
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.*")).parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/text_scale", "val/loss"} <= scalars
    assert "samples/teacher_student" in events.Tags()["images"]
