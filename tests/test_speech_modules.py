"""The speech encoder and CTC decoding: against torchaudio's Conformer on the same weights,
padding invariance, prefix beam search (alone and with a character n-gram fused in) against
exhaustive search over label sequences, and the n-gram against hand-computed probabilities."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from modules.converters import conformer_state_dict_from_torchaudio
from modules.ctc import (
    BLANK,
    LMFusion,
    beam_decode,
    greedy_decode,
    prefix_beam_search,
    sequence_log_prob,
)
from modules.ngram import END, START, CharNgramLM
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


def test_kneser_ney_bigram_by_hand():
    """Two sentences, discount 0.5: the probabilities worked out on paper. Bigrams (^ the
    start): ^a ab b$ ^b b$; continuation counts a:1 b:2 $:1, so the unigram level gives
    a (1-.5 + .5*3/3)/4 = .25, b .5, $ .25 (uniform 1/3 below it)."""
    lm = CharNgramLM(["ab", "b"], order=2, discount=0.5)
    assert lm.vocab == sorted(["a", "b", END])
    assert lm.prob("", "a") == pytest.approx((0.5 + 0.5 * 2 * 0.25) / 2)   # 0.375
    assert lm.prob("", "b") == pytest.approx((0.5 + 0.5 * 2 * 0.5) / 2)    # 0.5
    assert lm.prob("a", "b") == pytest.approx(0.5 + 0.5 * 1 * 0.5)         # 0.75
    assert lm.prob("a", "a") == pytest.approx(0.5 * 0.25)
    assert lm.prob("xab", END) == pytest.approx((1.5 + 0.5 * 0.25) / 2)    # history "b" only
    assert lm.text_log_prob("ab") == pytest.approx(math.log(0.375 * 0.75 * 0.8125))


def _kneser_ney_reference(texts, order, d, context, char):
    """Interpolated Kneser-Ney from its definition, everything recounted for each query:
    the top order counts n-grams, a lower order counts a gram's distinct left neighbours,
    and each level adds d * (its history's distinct followers) / total of the level below."""
    padded = [START * (order - 1) + t + END for t in texts]
    top = [s[i - order + 1:i + 1] for s in padded for i in range(order - 1, len(s))]
    vocab = {c for t in texts for c in t} | {END}

    def grams(k):
        return {g[order - k:] for g in top}

    def count(g):
        if len(g) == order:
            return top.count(g)
        return sum(1 for x in grams(len(g) + 1) if x[1:] == g)

    def p(history, c):
        if history is None:
            return 1 / len(vocab)
        lower = p(history[1:] if history else None, c)
        follow = [g for g in grams(len(history) + 1) if g[:-1] == history]
        total = sum(count(g) for g in follow)
        if not total:
            return lower
        return (max(count(history + c) - d, 0) + d * len(follow) * lower) / total

    return p((START * (order - 1) + context)[len(context):], char)


def test_kneser_ney_matches_its_definition_at_order_three():
    rng = random.Random(3)
    texts = ["".join(rng.choice("abc ") for _ in range(rng.randint(1, 7))) for _ in range(12)]
    lm = CharNgramLM(texts, order=3, discount=0.6)
    for _ in range(30):
        context = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 5)))
        for c in lm.vocab:
            assert lm.prob(context, c) == pytest.approx(
                _kneser_ney_reference(texts, 3, 0.6, context, c), abs=1e-12), (context, c)


@pytest.mark.parametrize("order", [1, 3, 6])
def test_ngram_is_a_distribution_for_every_context(order):
    rng = random.Random(order)
    texts = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 12))) for _ in range(50)]
    lm = CharNgramLM(texts, order=order, alphabet="abcz ")
    assert "z" in lm.vocab                       # in the alphabet, never in the text
    for _ in range(40):
        context = "".join(rng.choice("ab cz") for _ in range(rng.randint(0, 9)))
        assert sum(lm.prob(context, c) for c in lm.vocab) == pytest.approx(1.0, abs=1e-12)
    if order > 1:  # seen text is likelier than the same characters sorted
        assert lm.text_log_prob(texts[0] * 2) > lm.text_log_prob("".join(sorted(texts[0] * 2)))


@pytest.mark.parametrize("seed", [0, 2, 3, 5])
def test_beam_search_with_an_lm_finds_the_best_fused_score(seed):
    """With a wide beam, the fused search returns the label sequence that maximises
    log p_ctc + weight * log p_lm(text, end) + bonus * length over every sequence; on these
    draws that is not the sequence CTC alone prefers."""
    g = torch.Generator().manual_seed(seed)
    L, V = 6, 3
    lp = torch.randn(L, V, generator=g).log_softmax(-1)
    pieces = ["", "a", "b"]
    lm = LMFusion(CharNgramLM(["aab", "ba", "aaab", "b"], order=3), pieces,
                  weight=1.5, bonus=0.5)
    candidates = [list(c) for n in range(L + 1) for c in itertools.product(range(1, V), repeat=n)]

    def fused(c):
        text = "".join(pieces[i] for i in c)
        return sequence_log_prob(lp, c) + 1.5 * lm.lm.text_log_prob(text) + 0.5 * len(c)

    scored = [(fused(c), c) for c in candidates if sequence_log_prob(lp, c) > -float("inf")]
    best_score, best = max(scored)
    found = prefix_beam_search(lp, beam_size=200, prune=-1e9, lm=lm)
    assert fused(found) == pytest.approx(best_score, abs=1e-9), (found, best)
    assert found != prefix_beam_search(lp, beam_size=200, prune=-1e9)
    assert beam_decode(lp[None], torch.tensor([L]), beam_size=200, lm=lm)[0] == found


def test_lm_picks_the_spelling_its_text_knows():
    """After a clear 'a', a frame slightly likelier 'a' than 'b': CTC alone reads 'aa', the
    n-gram that has only seen 'ab' turns it into 'ab'."""
    lp = torch.full((3, 3), -30.0)
    lp[0, 1] = 0.0                                       # 'a'
    lp[1, BLANK] = 0.0
    lp[2, 1], lp[2, 2] = math.log(0.55), math.log(0.45)  # 'a' or 'b'
    lp = lp.log_softmax(-1)
    lm = LMFusion(CharNgramLM(["ab"] * 5, order=2), ["", "a", "b"], weight=1.0, bonus=0.0)
    assert prefix_beam_search(lp, beam_size=4) == [1, 1]
    assert prefix_beam_search(lp, beam_size=4, lm=lm) == [1, 2]
