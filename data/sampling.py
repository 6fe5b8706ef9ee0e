"""A seeded, resumable, rank-aware batch order for training.

Lightning saves the state of a DataLoader that has ``state_dict``/``load_state_dict``; we
keep the epoch and the number of batches already consumed, so a resumed run continues at
the exact next batch. Under DDP every rank draws the same seeded permutation and takes its
own slice of each global batch, so no DistributedSampler is needed.
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
        _, world = _rank_world()
        per_step = self.batch_size * world
        n = len(self.dataset)
        return n // per_step if self.drop_last else -(-n // per_step)

    def __iter__(self):
        rank, world = _rank_world()
        order = self._order().tolist()
        per_step = self.batch_size * world
        for b in range(self.skip, len(self)):
            global_batch = order[b * per_step:(b + 1) * per_step]
            mine = global_batch[rank * self.batch_size:(rank + 1) * self.batch_size]
            if mine:
                yield mine
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
