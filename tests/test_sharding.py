"""Sharded (FSDP2) Bagel on two CPU processes over gloo: the sharded model computes what the whole one
does, side copies and gathered weights are exact, and the three distillation stages fit, export and resume
sharded through the CLI."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from hyperbagel.backbone.autoencoder import BagelAutoencoder
from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import EMA_FILE, save_pretrained
from hyperbagel.backbone.config import SpecialTokenIds, tiny_config
from hyperbagel.backbone.flow import CFGConfig
from hyperbagel.backbone.sharding import (
    check_optimizer_shards,
    clone_sharded,
    full_state_dict,
    gathered,
    reshard_optimizer_state,
    resharded_like,
    shard_bagel,
)
from hyperbagel.datamodules.generation_datamodule import GenerationDataModule
from hyperbagel.datamodules.shapes_export import export_shapes_world
from hyperbagel.datamodules.shapes_tokenizer import build_shapes_tokenizer
from hyperbagel.distillation.generation_weights import is_generation_key
from hyperbagel.distillation.side_copies import load_generation_copy
from hyperbagel.lightning_modules.manual import clip_gradients

from helpers import run_hyperbagel

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tiny_student() -> Bagel:
    """The same random tiny model with guidance embedders on every rank; only its generation side trains."""
    tokenizer = build_shapes_tokenizer()
    config = tiny_config(len(tokenizer), SpecialTokenIds.from_tokenizer(tokenizer))
    torch.manual_seed(0)
    model = Bagel(config, BagelAutoencoder(config.vae)).add_guidance_embedders()
    with torch.no_grad():
        for p in [*model.llm2vae.parameters(), *model.text_guidance_embedder.parameters()]:
            p.normal_(0.0, 0.5)
    for name, param in model.named_parameters():
        param.requires_grad_(is_generation_key(name))
    return model


def _velocity(model: Bagel, batch) -> torch.Tensor:
    contexts = batch.contexts(model)
    x = torch.randn(
        len(batch),
        contexts.num_tokens,
        model.config.latent_token_dim,
        generator=torch.Generator().manual_seed(1),
    )
    return contexts.velocity(x, torch.full((len(batch),), 0.7), [CFGConfig(text_scale=3.0)] * len(batch))


def _check_sharded_model(rank: int, port: int, folders: tuple[Path, Path]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        whole = _tiny_student()
        model = _tiny_student()
        model.autoencoder = whole._autoencoder
        shard_bagel(model, mesh)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(isinstance(p, DTensor) for p in trainable)
        shards = [p for p in model.parameters() if isinstance(p, DTensor)]
        held = torch.tensor(sum(p.to_local().numel() for p in shards))
        assert held < sum(p.numel() for p in shards)  # each rank holds a part ...
        dist.all_reduce(held)
        assert held == sum(p.numel() for p in shards)  # ... and together they hold it all once
        batch = next(
            b
            for b in GenerationDataModule("tiny", n_train=4, batch_size=2).split("train")
            if b.kinds[0] == "edit"
        )

        # forward and gradients equal the whole model's
        velocity, reference = _velocity(model, batch), _velocity(whole, batch)
        assert torch.equal(velocity, reference)
        velocity.pow(2).mean().backward()
        reference.pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        whole_grads = {n: p.grad for n, p in whole.named_parameters() if p.grad is not None}
        assert grads.keys() == whole_grads.keys() and grads
        for name, grad in grads.items():
            torch.testing.assert_close(grad.full_tensor(), whole_grads[name], rtol=0, atol=1e-7)

        # clipping: sharded and whole gradients in one list are normed together, as torch's clip on whole ones
        head = torch.nn.Linear(3, 1)
        head.weight.grad = torch.full_like(head.weight, 2.0)
        head.bias.grad = torch.ones_like(head.bias)
        expected_norm = torch.linalg.vector_norm(
            torch.stack(
                [
                    torch.linalg.vector_norm(g)
                    for g in [*whole_grads.values(), head.weight.grad, head.bias.grad]
                ]
            )
        )
        norm = clip_gradients([*trainable, head.weight, head.bias], 1.0)
        torch.testing.assert_close(norm, expected_norm)
        torch.testing.assert_close(head.bias.grad, torch.ones(1) / expected_norm, rtol=1e-5, atol=0)

        # a separate copy computes as the model; the gathered weights are the whole model's
        assert torch.equal(_velocity(clone_sharded(model), batch), reference)
        state = full_state_dict(model)
        if rank == 0:
            assert state.keys() == whole.state_dict().keys()
            assert all(torch.equal(state[k], v) for k, v in whole.state_dict().items())
        else:
            assert state == {}

        # callback and optimizer state: gathered whole, cut back into this rank's shards
        weight = model.vae2llm.weight
        gathered_weight = gathered({"w": [weight]})["w"][0]
        assert (
            torch.equal(gathered_weight, whole.vae2llm.weight) if rank == 0 else gathered_weight.numel() == 0
        )
        assert torch.equal(resharded_like(whole.vae2llm.weight, weight).to_local(), weight.to_local())
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
        for p in trainable:
            p.grad = torch.ones_like(p)
        optimizer.step()
        saved = gathered(optimizer.state_dict())
        dist.broadcast_object_list(box := [saved])  # as every rank reads rank 0's checkpoint
        saved = box[0]
        restored = torch.optim.AdamW(trainable, lr=1e-3)
        restored.load_state_dict(saved)
        reshard_optimizer_state(restored)
        moments = restored.state[weight]["exp_avg"]
        assert isinstance(moments, DTensor) and torch.equal(
            moments.to_local(), optimizer.state[weight]["exp_avg"].to_local()
        )

        import bitsandbytes as bnb

        with pytest.raises(ValueError, match="cannot update sharded"):
            check_optimizer_shards(bnb.optim.AdamW8bit(trainable))
        # a side model loaded from a folder must share the frozen weights, checked shard by shard
        same, other = folders
        assert torch.equal(_velocity(load_generation_copy(same, model).bagel, batch), reference)
        with pytest.raises(ValueError, match="does not share the model's frozen .*embed_tokens"):
            load_generation_copy(other, model)

        lm_head = _tiny_student()
        lm_head.language_model.lm_head.weight.requires_grad_(True)
        with pytest.raises(ValueError, match="language_model.lm_head.weight"):
            shard_bagel(lm_head, mesh)
    finally:
        dist.destroy_process_group()


def test_a_sharded_bagel_computes_clones_and_gathers_exactly(tmp_path: Path) -> None:
    save_pretrained(_tiny_student(), tmp_path / "same", tokenizer=build_shapes_tokenizer())
    other = _tiny_student()
    with torch.no_grad():
        other.language_model.model.embed_tokens.weight.add_(1.0)  # another frozen part
    save_pretrained(other, tmp_path / "other", tokenizer=build_shapes_tokenizer())
    mp.spawn(_check_sharded_model, args=(_free_port(), (tmp_path / "same", tmp_path / "other")), nprocs=WORLD)


# --- the stages through the CLI, sharded over two CPU processes ---------------------------------------------
def _config(path: Path, model: str, data: str, trainer: str, callbacks: str) -> Path:
    path.write_text(
        f"""
