"""Where the time of a key-padding-mask attention call goes on a GPU: host time to enqueue a
call, GPU kernel time per call (torch.profiler) and back-to-back time per call, for torch
SDPA called directly, ``attend`` (which also zeroes the rows of all-padding sequences), and
the same zeroing done on V instead of the output. If host time exceeds kernel time, a call
is launch-bound and the extra work of a variant is its launches, not its kernels.

    python scripts/profile_padding.py --lengths 1024 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from modules.attention import attend  # noqa: E402


def direct(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])


def ours(q, k, v, mask):
    return attend(q, k, v, mask=mask, backend="sdpa")


def zero_v(q, k, v, mask):
    """All-padding sequences attend to every key of a zeroed V: output and gradients 0."""
    keep = mask.any(-1)[:, None, None, None]
    m = mask[:, None, None, :] | ~keep
    return F.scaled_dot_product_attention(q, k, v * keep, attn_mask=m)


VARIANTS = {"sdpa direct": direct, "attend": ours, "zero V": zero_v}


def run(fn, ins, backward, n):
    q, k, v, mask = ins
    for _ in range(n):
        out = fn(q, k, v, mask)
        if backward:
            out.backward(torch.ones_like(out))
            q.grad = k.grad = v.grad = None


def measure(fn, ins, backward, n=50, repeats=5):
    run(fn, ins, backward, 5)
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(fn, ins, backward, n)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append((t1 - t0) / n)
        wall.append((time.perf_counter() - t0) / n)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(fn, ins, backward, n)
        torch.cuda.synchronize()
    kernels = sum(e.device_time_total for e in prof.key_averages()) / n  # microseconds
    return statistics.median(host) * 1e6, kernels, statistics.median(wall) * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args()
    print(f"# {torch.cuda.get_device_name()}, bf16, 8 heads, head dim 64, batch = "
          f"{args.tokens} / L, the last eighth of every sequence padded")
    print(f"{'L':>6} {'pass':8} {'variant':12} {'host us':>8} {'kernels us':>10} "
          f"{'per call us':>11} {'vs direct':>9}")
    for L in args.lengths:
        B = max(1, args.tokens // L)
        q, k, v = (torch.randn(B, 8, L, 64, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        mask = torch.ones(B, L, dtype=torch.bool, device="cuda")
        mask[:, L - L // 8:] = False
        for backward in (False, True):
            res = {n: measure(f, (q, k, v, mask), backward) for n, f in VARIANTS.items()}
            base = res["sdpa direct"][2]
            for n, (host, kern, wall) in res.items():
                print(f"{L:6d} {'fwd+bwd' if backward else 'fwd':8} {n:12} {host:8.1f} "
                      f"{kern:10.1f} {wall:11.1f} {base / wall:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
