"""The shared searches of ``modules.generation`` against independent references: an
exhaustive search over a toy decoder's tiny vocabulary, greedy decoding, a decoder-only
model with and without its KV cache; and the per-sentence length limit at max_seq_len."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.generation import beam_search, block_repeated_ngrams, generate, greedy_search
from modules.lm import CausalLM
from modules.seq2seq import Seq2SeqTransformer
from modules.transformer import reorder_caches

V, BOS, EOS, PAD = 5, 0, 1, 0


def code(tokens: list[int]) -> int:
    """A distinct number for every token sequence (mixed radix, tokens shifted by one)."""
    c = 0
    for t in tokens:
        c = c * (V + 1) + t + 1
    return c


class TableDecoder:
    """Fixed log-probabilities per (sentence, whole prefix), no cross-attention. Each row's
    state is the code of its prefix, updated one token per step, so a wrong ``reorder``
    reads another prefix's table (and fails the check in ``step``)."""

    def __init__(self, logp):  # (B, codes, V)
        self.logp = logp

    def start(self, beams, max_len):
        B = self.logp.shape[0]
        return {"sentence": torch.arange(B).repeat_interleave(beams),
                "code": torch.zeros(B * beams, dtype=torch.long)}

    def step(self, tokens, state):
        state["code"] = state["code"] * (V + 1) + tokens[:, -1] + 1
        assert state["code"].tolist() == [code(row) for row in tokens.tolist()]
        return self.logp[state["sentence"], state["code"]]

    def reorder(self, state, rows):
        return {k: v[rows] for k, v in state.items()}


def repeats_ngram(tokens: list[int], n: int) -> bool:
    """Whether an n-gram occurs twice in the hypothesis (for n >= 2 counted from BOS)."""
    seq = tokens if n == 1 else [BOS, *tokens]
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def exhaustive_best(logp, limit: int, alpha: float, no_repeat: int = 0):
    """Every hypothesis up to ``limit`` tokens, scored as beam search scores them; with
    ``no_repeat`` only those without a repeated n-gram of that size."""
    best = (float("-inf"), None)
    for n in range(1, limit + 1):
        for seq in itertools.product(range(V), repeat=n):
            if EOS in seq[:-1] or (n < limit and seq[-1] != EOS):
                continue  # only an EOS ends a hypothesis before the limit
            if no_repeat and repeats_ngram([t for t in seq if t != EOS], no_repeat):
                continue
            total = sum(float(logp[code([BOS, *seq[:i]]), t]) for i, t in enumerate(seq))
            tokens = list(seq[:-1]) if seq[-1] == EOS else list(seq)
            best = max(best, (total / n ** alpha, tokens), key=lambda x: x[0])
    return best


