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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SeededBatchSampler(Sampler[list[int]]):
    """Shuffled batches, reproducible from (seed, epoch), resumable mid-epoch.

    Args:
        dataset: sized dataset; if it has ``set_shift`` it is called with an epoch-seeded
            offset (token windows move their boundaries every epoch).
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if hasattr(self.dataset, "set_shift"):
            self.dataset.set_shift(int(torch.randint(0, 1 << 30, (1,), generator=g)))
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
    """DataLoader over a ``SeededBatchSampler`` that Lightning can checkpoint and restore."""

    def __init__(self, dataset, batch_sampler: SeededBatchSampler, **kwargs):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._consumed = 0

    def __iter__(self):
        self._consumed = self.batch_sampler.skip
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.batch_sampler.epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.epoch = state["epoch"]
        self.batch_sampler.skip = state["consumed"]
