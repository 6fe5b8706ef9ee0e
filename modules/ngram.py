"""A character n-gram language model with interpolated Kneser-Ney smoothing (Chen and
Goodman, 1998, "An Empirical Study of Smoothing Techniques for Language Modeling"), for
shallow fusion into the CTC beam search (``modules.ctc.LMFusion``).

The highest order counts n-grams; every lower order counts continuations (how many distinct
characters precede a gram), and each order hands a fixed discount of every seen count to
the order below, down to a uniform distribution over the characters. Sentences are padded
with ``order - 1`` start symbols and closed with ``END``, so the model also says how likely
a text is to end where it does. Pure Python: meant for transcripts of up to a few million
characters (8-grams over half a million characters take about 3 s and 250 MB).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

START, END = "\ue000", "\ue001"   # private-use characters: no text or label spells them


class CharNgramLM:
    """``log_prob(context, char)``: log p(char | the last ``order - 1`` characters).

    Args:
        texts: the training text, one sentence each.
        order: n-gram order (1: unigram).
        discount: absolute discount in (0, 1) taken from every seen count.
        alphabet: characters to give probability beside those of ``texts`` (the ones a
            decoder can produce), so that ``prob`` sums to 1 over all of them.
    """

    CACHE_LIMIT = 1_000_000  # probabilities kept for reuse; the cache empties when full

    def __init__(self, texts: Iterable[str], *, order: int = 8, discount: float = 0.75,
                 alphabet: Iterable[str] = ()):
        if order < 1:
            raise ValueError(f"order={order}; expected at least 1")
        if not 0 < discount < 1:
            raise ValueError(f"discount={discount}; expected a value in (0, 1)")
        self.order, self.discount = order, discount
        grams, self.sentences, self.characters = Counter(), 0, 0
        for text in texts:
            if START in text or END in text:
                raise ValueError("the text holds the start or end symbol")
            self.sentences += 1
            self.characters += len(text)
            s = START * (order - 1) + text + END
            for i in range(order - 1, len(s)):
                grams[s[i - order + 1:i + 1]] += 1
        if not grams:
            raise ValueError("no text to count")
        # counts[k]: k-gram -> count (the highest order) or continuation count (lower ones)
        self.counts: list[Counter] = [Counter() for _ in range(order + 1)]
        self.counts[order] = grams
        for k in range(order, 1, -1):
            for g in self.counts[k]:
                self.counts[k - 1][g[1:]] += 1
        # per history: the total of its counts and how many distinct characters follow it
        self.totals: list[Counter] = [Counter() for _ in range(order + 1)]
        self.types: list[Counter] = [Counter() for _ in range(order + 1)]
        for k in range(1, order + 1):
            for g, c in self.counts[k].items():
                self.totals[k][g[:-1]] += c
                self.types[k][g[:-1]] += 1
        self.vocab = sorted({g for g in self.counts[1] if g != START} | set(alphabet))
        self._cache: dict[tuple[str, str], float] = {}

    def prob(self, context: str, char: str) -> float:
        """p(char | context); ``char`` may be ``END``. Sums to 1 over ``vocab``."""
        n = self.order - 1
        context = (START * n + context[-n:])[-n:] if n else ""
        key = (context, char)
        p = self._cache.get(key)
        if p is not None:
            return p
        if len(self._cache) >= self.CACHE_LIMIT:
            self._cache.clear()
        p = 1.0 / len(self.vocab)
        for k in range(1, self.order + 1):
            history = context[len(context) - k + 1:] if k > 1 else ""
            total = self.totals[k][history]
            if total:
                count = self.counts[k][history + char]
                p = (max(count - self.discount, 0.0)
                     + self.discount * self.types[k][history] * p) / total
        self._cache[key] = p
        return p

    def log_prob(self, context: str, char: str) -> float:
        return math.log(self.prob(context, char))

    def text_log_prob(self, text: str) -> float:
        """log p(text, then the end of the sentence)."""
        return sum(self.log_prob(text[:i], c) for i, c in enumerate(text + END))
