"""Flash-attn numerics across head dims on a GPU: relative error of the output and of the
q, k, v gradients against the float64 math reference, next to torch SDPA's error in the same
precision; and whether torch SDPA itself returns zeros for a query with no allowed key.

    python scripts/flash_check.py --head-dims 32 48 64 80 96 128 192 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from modules.attention import attend, attend_math  # noqa: E402


def errors(case, dtype):
    Lq, Lk, causal, H, Hk, D, padding = case
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, h, n, D, device="cuda", dtype=dtype, generator=gen)
               for h, n in ((H, Lq), (Hk, Lk), (Hk, Lk)))
    g = torch.randn(2, H, Lq, D, device="cuda", dtype=dtype, generator=gen)
    mask = None
    if padding:
        mask = torch.ones(2, Lk, dtype=torch.bool, device="cuda")
        mask[1, Lk // 3:] = False

    def run(fn, dt, **kw):
        ins = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out = fn(*ins, mask=mask, causal=causal, **kw)
        return (out, *torch.autograd.grad(out, ins, g.to(dt)))

    ref = run(attend_math, torch.float64)
    res = {}
    for name, kw in (("flash", {"backend": "flash"}), ("sdpa", {"backend": "sdpa"})):
        try:
            got = run(attend, dtype, **kw)
            res[name] = [((a.double() - r).norm() / r.norm()).item() for a, r in zip(got, ref)]
        except Exception as exc:  # report and go on: this is a survey
            res[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return res


def sdpa_empty_rows(dtype):
    """torch SDPA called directly with a sequence that is all padding: zeros and finite
    gradients, or not?"""
    out = {}
    for Lk in (128, 1000):
        q = torch.randn(2, 8, Lk, 64, device="cuda", dtype=dtype, requires_grad=True)
        k, v = torch.randn_like(q, requires_grad=True), torch.randn_like(q, requires_grad=True)
        m = torch.ones(2, Lk, dtype=torch.bool, device="cuda")
        m[1] = False
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, None, :])
        o.sum().backward()
        out[Lk] = dict(zero_rows=bool(o[1].abs().max() == 0), finite=bool(o.isfinite().all()),
                       finite_grads=all(bool(t.grad.isfinite().all()) for t in (q, k, v)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", type=int, nargs="+", default=[32, 48, 64, 80, 96, 128, 256])
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    dt = getattr(torch, args.dtype)
    print("torch SDPA, a sequence of only padding:", sdpa_empty_rows(dt), flush=True)
    print(f"# {torch.cuda.get_device_name()}, {args.dtype}; relative errors vs float64 math "
          f"(out, dq, dk, dv)")
    for D in args.head_dims:
        for case in ((200, 200, False, 8, 2, D, False), (150, 150, True, 4, 4, D, False),
                     (130, 130, False, 4, 2, D, True)):
            res = errors(case, dt)
            line = " ".join(f"{x:.1e}" for x in res["sdpa"]) if isinstance(res["sdpa"], list) \
                else res["sdpa"]
            fl = " ".join(f"{x:.1e}" for x in res["flash"]) if isinstance(res["flash"], list) \
                else res["flash"]
            print(f"D={D:3d} Lq={case[0]} Lk={case[1]} causal={case[2]!s:5} heads={case[3]}:"
                  f"{case[4]} padding={case[6]!s:5} | flash {fl} | sdpa {line}", flush=True)


if __name__ == "__main__":
    main()
