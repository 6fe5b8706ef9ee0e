"""ViT speed: our VisionTransformer vs timm's VisionTransformer of identical shape, training
and inference images/s measured side by side in one process (see the README's table).

    python scripts/bench_vit.py                                 # CPU fp32, ViT-Ti/16 at 224
    python scripts/bench_vit.py --img-size 28 --patch 4 --in-chans 1 --embed-dim 128 --depth 4
    python scripts/bench_vit.py --device cuda --dtype bfloat16 --batch 256
    python scripts/bench_vit.py --compile        # adds both models under torch.compile

With --compile, training compiles the forward together with the loss (as the vit task's
``compile=true`` does) and inference compiles the forward; ratios stay relative to timm in
eager mode, and the paired column compares each compiled model with the other.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from modules.vit import VisionTransformer  # noqa: E402
from scripts.timing import side_by_side  # noqa: E402


def train_step(m, x, y, autocast, compiled=False):
    """One AdamW step; with ``compiled``, forward and loss run as one compiled graph."""
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

    def forward_loss(x, y):
        return F.cross_entropy(m(x).float(), y)
    loss_fn = torch.compile(forward_loss) if compiled else forward_loss

    def step():
        with torch.autocast(**autocast):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
    return step


def infer_step(m, x, y, autocast, compiled=False):
    fwd = torch.compile(m) if compiled else m

    @torch.no_grad()
    def step():
        with torch.autocast(**autocast):
            fwd(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    return step


def report(label, steps, args):
    """Time the steps interleaved and print one row each: median, spread, images/s, ratio
    to timm eager, and the paired ratio (timm's time / ours for the two steps run back to
    back in each repeat, so drift of the machine cancels out; compiled models are paired
    with each other)."""
    timing = side_by_side(steps, args.repeats, args.warmup)
    med = timing.median
    for n in steps:
        peer = "timm+compile" if n.endswith("+compile") else "timm"
        q1, q2, q3 = timing.paired(peer, n)
        print(f"{label:10} {n:15} {med[n] * 1e3:8.1f} {100 * timing.spread(n):6.0f}% "
              f"{args.batch / med[n]:9.1f} {med['timm'] / med[n]:7.2f}x"
              f"  {q2:18.3f}x [{q1:.3f}, {q3:.3f}]", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--pool", default="token", choices=["token", "mean"],
                   help="class token (timm's default) or the mean of the patch tokens")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--compile", action="store_true", help="add torch.compile'd variants")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import timm

    shape = dict(img_size=args.img_size, patch_size=args.patch, in_chans=args.in_chans,
                 num_classes=args.classes, embed_dim=args.embed_dim, depth=args.depth,
                 num_heads=args.heads, mlp_ratio=args.mlp_ratio)
    # Mean pooling in timm: no class token, and the final norm before pooling (no fc_norm),
    # which is our layout.
    peer = (dict(global_pool="token") if args.pool == "token" else
            dict(global_pool="avg", class_token=False, fc_norm=False))
    models = {"attnkit": VisionTransformer(pool=args.pool, **shape),
              "timm": timm.models.vision_transformer.VisionTransformer(**peer, **shape)}
    dt = getattr(torch, args.dtype)
    dev = args.device
    x = torch.randn(args.batch, args.in_chans, args.img_size, args.img_size, device=dev)
    y = torch.randint(0, args.classes, (args.batch,), device=dev)
    ac = dict(device_type="cuda" if dev == "cuda" else "cpu", dtype=dt,
              enabled=dt != torch.float32)

    name = torch.cuda.get_device_name() if dev == "cuda" else \
        f"CPU {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads"
    n_params = sum(p.numel() for p in models["attnkit"].parameters())
    print(f"# torch {torch.__version__}; {name}; {args.dtype}; img {args.img_size}, patch "
          f"{args.patch}, d{args.embed_dim} x {args.depth}, heads {args.heads}, {args.pool} "
          f"pooling, batch "
          f"{args.batch}; {n_params / 1e6:.2f}M params")
    print(f"{'pass':10} {'model':15} {'ms':>8} {'spread':>7} {'images/s':>9} {'vs timm':>8}"
          f"  {'paired ratio: median [25%, 75%]':>32}")
    for label, make, train in (("train", train_step, True), ("inference", infer_step, False)):
        steps = {}
        for n, m in models.items():
            m.to(dev).train(train)
            steps[n] = make(m, x, y, ac)
            if args.compile:
                steps[f"{n}+compile"] = make(m, x, y, ac, compiled=True)
        report(label, steps, args)


if __name__ == "__main__":
    main()