def table(B=2, favour: int | None = None):
    """Random log-probabilities per (sentence, prefix); ``favour`` boosts one token so
    the best hypotheses repeat it."""
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(B, code([BOS, 4, 4]) + 1, V, generator=g)
    if favour is not None:
        logits[..., favour] += 8.0
    return F.log_softmax(logits, -1)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_wide_beam_finds_exhaustive_optimum(alpha):
    logp, limits = table(), torch.tensor([3, 2])
    hyps = beam_search(TableDecoder(logp), 2, max_len=limits, bos_id=BOS, eos_id=EOS,
                       pad_id=PAD, beam_size=V ** 3, length_penalty=alpha)
    for b, limit in enumerate(limits.tolist()):
        score, tokens = exhaustive_best(logp[b], limit, alpha)
        assert hyps[b].tokens == tokens
        assert hyps[b].score == pytest.approx(score, rel=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_wide_beam_with_ngram_blocking_finds_constrained_optimum(n):
    logp, limits = table(favour=2), torch.tensor([3, 3])
    hyps = beam_search(TableDecoder(logp), 2, max_len=limits, bos_id=BOS, eos_id=EOS,
                       pad_id=PAD, beam_size=V ** 3, length_penalty=1.0,
                       no_repeat_ngram_size=n)
    for b, limit in enumerate(limits.tolist()):
        score, tokens = exhaustive_best(logp[b], limit, 1.0, no_repeat=n)
        assert not repeats_ngram(hyps[b].tokens, n)
        assert hyps[b].tokens == tokens
        assert hyps[b].score == pytest.approx(score, rel=1e-5)
    # the unconstrained optima repeat: the blocking changed them
    assert all(repeats_ngram(exhaustive_best(logp[b], 3, 1.0)[1], n) for b in range(2))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_block_repeated_ngrams_matches_a_direct_count(n):
    g = torch.Generator().manual_seed(n)
    tokens = torch.randint(2, 6, (16, 9), generator=g)
    tokens[:, 0] = BOS
    out = block_repeated_ngrams(tokens, torch.zeros(16, 8), n)
    for row, prefix in enumerate(tokens.tolist()):
        for tok in range(8):
            seq = (prefix[1:] if n == 1 else prefix) + [tok]
            grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
            assert (out[row, tok] == float("-inf")) == (grams[-1] in grams[:-1]), (row, tok)


def test_greedy_with_ngram_blocking_never_repeats():
    # a decoder that always prefers token 2 then 3: unblocked it loops "2 2 2 ..."
    logp = torch.full((1, code([BOS, 4, 4]) + 1, V), -5.0)
    logp[..., 2], logp[..., 3], logp[..., 4] = -0.1, -1.0, -2.0
    plain = greedy_search(TableDecoder(logp), 1, max_len=3, bos_id=BOS, eos_id=EOS)
    blocked = greedy_search(TableDecoder(logp), 1, max_len=3, bos_id=BOS, eos_id=EOS,
                            no_repeat_ngram_size=1)
    assert plain == [[2, 2, 2]] and blocked == [[2, 3, 4]]


def test_narrow_beam_on_table_decoder():
    logp = table()
    greedy = greedy_search(TableDecoder(logp), 2, max_len=3, bos_id=BOS, eos_id=EOS)
    one = beam_search(TableDecoder(logp), 2, max_len=3, bos_id=BOS, eos_id=EOS,
                      beam_size=1, length_penalty=0.0)
    assert [h.tokens for h in one] == greedy
    wide = beam_search(TableDecoder(logp), 2, max_len=3, bos_id=BOS, eos_id=EOS,
                       beam_size=3, length_penalty=0.0)
    assert all(w.score >= o.score - 1e-6 for w, o in zip(wide, one))


class LMSteps:
    """A decoder-only model (KV cache, no cross-attention memory) behind the protocol."""

    def __init__(self, model, batch, use_cache):
        self.model, self.batch, self.use_cache = model, batch, use_cache

    def start(self, beams, max_len):
        if not self.use_cache:
            return None
        return self.model.new_caches(self.batch * beams, max_len + 1)

    def step(self, tokens, caches):
        x = tokens[:, -1:] if caches is not None else tokens
        return F.log_softmax(self.model(x, caches=caches)[:, -1].float(), -1)

    def reorder(self, caches, rows):
        if caches is not None:
            reorder_caches(caches, rows)
        return caches


def tiny_lm():
    torch.manual_seed(0)
    m = CausalLM(vocab_size=32, embed_dim=32, depth=2, num_heads=4, num_kv_heads=2,
                 max_seq_len=32).eval()
    with torch.no_grad():  # a peaked distribution, so beams disagree with greedy
        m.lm_head.weight.mul_(20.0)
    return m


def test_decoder_only_model_through_protocol():
    m, eos = tiny_lm(), 3
    kw = dict(max_len=12, bos_id=2, eos_id=eos)
    greedy = greedy_search(LMSteps(m, 1, True), 1, **kw)
    want = generate(m, [[2]], max_new_tokens=12, eos_id=eos)[0]
    assert greedy == [want[:-1] if want[-1:] == [eos] else want]
    assert [h.tokens for h in beam_search(LMSteps(m, 1, True), 1, beam_size=1,
                                          length_penalty=0.0, **kw)] == greedy
    cached = beam_search(LMSteps(m, 1, True), 1, beam_size=4, **kw)
    uncached = beam_search(LMSteps(m, 1, False), 1, beam_size=4, **kw)
    assert cached[0].tokens == uncached[0].tokens
    assert cached[0].score == pytest.approx(uncached[0].score, abs=1e-4)


def test_search_refuses_bad_sizes():
    dec = TableDecoder(table())
    with pytest.raises(ValueError, match="beam_size must be at least 1, got 0"):
        beam_search(dec, 2, max_len=3, bos_id=BOS, eos_id=EOS, beam_size=0)
    with pytest.raises(ValueError, match=r"\(2,\) tensor.*got tensor\(\[3, 3, 3\]\)"):
        beam_search(dec, 2, max_len=torch.tensor([3, 3, 3]), bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="at least 1"):
        greedy_search(dec, 2, max_len=0, bos_id=BOS, eos_id=EOS)


@pytest.mark.parametrize("beam", [1, 4])
def test_limit_past_max_seq_len_still_ends(beam):
    """A limit beyond max_seq_len is cut to max_seq_len - 1 for the loop and the forced end
    alike: with an EOS that is never chosen, every sentence ends there, not empty."""
    torch.manual_seed(0)
    m = Seq2SeqTransformer(vocab_size=50, embed_dim=32, encoder_depth=1, decoder_depth=1,
                           num_heads=4, mlp_hidden_dim=64, drop=0.0, max_seq_len=8,
                           tie_embeddings=False).eval()
    bias = torch.zeros(50)
    bias[m.eos_id] = -1e4
    m.lm_head.bias = nn.Parameter(bias)
    src = torch.randint(4, 50, (3, 6))
    src[1, 3:] = 0
    # limits ceil(1.0 * length) + 2: 8, 5, 8; the model fits 7 tokens after BOS.
    kw = dict(max_len_a=1.0, max_len_b=2)
    hyps = m.beam_search(src, beam_size=beam, **kw)
    assert [len(h) for h in hyps] == [7, 5, 7]
    assert m.eos_id not in sum(hyps, [])
    if beam == 1:
        assert m.greedy(src, **kw) == hyps
