"""Attention speed and memory: ``attend`` vs torch SDPA called directly vs naive
softmax(QK^T)V, measured side by side in one process (see the README's table).

    python scripts/bench_attention.py                       # CPU, fp32
    python scripts/bench_attention.py --device cuda --dtype bfloat16 --lengths 1024 4096 16384

Variants are interleaved (A B C, B C A, C A B, ...), medians over --repeats after warm-up, and
ratios are taken within the run. On a GPU a sample is enough back-to-back calls for about
20 ms with one synchronisation at the end (launches overlap kernels, as in training); on the
CPU a sample is one call. Where the flash-attn package is installed, the explicit backend that
auto did not pick is timed too ("attend[flash]" or "attend[sdpa]"). Peak memory: each
(variant, case) in a fresh subprocess (CPU: peak RSS above an idle process; CUDA: max
allocated).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from modules.attention import (  # noqa: E402
    attend,
    attention_flops,
    flash_unsupported_reason,
    resolve_backend,
)
from scripts.timing import interleaved  # noqa: E402

CASES = {  # name: (causal, key padding, kv heads divisor)
    "plain": (False, False, 1),
    "causal": (True, False, 1),
    "padding": (False, True, 1),
    "gqa4": (True, False, 4),
}


def naive(q, k, v, mask, causal):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    if causal:
        L = q.shape[2]
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(),
                          float("-inf"))
    return s.softmax(-1) @ v


def direct_sdpa(q, k, v, mask, causal):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if mask is None else mask[:, None, None, :],
        is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def ours(q, k, v, mask, causal):
    return attend(q, k, v, mask=mask, causal=causal, backend="auto")


def ours_sdpa(q, k, v, mask, causal):
    return attend(q, k, v, mask=mask, causal=causal, backend="sdpa")


def ours_flash(q, k, v, mask, causal):
    return attend(q, k, v, mask=mask, causal=causal, backend="flash")


VARIANTS = {"attend": ours, "attend[sdpa]": ours_sdpa, "attend[flash]": ours_flash,
            "sdpa": direct_sdpa, "naive": naive}


def make_inputs(case, L, batch, heads, head_dim, device, dtype, grad):
    causal, padding, div = CASES[case]
    q = torch.randn(batch, heads, L, head_dim, device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(batch, heads // div, L, head_dim, device=device, dtype=dtype,
                    requires_grad=grad)
    v = torch.randn_like(k, requires_grad=grad)
    mask = None
    if padding:
        mask = torch.ones(batch, L, dtype=torch.bool, device=device)
        mask[:, L - L // 8:] = False  # the last eighth of every sequence is padding
    return q, k, v, mask, causal


def run_once(fn, inputs, backward, n=1):
    """n calls back to back, then one GPU synchronisation: on a GPU the launches of the next
    call overlap the kernels of the last, as in training, so a sample measures throughput."""
    q, k, v, mask, causal = inputs
    for _ in range(n):
        out = fn(q, k, v, mask, causal)
        if backward:
            out.backward(torch.ones_like(out))
            for t in (q, k, v):
                t.grad = None
    if q.is_cuda:
        torch.cuda.synchronize()


def calls_per_sample(fn, inputs, backward) -> int:
    """1 on the CPU; on a GPU enough calls for a sample of about 20 ms."""
    if not inputs[0].is_cuda:
        return 1
    t0 = time.perf_counter()
    run_once(fn, inputs, backward, 3)
    return max(1, min(500, round(0.02 / ((time.perf_counter() - t0) / 3))))


def naive_fits(L, batch, heads, device) -> bool:
    # the naive path materialises (B, H, L, L) scores and probabilities, several times
    bytes_needed = 4 * batch * heads * L * L * 4
    limit = 6e9 if device == "cpu" else 40e9
    return bytes_needed < limit


def time_case(case, L, args, backward):
    batch = max(1, args.tokens // L)
    inputs = make_inputs(case, L, batch, args.heads, args.head_dim, args.device,
                         getattr(torch, args.dtype), backward)
    names = [n for n in VARIANTS if n != "naive" or naive_fits(L, batch, args.heads, args.device)]
    auto = resolve_backend("auto", inputs[0], inputs[3], inputs[4], kv_len=L,
                           needs_grad=backward)
    # The explicit variant that auto did not pick, where it can run: the wrapper alone over
    # SDPA when auto picks flash, the flash kernels when auto keeps SDPA.
    if auto == "sdpa":
        names.remove("attend[sdpa]")
    if auto == "flash" or flash_unsupported_reason(inputs[0], inputs[3], inputs[4], 0.0):
        names.remove("attend[flash]")
    for n in names:
        for _ in range(args.warmup):
            run_once(VARIANTS[n], inputs, backward)
    n_calls = calls_per_sample(VARIANTS["sdpa"], inputs, backward)
    times = interleaved({n: functools.partial(run_once, VARIANTS[n], inputs, backward, n_calls)
                         for n in names}, args.repeats)
    times = {n: [t / n_calls for t in ts] for n, ts in times.items()}
    causal, _, div = CASES[case]
    flops = attention_flops(batch, args.heads, L, L, args.head_dim, causal=causal,
                            backward=backward)
    kernel = resolve_backend("auto", inputs[0], inputs[3], causal, kv_len=L,
                             needs_grad=backward)
    rows = []
    for n in names:
        med = statistics.median(times[n])
        spread = (max(times[n]) - min(times[n])) / med
        rows.append(dict(case=case, L=L, batch=batch, pass_="fwd+bwd" if backward else "fwd",
                         variant=n, ms=med * 1e3, spread=spread, gflops=flops / med / 1e9,
                         kernel=kernel if n == "attend" else ""))
    base = {r["variant"]: r["ms"] for r in rows}
    for r in rows:
        r["vs_sdpa"] = base["sdpa"] / r["ms"]
        r["vs_naive"] = base["naive"] / r["ms"] if "naive" in base else float("nan")
    return rows


def peak_rss() -> int:
    """Peak resident set of this process in bytes. VmHWM belongs to the address space made
    at exec, unlike ru_maxrss, which a child started by a large parent inherits."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(args):
    """Runs in a fresh process: one variant, one case, fwd+bwd; prints peak bytes."""
    dtype = getattr(torch, args.dtype)
    L = args.child_len
    inputs = make_inputs(args.child_case, L, 1, args.heads, args.head_dim, args.device, dtype,
                         True)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    run_once(VARIANTS[args.child_variant], inputs, True)
    if args.device == "cuda":
        print(torch.cuda.max_memory_allocated() - base)
    else:
        print(peak_rss())


