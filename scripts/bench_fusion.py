"""Text-image dual encoder speed: our TextImageModel (fusion_depth=0, OpenCLIP's layout)
against ``open_clip.CLIP`` of the same shape on the same weights (converted with
``modules.converters.clip_state_dict_from_open_clip``), measured side by side in one process.

    python scripts/bench_fusion.py                      # CPU fp32, the fusion task's emoji shape
    python scripts/bench_fusion.py --shape b32          # ViT-B/32 at 224 px, batch 32
    python scripts/bench_fusion.py --profile            # and where one training step's time goes
    python scripts/bench_fusion.py --device cuda --dtype bfloat16 --batch 512

Passes: a contrastive training step (both towers forward, CLIP loss over the batch,
backward, AdamW step), then embedding throughput of each tower in inference mode. Texts are
padded after an end-of-text token (the highest id) to the context length, as OpenCLIP's
tokenizer does; both models encode every position. GFLOP/s count the matmuls (2 * params
per token forward, x3 for training) plus attention (4 * L * E per token per layer forward,
halved for the causal text tower, x3.5 for training).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from modules.converters import (  # noqa: E402
    clip_kwargs_from_open_clip,
    clip_state_dict_from_open_clip,
    open_clip_text_mask,
)
from modules.fusion import TextImageModel, contrastive_loss  # noqa: E402
from scripts.bench_attention import matmul_peak  # noqa: E402
from scripts.timing import side_by_side  # noqa: E402

# embed_dim, batch, vision (img, patch, width, depth, heads, mlp), text (ctx, vocab, width,
# depth, heads, mlp). "emoji" is conf/model/fusion_cpu.yaml's size with OpenCLIP's text
# tower (causal, end-of-text pooling) and class-token pooling.
SHAPES = {
    "emoji": dict(embed_dim=128, batch=128, vision=(40, 8, 128, 4, 4, 2.0),
                  text=(24, 1000, 128, 3, 4, 2.0)),
    "b32": dict(embed_dim=512, batch=32, vision=(224, 32, 768, 12, 12, 4.0),
                text=(77, 49408, 512, 12, 8, 4.0)),
}


def build(shape: dict):
    """An ``open_clip.CLIP`` with GELU and our model loaded with its weights."""
    import open_clip

    img, patch, width, depth, heads, mlp = shape["vision"]
    ctx, vocab, t_width, t_depth, t_heads, t_mlp = shape["text"]
    peer = open_clip.CLIP(
        embed_dim=shape["embed_dim"],
        vision_cfg=open_clip.CLIPVisionCfg(layers=depth, width=width, head_width=width // heads,
                                           mlp_ratio=mlp, patch_size=patch, image_size=img),
        text_cfg=open_clip.CLIPTextCfg(context_length=ctx, vocab_size=vocab, width=t_width,
                                       heads=t_heads, layers=t_depth, mlp_ratio=t_mlp),
        quick_gelu=False)
    state = peer.state_dict()
    heads_kw = dict(vision_heads=heads, text_heads=t_heads)
    ours = TextImageModel(**clip_kwargs_from_open_clip(state, **heads_kw))
    ours.load_state_dict(clip_state_dict_from_open_clip(state, **heads_kw), strict=True)
    return {"open_clip": peer, "attnkit": ours}


def inputs(shape: dict, batch: int, device: str):
    g = torch.Generator().manual_seed(0)
    img = shape["vision"][0]
    ctx, vocab = shape["text"][:2]
    images = torch.randn(batch, 3, img, img, generator=g)
    ids = torch.randint(1, vocab - 1, (batch, ctx), generator=g)
    lengths = torch.randint(max(2, ctx // 4), ctx + 1, (batch,), generator=g)
    for row, n in enumerate(lengths.tolist()):
        ids[row, n - 1], ids[row, n:] = vocab - 1, 0
    return images.to(device), ids.to(device)


def embed(name: str, model, images, ids):
    if name == "open_clip":
        return model.encode_image(images, normalize=True), model.encode_text(ids, normalize=True)
    return model.encode_image(images)[0], model.encode_text(ids, open_clip_text_mask(ids))[0]


def train_step(name, model, images, ids, autocast):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast(**autocast):
            img, txt = embed(name, model, images, ids)
            logits = model.logit_scale.exp() * img.float() @ txt.float().T
        contrastive_loss(logits, "clip").backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if images.is_cuda:
            torch.cuda.synchronize()
    return step


def embed_step(name, model, images, ids, autocast, tower: str):
    def step():
        with torch.inference_mode(), torch.autocast(**autocast):
            if tower == "image":
                model.encode_image(images)
            elif name == "open_clip":
                model.encode_text(ids)
            else:
                model.encode_text(ids, open_clip_text_mask(ids))
        if images.is_cuda:
            torch.cuda.synchronize()
    return step


def flops(model: TextImageModel, shape: dict, batch: int, tower: str, train: bool) -> float:
    """Matmul and attention FLOPs of one tower for a batch (PERF.md's conventions)."""
    module = model.visual if tower == "image" else model.text
    skip = ("pos_embed", "cls_token", "token_embed")
    n = sum(p.numel() for k, p in module.named_parameters()
            if p.dim() > 1 and not k.startswith(skip))
    n += (model.visual.head if tower == "image" else model.text_proj).weight.numel()
    if tower == "image":
        img, patch, width, depth = shape["vision"][:4]
        seq, causal = (img // patch) ** 2 + 1, False
    else:
        seq, _, width, depth = shape["text"][:4]
        causal = True
    tokens = batch * seq
    attn = depth * 4 * seq * width * tokens / (2 if causal else 1)
    return (6 * n * tokens + 3.5 * attn) if train else (2 * n * tokens + attn)


def report(label: str, steps: dict, items: int, gflop: float, peak: float, args) -> None:
    """Time the steps interleaved; one row each: median, spread, items/s, GFLOP/s, MFU,
    ratio of medians to open_clip and the paired ratio (open_clip's time / ours in the
    same repeat, median and quartiles over repeats, so drift of the machine cancels)."""
    timing = side_by_side(steps, args.repeats, args.warmup)
    med = timing.median
    for n in steps:
        q1, q2, q3 = timing.paired("open_clip", n)
        rate = gflop / med[n]
        print(f"{label:12} {n:10} {med[n] * 1e3:8.1f} {100 * timing.spread(n):6.0f}% "
              f"{items / med[n]:9.0f} {rate:8.1f} {100 * rate / peak:4.0f}% "
              f"{med['open_clip'] / med[n]:11.2f}x  {q2:17.3f}x [{q1:.3f}, {q3:.3f}]",
              flush=True)


def profile(step, device: str, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()  # warm
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        step()
    print("\n# attnkit, one training step: top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="emoji", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=None, help="default: the shape's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--profile", action="store_true",
                   help="also print the top ops of one training step of ours")
    args = p.parse_args()
    if args.repeats < 2:
        p.error(f"--repeats {args.repeats}: the spread and quartiles need at least 2")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = SHAPES[args.shape]
    batch = args.batch or shape["batch"]
    dev, dt = args.device, getattr(torch, args.dtype)
    models = {n: m.to(dev) for n, m in build(shape).items()}
    images, ids = inputs(shape, batch, dev)
    ac = dict(device_type="cuda" if dev == "cuda" else "cpu", dtype=dt,
              enabled=dt != torch.float32)
    name = torch.cuda.get_device_name() if dev == "cuda" else \
        f"CPU {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads"
    peak = matmul_peak(dev, dt)
    ours = models["attnkit"]
    v, t = shape["vision"], shape["text"]
    print(f"# torch {torch.__version__}; {name}; {args.dtype}; {args.shape}: image {v[0]} px, "
          f"patch {v[1]}, d{v[2]} x {v[3]}, heads {v[4]}; text ctx {t[0]}, d{t[2]} x {t[3]}, "
          f"heads {t[4]}; D {shape['embed_dim']}; batch {batch}; "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M params; "
          f"{args.dtype} matmul peak {peak:.0f} GFLOP/s")
    print(f"{'pass':12} {'model':10} {'ms':>8} {'spread':>7} {'items/s':>9} {'GFLOP/s':>8} "
          f"{'MFU':>5} {'vs open_clip':>12}  {'paired: median [25%, 75%]':>27}")
    for m in models.values():
        m.train()
    train_flop = sum(flops(ours, shape, batch, tw, True) for tw in ("image", "text"))
    report("train", {n: train_step(n, m, images, ids, ac) for n, m in models.items()},
           batch, train_flop / 1e9, peak, args)
    for m in models.values():
        m.eval()
    for tower in ("image", "text"):
        report(f"embed {tower}",
               {n: embed_step(n, m, images, ids, ac, tower) for n, m in models.items()},
               batch, flops(ours, shape, batch, tower, False) / 1e9, peak, args)
    if args.profile:
        ours.train()
        profile(train_step("attnkit", ours, images, ids, ac), dev)


if __name__ == "__main__":
    main()