seed_everything: 0
model:
{model}
data:
{data}
trainer:
  accelerator: cpu
  devices: {WORLD}
  strategy:
    class_path: lightning.pytorch.strategies.ModelParallelStrategy
    init_args: {{data_parallel_size: {WORLD}, tensor_parallel_size: 1, process_group_backend: gloo}}
  default_root_dir: {path.with_suffix("")}
  log_every_n_steps: 1
  check_val_every_n_epoch: null
  num_sanity_val_steps: 0
  enable_progress_bar: false
{trainer}
  callbacks:
{callbacks}
"""
    )
    return path


def _shapes_data(options: str) -> str:
    return f"""  class_path: hyperbagel.datamodules.generation_datamodule.GenerationDataModule
  init_args: {{model_config: tiny, {options}}}"""


def _validated_steps(steps: int, logs: Path) -> str:
    """Trainer settings: `steps` steps, validated at the last, logged to TensorBoard under `logs`."""
    return f"""  max_steps: {steps}
  val_check_interval: {steps}
  enable_checkpointing: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {logs.parent}, name: {logs.name}}}"""


def _fit(config: Path, *args: str) -> None:
    result = run_hyperbagel("fit", "--config", str(config), *args)
    assert result.returncode == 0, result.stderr[-4000:]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / EMA_FILE))


def _frozen_equal_generation_moved(start: Path, end: Path) -> None:
    """The gathered export keeps every frozen tensor exactly and changes the generation side."""
    before, after = _weights(start), _weights(end)
    frozen = [k for k in before if not is_generation_key(k)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if is_generation_key(k))


def _scalars(logs: Path) -> set[str]:
    events = EventAccumulator(str(next(logs.rglob("events.out.*")).parent)).Reload()
    return set(events.Tags()["scalars"])


DISCRIMINATOR = """    - class_path: hyperbagel.callbacks.discriminator.AdversarialDiscriminator
      init_args:
        discriminator:
          class_path: hyperbagel.callbacks.discriminator.BagelDiscriminator
          init_args: {layers: [1, 2], head_hidden: 16}"""


def test_the_three_stages_fit_and_export_sharded(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    data = _shapes_data("n_train: 8, n_val: 4, batch_size: 2")  # both kinds, one a step on every rank
    export_shapes_world(tmp_path / "world", n_t2i=8, n_edit=8, n_vqa=0, row_group_size=4)
    t2i, edit = tmp_path / "world" / "t2i" / "train", tmp_path / "world" / "editing" / "train"
    stage1 = _config(  # stage 1 reads BAGEL-format parquet of both kinds, as the 7B config does
        tmp_path / "cfg.yaml",
        """  class_path: hyperbagel.lightning_modules.distill_cfg.CFGDistillStage
  init_args: {model: tiny, tokenizer: shapes, grid_examples: 2, grid_timesteps: 3}""",
        f"""  class_path: hyperbagel.datamodules.generation_datamodule.ParquetGenerationDataModule
  init_args:
    groups: [{{kind: t2i, paths: [{t2i}]}}, {{kind: edit, paths: [{edit}]}}]
    val_groups: [{{kind: t2i, paths: [{t2i}]}}]
    val_batches: 1
    tokenizer: shapes
    model_config: tiny
    batch_size: 2""",
        _validated_steps(3, logs / "cfg"),
        f"""    - class_path: hyperbagel.callbacks.export.BagelExport
      init_args: {{dirpath: {tmp_path / "cfg"}}}""",
    )
    _fit(stage1)
    assert {"train/loss", "val/loss"} <= _scalars(logs / "cfg")

    stage2 = _config(
        tmp_path / "tscd.yaml",
        f"""  class_path: hyperbagel.lightning_modules.distill_tscd.DistillTSCDStage
  init_args:
    model: {tmp_path / "cfg"}
    target: ema
    start: rollout
    teacher_span: 1.0
    teacher_steps: 2
    consistency_loss: mse
    val_teacher_steps: 2
    grid_examples: 2
    gradient_clip_val: 1.0""",
        data,
        _validated_steps(3, logs / "tscd"),
        f"""    - class_path: hyperbagel.callbacks.ema.EMA
      init_args: {{decay: 0.5}}
{DISCRIMINATOR}
    - class_path: hyperbagel.callbacks.export.BagelExport
      init_args: {{dirpath: {tmp_path / "tscd"}, use_ema: true}}""",
    )
    _fit(stage2)
    _frozen_equal_generation_moved(tmp_path / "cfg", tmp_path / "tscd")
    assert {
        "train/generator/adversarial",
        "train/discriminator/accuracy",
        "train/generator/grad_norm",
        "val/sample_mse",
    } <= _scalars(logs / "tscd")

    stage3 = _config(
        tmp_path / "dmdo.yaml",
        f"""  class_path: hyperbagel.lightning_modules.distill_dmdo.DistillDMDOStage
  init_args:
    model: {tmp_path / "tscd"}
    teacher: {tmp_path / "cfg"}
    generator_every: 1
    real_score: learned
    real_score_steps: 2
    val_teacher_steps: 2
    grid_examples: 0""",
        data,
        """  max_steps: 2
  limit_val_batches: 0
  enable_checkpointing: false
  logger: false""",
        f"""{DISCRIMINATOR}
    - class_path: hyperbagel.callbacks.export.BagelExport
      init_args: {{dirpath: {tmp_path / "dmdo"}}}""",
    )
    _fit(stage3)
    _frozen_equal_generation_moved(tmp_path / "tscd", tmp_path / "dmdo")


def test_a_sharded_run_resumes_exactly(tmp_path: Path) -> None:
    """Model, optimizers, EMA, the discriminator (sharded backbone and whole heads) and the data position
    all come back from a sharded checkpoint: 2 + 2 steps export exactly what 4 uninterrupted steps do."""
    teacher = tmp_path / "teacher"
    save_pretrained(_tiny_student(), teacher, tokenizer=build_shapes_tokenizer())

    def config(name: str) -> Path:
        return _config(
            tmp_path / f"{name}.yaml",
            f"""  class_path: hyperbagel.lightning_modules.distill_tscd.DistillTSCDStage
  init_args: {{model: {teacher}, target: ema, consistency_loss: mse, grid_examples: 0}}""",
            _shapes_data("n_train: 6, n_val: 2, batch_size: 2"),  # 3 batches a kind: 2 steps an epoch
            """  max_steps: 4
  limit_val_batches: 0
  logger: false""",
            f"""    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp_path / name / "checkpoints"}, save_top_k: -1, every_n_train_steps: 2}}
    - class_path: hyperbagel.callbacks.ema.EMA
      init_args: {{decay: 0.5}}
{DISCRIMINATOR}
    - class_path: hyperbagel.callbacks.export.BagelExport
      init_args: {{dirpath: {tmp_path / name / "raw"}}}
    - class_path: hyperbagel.callbacks.export.BagelExport
      init_args: {{dirpath: {tmp_path / name / "ema"}, use_ema: true}}""",
        )

    _fit(config("straight"))
    _fit(config("resumed"), "--trainer.max_steps", "2")
    checkpoint = tmp_path / "resumed" / "checkpoints" / "epoch=0-step=2.ckpt"
    assert checkpoint.is_dir()  # a sharded checkpoint: one file per rank
    _fit(config("resumed"), "--ckpt_path", str(checkpoint))
    for export in ("raw", "ema"):
        straight, resumed = _weights(tmp_path / "straight" / export), _weights(tmp_path / "resumed" / export)
        assert straight.keys() == resumed.keys()
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), export
