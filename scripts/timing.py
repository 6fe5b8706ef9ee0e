"""Side-by-side timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function over ``repeats`` rounds. The order rotates every
    round (A B C, B C A, C A B, ...), so drift of the machine hits all variants alike and no
    variant always runs right after the same other one. Each function must finish its own
    work (synchronise the GPU) before returning."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        k = rep % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


@dataclass
class Timing:
    """Seconds per call of each variant (``times``) and their medians."""

    times: dict[str, list[float]]

    @property
    def median(self) -> dict[str, float]:
        return {n: statistics.median(t) for n, t in self.times.items()}

    def spread(self, name: str) -> float:
        """(slowest - fastest) / median of one variant."""
        t = self.times[name]
        return (max(t) - min(t)) / statistics.median(t)

    def paired(self, peer: str, name: str) -> tuple[float, float, float]:
        """Quartiles (25%, median, 75%) of the per-repeat ratios peer time / ``name`` time:
        the two ran back to back in each repeat, so drift of the machine cancels out."""
        ratios = sorted(a / b for a, b in zip(self.times[peer], self.times[name]))
        if len(ratios) < 3:  # the default (exclusive) quartiles of two points extrapolate
            # past them, even below zero; of one point there are none
            return ratios[0], statistics.median(ratios), ratios[-1]
        q1, q2, q3 = statistics.quantiles(ratios, n=4)
        return q1, q2, q3


def side_by_side(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> Timing:
    """Warm every function up ``warmup`` times, then time them ``interleaved``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    return Timing(interleaved(fns, repeats))
