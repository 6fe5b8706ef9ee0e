"""The speech encoder and CTC decoding: against torchaudio's Conformer on the same weights,
padding invariance, and prefix beam search against exhaustive search over label sequences."""

from __future__ import annotations

import itertools

import pytest
import torch

from modules.converters import conformer_state_dict_from_torchaudio
from modules.ctc import BLANK, beam_decode, greedy_decode, prefix_beam_search, sequence_log_prob
from modules.speech import (
    Conformer,
    ConvSubsampling,
    LogMel,
    SpeechEncoder,
    depthwise_conv1d,
    subsampled_lengths,
)


@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_conv_equals_torch_conv1d_with_gradients(bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 5, padding=2, groups=6, bias=bias).double()
    x = torch.randn(3, 11, 6, dtype=torch.float64, requires_grad=True)
    expect = conv(x.transpose(1, 2)).transpose(1, 2)
    got = depthwise_conv1d(x, conv)
    torch.testing.assert_close(got, expect)
    g = torch.randn_like(got)
    params = [x, *conv.parameters()]
    torch.testing.assert_close(torch.autograd.grad(got, params, g),
                               torch.autograd.grad(expect, params, g))
    with torch.no_grad():  # the in-place path
        torch.testing.assert_close(depthwise_conv1d(x, conv), expect)


@pytest.mark.parametrize("train", [False, True])
def test_conformer_matches_torchaudio_on_the_same_weights(train):
    import torchaudio
    torch.manual_seed(0)
    theirs = torchaudio.models.Conformer(input_dim=32, num_heads=4, ffn_dim=64, num_layers=2,
                                         depthwise_conv_kernel_size=7, dropout=0.0)
    with torch.no_grad():  # non-trivial norm statistics, so their import is tested too
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ours = Conformer(embed_dim=32, depth=2, num_heads=4, mlp_hidden_dim=64, conv_kernel=7,
                     rope_theta=None, max_seq_len=64, backend="math")
    ours.load_state_dict(conformer_state_dict_from_torchaudio(theirs.state_dict(), 2))
    theirs.train(train), ours.train(train)
    x = torch.randn(3, 20, 32, requires_grad=True)
    expect, _ = theirs(x, torch.full((3,), 20))
    got = ours(x)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)
    if train:  # batch statistics, and the gradients through every block
        g = torch.randn_like(got)
        torch.testing.assert_close(torch.autograd.grad(got, x, g),
                                   torch.autograd.grad(expect, x, g), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("block", ["transformer", "conformer"])
def test_padding_changes_nothing(block):
    torch.manual_seed(0)
    enc = SpeechEncoder(num_outputs=6, block=block, n_mels=16, subsample_channels=4,
                        embed_dim=32, depth=2, num_heads=4, mlp_hidden_dim=48, conv_kernel=5,
                        max_frames=200, drop=0.0).eval()
    a, b = torch.randn(37, 16), torch.randn(61, 16)
    batch = torch.zeros(2, 61, 16)
    batch[0, :37], batch[1] = a, b
    logits, lengths = enc(batch, torch.tensor([37, 61]))
    alone, n = enc(a[None], torch.tensor([37]))
    assert lengths.tolist() == [10, 16] and n.tolist() == [10]
    torch.testing.assert_close(logits[0, :10], alone[0], atol=1e-5, rtol=1e-4)


def test_subsampled_lengths_match_the_convolutions():
    sub = ConvSubsampling(n_mels=16, channels=2, embed_dim=8)
    for t in (1, 2, 3, 4, 5, 17, 100, 101):
        assert sub(torch.randn(1, t, 16)).shape[1] == int(subsampled_lengths(torch.tensor(t)))


def test_spec_augment_only_in_training():
    enc = SpeechEncoder(num_outputs=4, n_mels=16, subsample_channels=2, embed_dim=16, depth=1,
                        num_heads=2, mlp_hidden_dim=16, time_width=5, freq_width=4)
    x = torch.randn(2, 40, 16)
    enc.train()
    assert not torch.equal(enc.spec_augment(x), x)
    enc.eval()
    assert torch.equal(enc.spec_augment(x), x)


def test_classify_head_pools_kept_frames_only():
    torch.manual_seed(0)
    enc = SpeechEncoder(num_outputs=5, head="classify", n_mels=16, subsample_channels=2,
                        embed_dim=16, depth=1, num_heads=2, mlp_hidden_dim=16, drop=0.0).eval()
    a = torch.randn(30, 16)
    batch = torch.cat([a, torch.randn(20, 16)])[None].repeat(2, 1, 1)
    logits, _ = enc(batch, torch.tensor([30, 50]))
    alone, _ = enc(a[None], torch.tensor([30]))
    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits[0], alone[0], atol=1e-5, rtol=1e-4)


def test_log_mel_is_normalised_per_bin():
    fe = LogMel(n_mels=20)
    feats = fe(torch.randn(16000))
    assert feats.shape == (fe.num_frames(16000), 20)
    torch.testing.assert_close(feats.mean(0), torch.zeros(20), atol=1e-4, rtol=0)
    torch.testing.assert_close(feats.std(0), torch.ones(20), atol=1e-3, rtol=0)


def test_greedy_collapses_repeats_and_drops_blanks():
    path = [1, 1, BLANK, 1, 2, 2, BLANK, BLANK, 3, 3]
    lp = torch.full((1, len(path), 4), -10.0)
    lp[0, torch.arange(len(path)), torch.tensor(path)] = 0.0
    assert greedy_decode(lp, torch.tensor([len(path)])) == [[1, 1, 2, 3]]
    assert greedy_decode(lp, torch.tensor([4])) == [[1, 1]]


@pytest.mark.parametrize("seed", range(4))
def test_prefix_beam_search_finds_the_most_probable_labels(seed):
    """A wide beam finds the label sequence of highest total probability (all paths summed),
    found here by enumerating every sequence and scoring it with torch's CTC loss."""
    g = torch.Generator().manual_seed(seed)
    L, V = 5, 3
    lp = (torch.randn(L, V, generator=g) * 1.5).log_softmax(-1)
    candidates = [list(c) for n in range(L + 1) for c in itertools.product(range(1, V), repeat=n)]
    scored = [(sequence_log_prob(lp, c), c) for c in candidates]
    best_score, best = max((s, c) for s, c in scored if s > -float("inf"))
    found = prefix_beam_search(lp, beam_size=64, prune=-1e9)
    assert sequence_log_prob(lp, found) == pytest.approx(best_score, abs=1e-9), (found, best)
    # greedy is a lower bound the beam never falls below
    greedy = greedy_decode(lp[None], torch.tensor([L]))[0]
    assert sequence_log_prob(lp, found) >= sequence_log_prob(lp, greedy) - 1e-9
    assert beam_decode(lp[None], torch.tensor([L]), beam_size=64)[0] == found
