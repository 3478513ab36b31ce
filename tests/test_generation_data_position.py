"""The shapes distillation data's position: epoch-seeded batch order split across ranks, and a run restored
from a mid-epoch checkpoint continuing with the next unseen batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from hyperbagel.datamodules.generation_datamodule import GenerationDataModule, ResumableBatchOrder
from hyperbagel.distillation.batches import GenerationBatch

from helpers import quiet_trainer


def _order(sampler: ResumableBatchOrder, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_batch_order_is_seeded_by_epoch_and_split_across_ranks() -> None:
    batches = list(range(11))
    ranks = [ResumableBatchOrder(batches, 2, rank, seed=3) for rank in (0, 1)]
    for epoch in (0, 1):
        torch.manual_seed(epoch)  # the global random state plays no part
        shares = [_order(sampler, epoch) for sampler in ranks]
        assert len(shares[0]) == len(shares[1]) == 5 == len(ranks[0])  # the remainder is dropped
        assert not set(shares[0]) & set(shares[1])
        assert shares == [_order(ResumableBatchOrder(batches, 2, r, seed=3), epoch) for r in (0, 1)]
    assert _order(ranks[0], 0) != _order(ranks[0], 1)


def test_resume_skips_the_consumed_batches_of_its_epoch_only() -> None:
    sampler = ResumableBatchOrder(list(range(8)), 1, 0, seed=0)
    full = {epoch: _order(sampler, epoch) for epoch in (2, 3)}
    sampler.resume_at(2, 3)
    assert _order(sampler, 2) == full[2][3:]
    assert _order(sampler, 2) == full[2]  # once
    sampler.resume_at(2, 3)
    assert _order(sampler, 3) == full[3]  # a later epoch is untouched, and the resume is dropped
    assert _order(sampler, 2) == full[2]


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
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=4, save_top_k=-1)
    trainer = quiet_trainer(root, max_steps, [checkpoints], limit_val_batches=0, num_sanity_val_steps=0)
    data = GenerationDataModule("tiny", n_train=6, n_val=2, batch_size=2)  # 6 batches an epoch (3 a kind)
    trainer.fit(stage, data, ckpt_path=ckpt_path)
    return stage


@pytest.mark.parametrize("stop", [4, 8], ids=["mid_first_epoch", "mid_second_epoch"])
def test_a_restored_run_continues_with_the_next_unseen_batch(tmp_path: Path, stop: int) -> None:
    straight = _fit(tmp_path / "straight", 10).seen
    assert len(straight) == 10 and straight[6:] != straight[:4]  # epoch 1 is reshuffled
    _fit(tmp_path / "first", stop)
    checkpoint = tmp_path / "first" / f"epoch={stop // 6}-step={stop}.ckpt"
    resumed = _fit(tmp_path / "resumed", 10, checkpoint).seen
    assert resumed == straight[stop:]


def test_a_foreign_position_is_refused() -> None:
    with pytest.raises(ValueError, match="GenerationDataModule position"):
        GenerationDataModule("tiny", n_train=2, n_val=0, batch_size=2).load_state_dict({"cursors": {}})
