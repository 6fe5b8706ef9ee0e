"""Length-bucketed batching under a token budget, and padding of token lists and frames."""

import random

import pytest
import torch

from data.batching import Padded, length_batches, pad_items, padding_fraction
from data.cache import DataError


def _lengths(n: int = 600, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(60, max(1, int(rng.lognormvariate(2.8, 0.6)))) for _ in range(n)]


def _random_batches(lengths, max_tokens, seed):
    """Naive baseline: items in random order, cut at the same budget."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches, cur, longest = [], [], 0
    for i in order:
        if cur and (len(cur) + 1) * max(longest, lengths[i]) > max_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, lengths[i])
    return batches + [cur]


@pytest.mark.parametrize("seed,bucket_batches", [(None, 100), (3, 100), (3, 4), (3, None)])
def test_every_index_once_within_budget(seed, bucket_batches):
    lengths = _lengths()
    batches = length_batches(lengths, 128, seed=seed, bucket_batches=bucket_batches)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(b and len(b) * max(lengths[i] for i in b) <= 128 for b in batches)


def test_padding_is_below_random_batching():
    lengths = _lengths()
    naive = padding_fraction(lengths, _random_batches(lengths, 128, seed=3))
    fractions = [padding_fraction(lengths, length_batches(lengths, 128, seed=3, bucket_batches=k))
                 for k in (4, 20, 100)]
    assert fractions[0] < naive / 2  # even buckets of ~4 batches halve the padding
    assert fractions[0] > fractions[1] > fractions[2]  # larger buckets pad less
    assert fractions[2] < naive / 10


def test_batches_follow_the_seed():
    lengths = _lengths()
    first = length_batches(lengths, 128, seed=7, bucket_batches=4)
    assert length_batches(lengths, 128, seed=7, bucket_batches=4) == first
    assert length_batches(lengths, 128, seed=8, bucket_batches=4) != first
    # Without a seed: sorted, shortest batches first (evaluation).
    plain = length_batches(lengths, 128)
    assert [lengths[b[0]] for b in plain] == sorted(lengths[b[0]] for b in plain)


def test_an_item_over_the_budget_is_named():
    with pytest.raises(DataError, match=r"max_tokens=10 \(item 1 has 11\)"):
        length_batches([3, 11, 4], 10)


def test_pad_token_lists():
    out = pad_items([[5, 6, 7], [8], [9, 10]], pad_value=1)
    assert isinstance(out, Padded)
    assert out.values.dtype == torch.long
    assert out.values.tolist() == [[5, 6, 7], [8, 1, 1], [9, 10, 1]]
    assert out.lengths.tolist() == [3, 1, 2]
    assert out.mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]


def test_pad_feature_frames():
    frames = [torch.randn(4, 3), torch.randn(2, 3), torch.randn(5, 3)]  # (T, F) each
    out = pad_items(frames)
    assert out.values.shape == (3, 5, 3) and out.values.dtype == torch.float32
    assert out.lengths.tolist() == [4, 2, 5]
    assert out.mask.shape == (3, 5) and out.mask.sum().item() == 11
    for b, x in enumerate(frames):
        assert torch.equal(out.values[b, :len(x)], x)
        assert (out.values[b, len(x):] == 0).all()


def test_pad_refuses_mixed_feature_sizes():
    with pytest.raises(ValueError, match="one F"):
        pad_items([torch.zeros(2, 3), torch.zeros(2, 4)])