def peak_memory(variant, case, L, args) -> float:
    cmd = [sys.executable, __file__, "--child-variant", variant, "--child-case", case,
           "--child-len", str(L), "--device", args.device, "--dtype", args.dtype,
           "--heads", str(args.heads), "--head-dim", str(args.head_dim)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return float("nan")
    peak = float(out.stdout.strip().splitlines()[-1])
    if args.device == "cpu":
        idle = subprocess.run(cmd + ["--child-idle"], capture_output=True, text=True)
        peak -= float(idle.stdout.strip())
    return peak / 2**20


def matmul_peak(device, dtype, n=None, reps=20) -> float:
    n = n or (8192 if device == "cuda" else 2048)  # a GPU needs a large product to fill
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--memory-lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--tokens", type=int, default=4096, help="batch = max(1, tokens // L)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child-variant")
    p.add_argument("--child-case")
    p.add_argument("--child-len", type=int)
    p.add_argument("--child-idle", action="store_true", help="measure an idle process")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_idle:
        return print(peak_rss())
    if args.child_variant:
        return memory_child(args)

    dev = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"CPU {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads"
    peak = matmul_peak(args.device, getattr(torch, args.dtype))
    print(f"# torch {torch.__version__}; {dev}; {args.dtype}; heads {args.heads}, head_dim "
          f"{args.head_dim}; matmul peak {peak:.0f} GFLOP/s")
    rows = []
    print(f"{'case':8} {'pass':8} {'L':>6} {'B':>3} {'variant':12} {'kernel':7} {'ms':>9} "
          f"{'spread':>6} {'GFLOP/s':>8} {'%peak':>6} {'vs sdpa':>8} {'vs naive':>8}")
    for backward in (False, True):
        for case in args.cases:
            for L in args.lengths:
                for r in time_case(case, L, args, backward):
                    r["pct_peak"] = 100 * r["gflops"] / peak
                    rows.append(r)
                    print(f"{r['case']:8} {r['pass_']:8} {r['L']:6d} {r['batch']:3d} "
                          f"{r['variant']:12} {r['kernel']:7} {r['ms']:9.2f} "
                          f"{100 * r['spread']:5.0f}% {r['gflops']:8.1f} {r['pct_peak']:5.1f}% "
                          f"{r['vs_sdpa']:7.2f}x {r['vs_naive']:7.2f}x", flush=True)
    print("\n# peak memory, fwd+bwd, batch 1 (MiB above an idle process)")
    probe = make_inputs("plain", 128, 1, args.heads, args.head_dim, args.device,
                        getattr(torch, args.dtype), False)
    variants = ["attend", "sdpa", "naive"]
    if not flash_unsupported_reason(probe[0], None, False, 0.0):
        variants.insert(1, "attend[flash]" if resolve_backend("auto", probe[0]) == "sdpa"
                        else "attend[sdpa]")
    print(f"{'case':8} {'L':>6} " + " ".join(f"{n:>12}" for n in variants))
    mem = []
    for case in [c for c in ("plain", "padding") if c in args.cases] or ["plain"]:
        for L in args.memory_lengths:
            vals = {n: (peak_memory(n, case, L, args)
                        if n != "naive" or naive_fits(L, 1, args.heads, args.device)
                        else float("nan")) for n in variants}
            mem.append(dict(case=case, L=L, **vals))
            print(f"{case:8} {L:6d} " + " ".join(f"{vals[n]:12.0f}" for n in variants),
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": dev, "matmul_gflops": peak, "timing": rows,
                                         "memory": mem}, indent=1))


if __name__ == "__main__":
    main()
