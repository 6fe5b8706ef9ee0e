"""Length-bucketed batching under a token budget, and padding of variable-length items.

Shared by every modality whose items differ in length (token id lists, audio feature
frames). A batch is padded to its longest item, so its cost is ``len(batch) * longest``;
``length_batches`` keeps that under ``max_tokens`` and groups items of similar length so
little of it is padding. This is the bucketing of fairseq's ``batch_by_size`` and
torchtext's ``BucketIterator``: shuffle, sort by length within large buckets, cut batches,
shuffle the batch order.

Under DDP every rank computes the same batch list from the same seed; a
``data.sampling.SeededBatchSampler`` over that list (one batch per item) then gives each rank
an equal number of them.

Shapes: ``B`` batch, ``T`` longest item, ``F`` features per frame.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .cache import DataError
from .sampling import ResumableLoader, SeededBatchSampler


def length_batches(lengths: Sequence[int], max_tokens: int, *, seed: int | None = None,
                   bucket_batches: int | None = 100) -> list[list[int]]:
    """Item indices grouped into batches of similar length, each within the budget.

    Args:
        lengths: length of each item (tokens, frames); any item longer than ``max_tokens``
            is an error.
        max_tokens: budget per batch: ``len(batch) * longest item <= max_tokens``.
        seed: None gives one deterministic order (all items sorted by length, batches
            shortest first), for evaluation. An int shuffles the items, sorts them by
            length within buckets, and shuffles the batch order, all from this seed.
        bucket_batches: with a seed, each bucket holds about this many batches' worth of
            items (estimated from the mean length); larger buckets pad less, smaller ones
            mix lengths more. None sorts all items as one bucket.

    Returns:
        Batches of item indices; every index appears exactly once.
    """
    if max_tokens < 1:
        raise DataError(f"max_tokens={max_tokens} must be a positive number of tokens")
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i = too_long[0]
        raise DataError(f"{len(too_long)} items are longer than max_tokens={max_tokens} (item "
                        f"{i} has {lengths[i]}); raise max_tokens or shorten the items")
    n = len(lengths)
    if seed is None:
        return _pack(sorted(range(n), key=lambda i: (lengths[i], i)), lengths, max_tokens)
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    if bucket_batches is None or n == 0:
        bucket = max(n, 1)
    else:
        mean = max(sum(lengths) / n, 1.0)
        bucket = max(int(bucket_batches * max_tokens / mean), 1)
    batches = []
    for start in range(0, n, bucket):
        # Python's sort is stable: items of equal length keep their shuffled order.
        part = sorted(order[start:start + bucket], key=lambda i: lengths[i])
        batches += _pack(part, lengths, max_tokens)
    rng.shuffle(batches)
    return batches


def _pack(order: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Cut an ascending-length order into the longest runs that fit the budget."""
    batches, cur = [], []
    for i in order:
        # Ascending order: the newest item is the batch's longest.
        if cur and (len(cur) + 1) * lengths[i] > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded ``B x T`` cells, summed over batches, that are padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1.0 - sum(lengths[i] for b in batches for i in b) / max(padded, 1)


class Padded(NamedTuple):
    """A padded batch: ``values`` (B, T) or (B, T, F), and each item's true length (B,)."""

    values: torch.Tensor
    lengths: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) bool, True at real positions, False at padding."""
        positions_T = torch.arange(self.values.shape[1], device=self.lengths.device)
        return positions_T[None, :] < self.lengths[:, None]


def pad_items(items: Sequence[Sequence[int] | torch.Tensor], *, pad_value: float = 0) -> Padded:
    """Stack variable-length items, padding the end of each to the longest.

    Args:
        items: token id lists (-> long (B, T)), or tensors of shape (T,) or (T, F) (audio
            frames; -> (B, T) or (B, T, F) in their dtype). All must have the same trailing
            shape.
        pad_value: value of the padding positions (the tokenizer's pad id, or 0.0 for
            features).

    Returns:
        ``Padded(values, lengths)``; ``.mask`` gives the (B, T) boolean mask.
    """
    if len(items) == 0:
        raise ValueError("pad_items needs at least one item, got an empty batch")
    tensors = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.long)
               for x in items]
    trailing = {tuple(x.shape[1:]) for x in tensors}
    if len(trailing) > 1 or any(x.dim() == 0 for x in tensors):
        raise ValueError(f"items must all be (T,) or all (T, F) with one F; got shapes "
                         f"{sorted({tuple(x.shape) for x in tensors})[:4]}")
    lengths_B = torch.tensor([len(x) for x in tensors], dtype=torch.long)
    first = tensors[0]
    values = first.new_full((len(tensors), int(lengths_B.max()), *first.shape[1:]), pad_value)
    for b, x in enumerate(tensors):
        values[b, :len(x)] = x
    return Padded(values, lengths_B)


class ItemBatches(torch.utils.data.Dataset):
    """A list of precomputed batches as a dataset: item ``i`` is the list of the items of
    batch ``i`` (see ``bucketed_loader``)."""

    def __init__(self, items: Sequence, batches: Sequence[Sequence[int]]):
        self.items, self.batches = items, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list:
        return [self.items[j] for j in self.batches[i]]


def bucketed_loader(items: Sequence, lengths: Sequence[int], max_tokens: int, *, seed: int,
                    train: bool, collate, num_workers: int = 0) -> ResumableLoader:
    """A resumable loader of length-bucketed batches of ``items``.

    The batches are fixed for the run and identical on every rank (same seed); a
    ``SeededBatchSampler`` of batch size 1 orders them per epoch and splits them across
    ranks (``drop_last`` for training, so ranks take equal numbers of batches).

    Args:
        items: the dataset's items; lengths: each item's length (tokens, frames).
        max_tokens: the padded-size budget of a batch (``length_batches``).
        seed: batch contents and order; train: shuffled (else sorted, every item once).
        collate: a list of items -> the batch the model takes.
    """
    batches = length_batches(lengths, max_tokens, seed=seed if train else None)
    ds = ItemBatches(items, batches)
    sampler = SeededBatchSampler(ds, 1, seed=seed, shuffle=train, drop_last=train)
    return ResumableLoader(ds, sampler, collate_fn=lambda b: collate(b[0]),
                           num_workers=num_workers)
