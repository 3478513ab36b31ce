"""A data module's resumable position over data streams, kept across checkpoints.

The module records the cursor of every training item the trainer actually consumes
(`on_before_batch_transfer` runs in the main process just before the step), and Lightning stores
`state_dict()` in each checkpoint, so a restored run restarts every data stream right after its last
consumed item. Under DDP the state holds every rank's position (gathered when the checkpoint is
written); restoring needs the same world size and number of workers, since those decide which rows each
stream reads.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn

from hyperbagel.datamodules.packed_dataset import DataPosition, StreamItem
from hyperbagel.datamodules.readers import BadRow

STATE_VERSION = 1
LOGGED_BAD_ROWS = 20  # per rank and process; later ones are only counted
log = logging.getLogger(__name__)


def rank_and_world(module: LightningDataModule) -> tuple[int, int]:
    """(rank, world size) from the module's trainer, else from torch.distributed, else (0, 1)."""
    trainer = module.trainer
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamPositions:
    """A data module's resumable position over `GroupMixture` streams: this rank's `DataPosition`,
    recorded for each training item the trainer consumes, saved for every rank in checkpoints and
    handed back to the next training loader after a restore.

    Args:
        strict_resume: on a restore with another world size or worker count, raise (True) or warn and
            restart the data streams from the beginning (False).
    """

    def __init__(self, strict_resume: bool = True) -> None:
        self.strict_resume = strict_resume
        self.position = DataPosition()
        self.bad_rows: list[BadRow] = []
        self._restored: dict[str, Any] | None = None

    def record(self, item: StreamItem) -> None:
        """Keep the position after a training item about to be consumed (and its skipped rows, the
        first `LOGGED_BAD_ROWS` of them also logged with file, row and reason)."""
        self.position.record(item)
        for number, bad in enumerate(item.bad_rows, start=len(self.bad_rows) + 1):
            if number > LOGGED_BAD_ROWS:
                break
            log.warning("skipped bad data row %d: %s", number, bad)
            if number == LOGGED_BAD_ROWS:
                log.warning("further bad rows are counted (data/bad_rows), not logged")
        self.bad_rows += item.bad_rows

    def for_training(self, module: LightningDataModule, num_workers: int) -> DataPosition:
        """The position a new training loader starts from: the restored one, once, after a restore."""
        if self._restored is not None:
            self.position = self._position_from_state(module, self._restored, num_workers)
            self._restored = None
        return self.position

    def _local_state(self) -> dict[str, Any]:
        return {
            "cursors": dict(self.position.cursors),
            "next_stream": self.position.next_stream,
            "num_streams": self.position.num_streams,
        }

    def state_dict(self, module: LightningDataModule) -> dict[str, Any]:
        """Every rank's data position (a collective under DDP: Lightning calls it on all ranks)."""
        local = self._local_state() if self._restored is None else self._restored_local(module)
        rank, world_size = rank_and_world(module)
        ranks = [local]
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * world_size
            torch.distributed.all_gather_object(ranks, local)
        return {"version": STATE_VERSION, "world_size": world_size, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"unknown data-position state version {state_dict.get('version')}")
        self._restored = state_dict

    def _restored_local(self, module: LightningDataModule) -> dict[str, Any]:
        rank, _ = rank_and_world(module)
        ranks = self._restored["ranks"]
        return ranks[rank] if rank < len(ranks) else {"cursors": {}, "next_stream": 0, "num_streams": None}

    def _position_from_state(
        self, module: LightningDataModule, state: dict[str, Any], num_workers: int
    ) -> DataPosition:
        _, world_size = rank_and_world(module)
        local = self._restored_local(module)
        streams = max(1, num_workers)
        saved_streams = local["num_streams"]
        if state["world_size"] != world_size or saved_streams not in (None, streams):
            message = (
                f"the data position was saved with world size {state['world_size']} and {saved_streams} "
                f"streams (dataloader workers) per rank; this run has world size {world_size} and {streams}"
            )
            if self.strict_resume:
                raise ValueError(message + "; set strict_resume=False to restart the data streams instead")
            rank_zero_warn(message + ": restarting the data streams from their beginning (samples repeat)")
            return DataPosition()
        return DataPosition(
            cursors=dict(local["cursors"]), next_stream=local["next_stream"], num_streams=saved_streams
        )


class ResumableStreams:
    """For data modules over `GroupMixture` streams (`self.positions`): the position, the bad-row
    figures and the checkpoint state, as Lightning and the stages read them."""

    positions: StreamPositions

    @property
    def position(self) -> DataPosition:
        """This rank's position after the last consumed training batch."""
        return self.positions.position

    @property
    def bad_rows(self) -> list[BadRow]:
        """Bad rows skipped while filling the training batches consumed in this process (this rank)."""
        return list(self.positions.bad_rows)

    @property
    def bad_row_count(self) -> int:
        """Bad rows skipped on this rank since training began (restored across checkpoints)."""
        return self.position.bad_row_count()

    @property
    def rows_read(self) -> int:
        """Rows read on this rank since training began (restored across checkpoints)."""
        return self.position.rows_read()

    def state_dict(self) -> dict[str, Any]:
        return self.positions.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.positions.load_state_dict(state_dict)
