"""The shapes distillation data's position: epoch-seeded batch order split across ranks a kind a step, and a
run restored from a checkpoint (mid-epoch or at an epoch's last batch) continuing with the next unseen
batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from hyperbagel.datamodules.generation_datamodule import GenerationDataModule, ResumableBatchOrder
from hyperbagel.distillation.batches import GenerationBatch

from helpers import quiet_trainer

KINDS = ["t2i"] * 7 + ["edit"] * 6


def test_batch_order_is_seeded_by_epoch_and_split_across_ranks_a_kind_a_step() -> None:
    batches = list(range(len(KINDS)))
    ranks = [ResumableBatchOrder(batches, 2, rank, 3, KINDS) for rank in (0, 1)]
    for epoch in (0, 1):
        torch.manual_seed(epoch)  # the global random state plays no part
        shares = [sampler.epoch_order(epoch) for sampler in ranks]
        assert len(shares[0]) == len(shares[1]) == 6 == len(ranks[0])  # each kind's remainder is dropped
        assert not set(shares[0]) & set(shares[1])
        assert [KINDS[i] for i in shares[0]] == [KINDS[i] for i in shares[1]]  # one kind a step on both
        assert shares == [ResumableBatchOrder(batches, 2, r, 3, KINDS).epoch_order(epoch) for r in (0, 1)]
    assert ranks[0].epoch_order(0) != ranks[0].epoch_order(1)
    alone = ResumableBatchOrder(batches, 1, 0, 3, KINDS)
    assert sorted(alone.epoch_order(0)) == batches  # one rank drops nothing


@pytest.mark.parametrize("consumed", [0, 3, 6, 11])
def test_an_iteration_starts_after_the_batches_consumed(consumed: int) -> None:
    """The data epoch and the place in it follow the run's count of consumed batches, not `set_epoch`."""
    sampler = ResumableBatchOrder(list(range(len(KINDS))), 2, 1, 0, KINDS, lambda: consumed)
    sampler.set_epoch(7)  # Lightning's epoch plays no part
    epoch, done = divmod(consumed, len(sampler))
    assert list(sampler) == sampler.epoch_order(epoch)[done:]


class RecordTexts(LightningModule):
    """A model-free stage that records the prompts of every training batch it consumes."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch: GenerationBatch, batch_idx: int) -> torch.Tensor:
        self.seen.append(list(batch.texts))
        return (self.weight - 1.0).pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, max_steps: int, ckpt_path: Path | None = None) -> RecordTexts:
    seed_everything(0)
    stage = RecordTexts()
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
    trainer = quiet_trainer(root, max_steps, [checkpoints], limit_val_batches=0, num_sanity_val_steps=0)
    data = GenerationDataModule("tiny", n_train=6, n_val=2, batch_size=2)  # 6 batches an epoch (3 a kind)
    trainer.fit(stage, data, ckpt_path=ckpt_path)
    return stage


@pytest.mark.parametrize("stop", [4, 6, 8], ids=["mid_first_epoch", "end_of_first_epoch", "mid_second_epoch"])
def test_a_restored_run_continues_with_the_next_unseen_batch(tmp_path: Path, stop: int) -> None:
    straight = _fit(tmp_path / "straight", 10).seen
    assert len(straight) == 10 and straight[6:] != straight[:4]  # epoch 1 is reshuffled
    _fit(tmp_path / "first", stop)
    checkpoint = tmp_path / "first" / f"epoch={(stop - 1) // 6}-step={stop}.ckpt"
    resumed = _fit(tmp_path / "resumed", 10, checkpoint).seen
    assert resumed == straight[stop:]


def test_a_foreign_position_is_refused() -> None:
    with pytest.raises(ValueError, match="GenerationDataModule position"):
        GenerationDataModule("tiny", n_train=2, n_val=0, batch_size=2).load_state_dict({"cursors": {}})
