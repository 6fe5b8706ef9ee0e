"""The seeded batch sampler as DDP ranks see it (ranks simulated), and its resume point."""

import pytest

from data import sampling
from data.sampling import SeededBatchSampler


def batches_per_rank(monkeypatch, n, batch_size, world, **kw):
    out = []
    for rank in range(world):
        monkeypatch.setattr(sampling, "_rank_world", lambda r=rank: (r, world))
        s = SeededBatchSampler(range(n), batch_size, seed=3, **kw)
        got = list(s)
        assert len(got) == len(s)
        out.append(got)
    return out


@pytest.mark.parametrize("n,batch_size,world", [(100, 8, 2), (33, 16, 2), (7, 2, 3), (5, 4, 1)])
def test_training_ranks_take_equal_disjoint_slices(monkeypatch, n, batch_size, world):
    ranks = batches_per_rank(monkeypatch, n, batch_size, world, shuffle=True, drop_last=True)
    steps = n // (batch_size * world)
    assert all(len(r) == steps for r in ranks)
    assert all(len(b) == batch_size for r in ranks for b in r)
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen)) == steps * batch_size * world


@pytest.mark.parametrize("n,batch_size,world", [(12, 16, 2), (33, 16, 2), (100, 8, 3), (5, 4, 1)])
def test_evaluation_sees_every_item_once_on_every_rank(monkeypatch, n, batch_size, world):
    ranks = batches_per_rank(monkeypatch, n, batch_size, world, shuffle=False, drop_last=False)
    seen = sorted(i for r in ranks for b in r for i in b)
    assert seen == list(range(n))
    counts = [len(r) for r in ranks]
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1


def test_resume_continues_at_the_next_batch():
    full = list(SeededBatchSampler(range(40), 4, seed=1))
    s = SeededBatchSampler(range(40), 4, seed=1)
    s.skip = 3
    assert list(s) == full[3:]
    assert list(s) == full  # the skip applies once
    s.set_epoch(1)
    assert list(s) != full
