"""A seeded, resumable, rank-aware batch order for training.

Lightning saves the state of a DataLoader that has ``state_dict``/``load_state_dict``; we
keep the epoch and the number of batches already consumed, so a resumed run continues at
the exact next batch. Under DDP every rank draws the same seeded permutation, so no
DistributedSampler is needed:

- training (``drop_last=True``): each rank takes its slice of every global batch of
  ``batch_size * world`` items, so all ranks run the same number of steps;
- evaluation (``drop_last=False``): each rank takes every world-th item (``order[rank::world]``)
  in batches, so every item is seen exactly once, no rank is left without a batch (given at
  least ``world`` items), and ranks differ by at most one batch.

Lightning reaches the epoch through ``batch_sampler.sampler.set_epoch`` only (its
``_set_sampler_epoch``, checked on lightning 2.6), never through ``set_epoch`` on a custom
batch sampler itself, so ``SeededBatchSampler.sampler`` is a small handle whose
``set_epoch`` sets the batch sampler's epoch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _EpochHandle:
    """What Lightning sees as ``batch_sampler.sampler``: forwards ``set_epoch``."""

    def __init__(self, batch_sampler: SeededBatchSampler):
        self.batch_sampler = batch_sampler

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class SeededBatchSampler(Sampler[list[int]]):
    """Shuffled batches, reproducible from (seed, epoch), resumable mid-epoch.

    Args:
        dataset: sized dataset; if it has ``set_shift`` and ``shuffle`` is True it is called
            with an epoch-seeded offset (token windows move their boundaries every training
            epoch; evaluation keeps the same items every time).
        batch_size: per-rank batch size.
        seed: base seed.
        shuffle: False gives the dataset order (validation).
        drop_last: True for training (equal steps on every rank, a partial last global
            batch dropped); False for evaluation (every item once).
    """

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.skip = 0, 0
        self.sampler = _EpochHandle(self)
        self._shift()

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0  # a resume point counts batches of the epoch it was saved in
        self.epoch = epoch
        # Shift here too, not only when iterating: DataLoader workers copy the dataset when
        # the iterator starts, before the first batch is drawn (persistent workers keep their
        # first copy, so shifting datasets want non-persistent workers).
        self._shift()

    def _shift(self) -> torch.Generator:
        """Moves a shiftable training dataset to this epoch's offset; returns the generator
        the epoch's permutation continues from."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.shuffle and hasattr(self.dataset, "set_shift"):
            self.dataset.set_shift(int(torch.randint(0, 1 << 30, (1,), generator=g)))
        return g

    def _order(self) -> torch.Tensor:
        g = self._shift()
        n = len(self.dataset)
        return torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)

    def __len__(self) -> int:
        rank, world = _rank_world()
        n = len(self.dataset)
        if self.drop_last:
            return n // (self.batch_size * world)
        shard = len(range(rank, n, world))
        return -(-shard // self.batch_size)

    def __iter__(self):
        rank, world = _rank_world()
        order = self._order().tolist()
        if self.drop_last:
            per_step = self.batch_size * world
            for b in range(self.skip, len(self)):
                start = b * per_step + rank * self.batch_size
                yield order[start:start + self.batch_size]
        else:
            shard = order[rank::world]
            for b in range(self.skip, len(self)):
                yield shard[b * self.batch_size:(b + 1) * self.batch_size]
        self.skip = 0


class ResumableLoader(DataLoader):
    """DataLoader over a ``SeededBatchSampler`` that Lightning can checkpoint and restore.

    It draws its workers' base seed from a generator of its own, seeded by (seed, epoch),
    not from torch's global random state: starting an iterator then leaves the global state
    untouched (a resumed run, which starts one more iterator than an uninterrupted run,
    keeps the same dropout and augmentation draws), and the workers of a resumed epoch get
    the seeds they had the first time.
    """

    def __init__(self, dataset, batch_sampler: SeededBatchSampler, **kwargs):
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._consumed = 0

    def __iter__(self):
        self._consumed = self.batch_sampler.skip
        s = self.batch_sampler
        self.generator.manual_seed(s.seed * 100_003 + s.epoch + 0x5EED)
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.batch_sampler.epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.set_epoch(state["epoch"])
        self.batch_sampler.skip = state["consumed"]
