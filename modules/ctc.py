"""Decoding CTC outputs (Graves et al., 2006): greedy (best path) and prefix beam search.

The blank is id 0. A label sequence's probability sums over every frame path that
collapses to it (repeats merged, blanks removed); greedy decoding takes the single best
path, prefix beam search keeps the ``beam_size`` most probable label prefixes, each with
its probability of ending in a blank and in a non-blank (Hannun et al., 2014, "First-Pass
Large Vocabulary Continuous Speech Recognition using Bi-Directional Recurrent DNNs").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BLANK = 0


def greedy_decode(log_probs_BLV: Tensor, lengths_B: Tensor) -> list[list[int]]:
    """Best path per utterance: argmax per frame, repeats merged, blanks removed."""
    best = log_probs_BLV.argmax(-1).tolist()
    out = []
    for path, n in zip(best, lengths_B.tolist()):
        labels, prev = [], BLANK
        for s in path[:n]:
            if s != prev and s != BLANK:
                labels.append(s)
            prev = s
        out.append(labels)
    return out


def _logadd(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def prefix_beam_search(log_probs_LV: Tensor, *, beam_size: int = 8,
                       prune: float = -12.0) -> list[int]:
    """The most probable label sequence of one utterance under a beam.

    Args:
        log_probs_LV: ``(L, V)`` log-softmax outputs of the kept frames.
        beam_size: prefixes kept after every frame.
        prune: symbols whose frame log-probability is below this are not extended
            (the blank and the best symbol always are).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size}; expected at least 1")
    lp = log_probs_LV.float().tolist()
    # prefix -> (log p ending in blank, log p ending in its last symbol)
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, -math.inf)}
    for frame in lp:
        best_sym = max(range(len(frame)), key=frame.__getitem__)
        symbols = [s for s, v in enumerate(frame) if v >= prune or s in (BLANK, best_sym)]
        nxt: dict[tuple[int, ...], list[float]] = {}

        def add(prefix, blank=-math.inf, nonblank=-math.inf, into=nxt):
            cur = into.setdefault(prefix, [-math.inf, -math.inf])
            cur[0], cur[1] = _logadd(cur[0], blank), _logadd(cur[1], nonblank)

        for prefix, (p_b, p_nb) in beams.items():
            total = _logadd(p_b, p_nb)
            for s in symbols:
                p = frame[s]
                if s == BLANK:
                    add(prefix, blank=total + p)
                elif prefix and prefix[-1] == s:
                    add(prefix, nonblank=p_nb + p)          # repeat merged into the same label
                    add(prefix + (s,), nonblank=p_b + p)    # a blank separated the repeat
                else:
                    add(prefix + (s,), nonblank=total + p)
        ranked = sorted(nxt.items(), key=lambda kv: _logadd(*kv[1]), reverse=True)
        beams = {k: (v[0], v[1]) for k, v in ranked[:beam_size]}
    return list(max(beams.items(), key=lambda kv: _logadd(*kv[1]))[0])


def beam_decode(log_probs_BLV: Tensor, lengths_B: Tensor, *, beam_size: int = 8) -> list[list[int]]:
    """``prefix_beam_search`` for every utterance of a batch."""
    return [prefix_beam_search(lp[:n], beam_size=beam_size)
            for lp, n in zip(log_probs_BLV, lengths_B.tolist())]


def sequence_log_prob(log_probs_LV: Tensor, labels: list[int]) -> float:
    """log p(labels | x), summed over all CTC paths (torch's CTC loss, negated)."""
    loss = torch.nn.functional.ctc_loss(
        log_probs_LV.double().unsqueeze(1), torch.tensor([labels], dtype=torch.long),
        torch.tensor([log_probs_LV.shape[0]]), torch.tensor([len(labels)]), blank=BLANK,
        reduction="sum", zero_infinity=False)
    return -float(loss)
