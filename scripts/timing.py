"""Side-by-side timing shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable


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
