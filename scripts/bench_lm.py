"""Language-model speed: our CausalLM vs transformers' LlamaForCausalLM of identical shape,
measured side by side in one process (see the README's table).

    python scripts/bench_lm.py            # CPU fp32, the transformer of the lm task's CPU default
    python scripts/bench_lm.py --compile  # adds torch.compile'd variants
    python scripts/bench_lm.py --embed-dim 384 --depth 6 --mlp 1024 --seq 256 --batch 8
    python scripts/bench_lm.py --device cuda --dtype bfloat16 --embed-dim 1024 --depth 16

The default shape is the lm task's CPU default transformer (d192, 4 layers, GQA 6:2, SwiGLU
512, context 128) at a vocabulary of 2048, without the default's QK norm, bigram table and
value embeddings, which Llama has no counterpart for.

Training: tokens/s and MFU (6N + 12 L H D T FLOPs per token, against the fp32/bf16 matmul
peak measured in the same run), both models with the same fused AdamW (the tasks' default),
steps interleaved; --compile adds both with forward + loss compiled. "attnkit, task loss"
is ours with the lm task's loss (``modules.losses.head_cross_entropy``: on the CPU the output
layer and cross entropy in slices of at most 2M logits).
Generation: new tokens/s with the KV cache at batch 1 and 8 vs ``generate()``: eager, and
compiled on both sides (ours: ``generate(compile=True)``, a compiled step over a static
cache; transformers: ``cache_implementation="static"`` with a compiled forward). First
calls, which compile, are timed separately and excluded.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from modules.generation import generate  # noqa: E402
from modules.lm import CausalLM  # noqa: E402
from modules.losses import head_cross_entropy  # noqa: E402
from scripts.bench_attention import matmul_peak  # noqa: E402
from scripts.timing import interleaved  # noqa: E402


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = dict(vocab_size=args.vocab, embed_dim=args.embed_dim, depth=args.depth,
              num_heads=args.heads, num_kv_heads=args.kv_heads, mlp_hidden_dim=args.mlp,
              max_seq_len=max(args.seq, 512), backend=args.attention)
    ours = CausalLM(**kw)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.embed_dim,
                      intermediate_size=args.mlp, num_hidden_layers=args.depth,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=max(args.seq, 512), rms_norm_eps=1e-5,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    hf = LlamaForCausalLM(cfg)
    dt = getattr(torch, args.dtype)
    return ours.to(args.device), hf.to(args.device), dt


def train_step_fn(model, opt, x, y, is_hf, autocast_dtype, device, compile=False,
                  sliced=False):
    def forward_loss(x, y):
        if sliced:  # the lm task's loss: the output layer and cross entropy in slices
            return head_cross_entropy(model(x, head=False), model.lm_head, y)
        logits = model(x).logits if is_hf else model(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    # As the lm task's compile=true does: forward and loss in one compiled graph.
    loss_fn = torch.compile(forward_loss) if compile else forward_loss

    def step():
        with torch.autocast(device_type="cuda" if device == "cuda" else "cpu",
                            dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    return step


def bench_train(args, ours, hf, dt):
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=args.device)
    x, y = x[:, :-1], x[:, 1:]
    variants = {"attnkit": (ours, False, False, False),
                "transformers": (hf, True, False, False),
                "attnkit, task loss": (ours, False, False, True)}
    if args.compile:
        variants["attnkit+compile"] = (ours, False, True, False)
        variants["transformers+compile"] = (hf, True, True, False)
    steps = {}
    for name, (m, is_hf, compile, sliced) in variants.items():
        if compile or sliced:  # its own copy of the weights and optimizer state
            m = copy.deepcopy(m)
        # The optimizer the tasks use (conf/optimizer/adamw.yaml), the same for both.
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1,
                                fused=not args.no_fused)
        steps[name] = train_step_fn(m, opt, x, y, is_hf, dt, args.device, compile, sliced)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            steps[name]()
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    times = interleaved(steps, args.repeats)
    n_params = sum(p.numel() for p in ours.parameters()) - ours.embed.weight.numel()
    head_dim = args.embed_dim // args.heads
    flops_tok = 6 * n_params + 12 * args.depth * args.heads * head_dim * args.seq
    tokens = args.batch * args.seq
    return {n: dict(ms=statistics.median(t) * 1e3,
                    spread=(max(t) - min(t)) / statistics.median(t),
                    # ratio of back-to-back steps, per repeat: machine drift cancels out
                    paired=statistics.median(a / b for a, b in zip(times["transformers"], t)),
                    tok_s=tokens / statistics.median(t),
                    tflops=flops_tok * tokens / statistics.median(t) / 1e12)
            for n, t in times.items()}


def bench_generate(args, ours, hf, batch):
    """New tokens/s of greedy decoding; each variant decodes the same prompts."""
    prompt_len, new = 16, args.new_tokens
    prompts = torch.randint(3, args.vocab, (batch, prompt_len), device=args.device)
    ours.eval()
    hf.eval()
    dt = getattr(torch, args.gen_dtype or args.dtype)
    ours_c, hf_c = ours.to(dt), hf.to(dt)

    def run_ours(compile=False):
        return generate(ours_c, prompts.tolist(), max_new_tokens=new, compile=compile)

    def run_hf(**kw):
        with torch.no_grad():
            hf_c.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=new, min_new_tokens=new, pad_token_id=0, **kw)

    def run_hf_compiled():
        # transformers' own fast path: a static cache and a compiled forward.
        hf_c.forward = hf_forward_compiled
        try:
            run_hf(cache_implementation="static")
        finally:
            del hf_c.forward

    fns = {"attnkit": run_ours, "transformers": run_hf}
    if args.compile_generate:
        hf_forward_compiled = torch.compile(hf_c.forward, fullgraph=True)
        fns["attnkit compile=True"] = lambda: run_ours(compile=True)
        fns["transformers static+compile"] = run_hf_compiled
    for n, f in fns.items():
        t0 = time.perf_counter()
        f()
        if "compile" in n:  # first calls compile
            print(f"  {n} batch {batch}: first call (compiles) {time.perf_counter() - t0:.1f} s",
                  flush=True)
    if args.compile_generate:
        assert run_ours(compile=True) == run_ours() or dt != torch.float32, \
            "compiled decoding differs from eager"
    def synced(f):
        def run():
            f()
            if args.device == "cuda":
                torch.cuda.synchronize()
        return run

    times = interleaved({n: synced(f) for n, f in fns.items()}, max(4, args.repeats // 2))
    ours.to(torch.float32)
    hf.to(torch.float32)
    return {n: batch * new / statistics.median(t) for n, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--mlp", type=int, default=512)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash", "math"],
                   help="attnkit's attention backend (transformers uses SDPA)")
    p.add_argument("--compile", action="store_true",
                   help="add training with forward + loss compiled, on both sides")
    p.add_argument("--no-fused", action="store_true", help="AdamW without fused=True")
    p.add_argument("--no-compile-generate", dest="compile_generate", action="store_false",
                   help="skip the compiled generation variants (a minute or two of compiling)")
    p.add_argument("--gen-dtype", default=None, help="dtype for generation (default --dtype)")
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8],
                   help="batch sizes timed for generation")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"CPU {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads"
    peak = matmul_peak(args.device, getattr(torch, args.dtype)) / 1e3
    ours, hf, dt = build(args)
    print(f"# torch {torch.__version__}; {dev}; {args.dtype}; d{args.embed_dim} x {args.depth} "
          f"layers, heads {args.heads}:{args.kv_heads}, mlp {args.mlp}, vocab {args.vocab}, "
          f"seq {args.seq}, batch {args.batch}; attnkit attention {args.attention}; "
          f"matmul peak {peak:.3f} TFLOP/s")
    if not args.skip_train:
        res = bench_train(args, ours, hf, dt)
        base = res["transformers"]["tok_s"]
        print(f"\n{'training':28} {'ms/step':>9} {'spread':>7} {'tokens/s':>10} {'MFU':>6} "
              f"{'vs transformers':>16} {'paired':>7}")
        for n, r in res.items():
            print(f"{n:28} {r['ms']:9.1f} {100 * r['spread']:6.0f}% {r['tok_s']:10.0f} "
                  f"{100 * r['tflops'] / peak:5.0f}% {r['tok_s'] / base:15.2f}x "
                  f"{r['paired']:6.2f}x")
    if args.skip_generate:
        return
    print(f"\n{'generation (greedy)':28} {'batch':>5} {'tokens/s':>10} {'vs transformers':>16}"
          f"   ({args.gen_dtype or args.dtype}, {args.new_tokens} new tokens after 16)")
    for batch in args.gen_batches:
        g = bench_generate(args, ours, hf, batch)
        for n, v in g.items():
            print(f"{n:28} {batch:5d} {v:10.0f} {v / g['transformers']:15.2f}x", flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()
