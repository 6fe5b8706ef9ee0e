"""The seeded batch sampler as DDP ranks see it (ranks simulated), its resume point, the
epoch as Lightning sets it, and token windows per epoch."""

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from data import sampling
from data.sampling import ResumableLoader, SeededBatchSampler
from data.text import TokenWindows


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
    s.skip = 3
    s.set_epoch(2)  # a resume point belongs to its epoch; another epoch starts whole
    assert len(list(s)) == len(full)


# --------------------------------------------------------------------------- through Lightning
class _Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.tensor(i)


class _Recorder(L.LightningModule):
    """Records the item indices of every training batch, per epoch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[list[int]]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(batch.tolist())
        return self.weight * batch.float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path, *, ckpt_path=None, callbacks=(), **kw) -> dict[int, list[list[int]]]:
    ds = _Indices()
    loader = ResumableLoader(ds, SeededBatchSampler(ds, 4, seed=5))
    module = _Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, default_root_dir=str(tmp_path), **kw)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module.seen


def test_lightning_reaches_the_epoch_and_runs_repeat(tmp_path):
    seen = _fit(tmp_path, max_epochs=3)
    assert sorted(seen) == [0, 1, 2]
    assert all(len(seen[e]) == 6 for e in seen)
    assert seen[0] != seen[1] and seen[1] != seen[2] and seen[0] != seen[2]
    assert _fit(tmp_path, max_epochs=3) == seen


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_lightning_resume_mid_epoch_continues_the_same_order(tmp_path):
    # A checkpoint after step 9 is 3 batches into epoch 1 (6 batches an epoch).
    save = ModelCheckpoint(dirpath=tmp_path, filename="step{step}", every_n_train_steps=9,
                           auto_insert_metric_name=False, save_top_k=-1)
    full = _fit(tmp_path, max_epochs=3, callbacks=[save])
    rest = _fit(tmp_path, max_epochs=3, ckpt_path=str(tmp_path / "step9.ckpt"))
    assert rest == {1: full[1][3:], 2: full[2]}


# --------------------------------------------------------------------------- token windows
def _windows(sampler: SeededBatchSampler, epoch: int) -> torch.Tensor:
    sampler.set_epoch(epoch)
    return torch.stack([sampler.dataset[i] for batch in sampler for i in batch])


def test_validation_windows_stay_put_and_training_windows_move():
    ids = np.arange(300, dtype=np.uint16)
    val = SeededBatchSampler(TokenWindows(ids, 8, drop_last=False), 4, seed=2, shuffle=False,
                             drop_last=False)
    first = _windows(val, 0)
    assert all(torch.equal(first, _windows(val, e)) for e in (1, 2))
    train = SeededBatchSampler(TokenWindows(ids, 8), 4, seed=2)
    starts = [set(_windows(train, e)[:, 0].tolist()) for e in range(3)]
    assert starts[0] != starts[1] and starts[1] != starts[2]


def test_the_epoch_shift_reaches_dataloader_workers():
    ids = np.arange(300, dtype=np.uint16)
    got = []
    for workers in (0, 1):
        ds = TokenWindows(ids, 8)
        loader = ResumableLoader(ds, SeededBatchSampler(ds, 4, seed=2), num_workers=workers)
        loader.batch_sampler.set_epoch(1)
        got.append(torch.cat(list(loader)))
    assert torch.equal(got[0], got[1])
