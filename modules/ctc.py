"""Decoding CTC outputs (Graves et al., 2006): greedy (best path) and prefix beam search.

The blank is id 0. A label sequence's probability sums over every frame path that
collapses to it (repeats merged, blanks removed); greedy decoding takes the single best
path, prefix beam search keeps the ``beam_size`` most probable label prefixes, each with
its probability of ending in a blank and in a non-blank (Hannun et al., 2014, "First-Pass
Large Vocabulary Continuous Speech Recognition using Bi-Directional Recurrent DNNs"),
optionally with a character language model's score fused into every prefix's (``LMFusion``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ngram import END

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


class LMFusion:
    """Shallow fusion of a character language model into the prefix beam search: a prefix
    scores ``log p_ctc + weight * log p_lm(text) + bonus * characters`` (Hannun et al.,
    2014, with the bonus per character rather than per word), and a finished text adds
    ``weight * log p_lm(end | text)``. Labels whose text is empty (control symbols) are not
    extended: they would earn nothing from the language model's view.

    Args:
        lm: a character model with ``log_prob(context, char)`` (``modules.ngram``).
        pieces: the text each label id stands for (the blank's is unused), such that a
            label sequence's text is its pieces joined.
        weight: the language model's weight.
        bonus: added per character, against the language model's pull towards short texts.
    """

    def __init__(self, lm, pieces: list[str], *, weight: float = 0.8, bonus: float = 2.0):
        self.lm, self.pieces, self.weight, self.bonus = lm, pieces, weight, bonus

    def extend(self, text: str, label: int) -> tuple[str, float]:
        """The text with ``label``'s piece added, and the score that adds."""
        score = 0.0
        for c in self.pieces[label]:
            score += self.lm.log_prob(text, c)
            text += c
        return text, self.weight * score + self.bonus * len(self.pieces[label])

    def finish(self, text: str) -> float:
        return self.weight * self.lm.log_prob(text, END)


def prefix_beam_search(log_probs_LV: Tensor, *, beam_size: int = 8, prune: float = -12.0,
                       lm: LMFusion | None = None) -> list[int]:
    """The most probable label sequence of one utterance under a beam.

    Args:
        log_probs_LV: ``(L, V)`` log-softmax outputs of the kept frames.
        beam_size: prefixes kept after every frame.
        prune: symbols whose frame log-probability is below this are not extended
            (the blank and the best symbol always are).
        lm: a language model fused into the prefixes' scores; None: CTC alone.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size}; expected at least 1")
    lp = log_probs_LV.float().tolist()
    # prefix -> [log p ending in blank, log p ending in its last symbol, text, LM score]
    beams: dict[tuple[int, ...], list] = {(): [0.0, -math.inf, "", 0.0]}
    for frame in lp:
        best_sym = max(range(len(frame)), key=frame.__getitem__)
        symbols = [s for s, v in enumerate(frame) if v >= prune or s in (BLANK, best_sym)]
        if lm is not None:
            symbols = [s for s in symbols if s == BLANK or lm.pieces[s]]
        nxt: dict[tuple[int, ...], list] = {}

        def add(prefix, parent, label=None, blank=-math.inf, nonblank=-math.inf, into=nxt):
            cur = into.get(prefix)
            if cur is None:
                text, lm_score = parent[2], parent[3]
                if label is not None and lm is not None:
                    text, extra = lm.extend(text, label)
                    lm_score += extra
                into[prefix] = [blank, nonblank, text, lm_score]
            else:
                cur[0], cur[1] = _logadd(cur[0], blank), _logadd(cur[1], nonblank)

        for prefix, beam in beams.items():
            p_b, p_nb = beam[0], beam[1]
            total = _logadd(p_b, p_nb)
            for s in symbols:
                p = frame[s]
                if s == BLANK:
                    add(prefix, beam, blank=total + p)
                elif prefix and prefix[-1] == s:
                    add(prefix, beam, nonblank=p_nb + p)         # repeat merged into the label
                    add(prefix + (s,), beam, s, nonblank=p_b + p)  # a blank separated the repeat
                else:
                    add(prefix + (s,), beam, s, nonblank=total + p)
        ranked = sorted(nxt.items(), key=lambda kv: _logadd(kv[1][0], kv[1][1]) + kv[1][3],
                        reverse=True)
        beams = dict(ranked[:beam_size])

    def final(kv):
        (_, (p_b, p_nb, text, lm_score)) = kv
        return _logadd(p_b, p_nb) + lm_score + (lm.finish(text) if lm is not None else 0.0)

    return list(max(beams.items(), key=final)[0])


def beam_decode(log_probs_BLV: Tensor, lengths_B: Tensor, *, beam_size: int = 8,
                lm: LMFusion | None = None) -> list[list[int]]:
    """``prefix_beam_search`` for every utterance of a batch."""
    return [prefix_beam_search(lp[:n], beam_size=beam_size, lm=lm)
            for lp, n in zip(log_probs_BLV, lengths_B.tolist())]


def sequence_log_prob(log_probs_LV: Tensor, labels: list[int]) -> float:
    """log p(labels | x), summed over all CTC paths (torch's CTC loss, negated)."""
    loss = torch.nn.functional.ctc_loss(
        log_probs_LV.double().unsqueeze(1), torch.tensor([labels], dtype=torch.long),
        torch.tensor([log_probs_LV.shape[0]]), torch.tensor([len(labels)]), blank=BLANK,
        reduction="sum", zero_infinity=False)
    return -float(loss)
