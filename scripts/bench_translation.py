"""Translation speed: our Seq2SeqTransformer vs torch.nn.Transformer of the same dimensions
and batch (training tokens/s, interleaved in one process), and beam-search sentences/s
with the KV / cross-attention caches vs recomputing the prefix each step.

    python scripts/bench_translation.py
    python scripts/bench_translation.py --device cuda --dtype bfloat16 --batch 128

The FFN of nn.Transformer is given 1.5x our SwiGLU width, so both have the same FFN
parameters and FLOPs (SwiGLU has three matrices, the ReLU MLP two).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from modules.seq2seq import Seq2SeqTransformer  # noqa: E402
from scripts.timing import interleaved  # noqa: E402


class TorchSeq2Seq(nn.Module):
    """nn.Transformer with a tied embedding and output projection, pre-norm, batch first."""

    def __init__(self, vocab, dim, heads, enc, dec, ffn):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Embedding(512, dim)  # nn.Transformer has no positions of its own
        self.core = nn.Transformer(dim, heads, enc, dec, ffn, dropout=0.1, batch_first=True,
                                   norm_first=True)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, src, tgt):
        pos_s = self.pos(torch.arange(src.shape[1], device=src.device))
        pos_t = self.pos(torch.arange(tgt.shape[1], device=tgt.device))
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
        out = self.core(self.embed(src) + pos_s, self.embed(tgt) + pos_t, tgt_mask=mask,
                        src_key_padding_mask=src == 0, memory_key_padding_mask=src == 0,
                        tgt_is_causal=True)
        return self.head(out)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--enc", type=int, default=3)
    p.add_argument("--dec", type=int, default=2)
    p.add_argument("--ffn", type=int, default=704, help="our SwiGLU width")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--src-len", type=int, default=40)
    p.add_argument("--tgt-len", type=int, default=44)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--decode-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev, dt = args.device, getattr(torch, args.dtype)
    ours = Seq2SeqTransformer(vocab_size=args.vocab, embed_dim=args.dim, num_heads=args.heads,
                              encoder_depth=args.enc, decoder_depth=args.dec,
                              mlp_hidden_dim=args.ffn, drop=0.1).to(dev)
    ref = TorchSeq2Seq(args.vocab, args.dim, args.heads, args.enc, args.dec,
                       int(1.5 * args.ffn)).to(dev)
    src = torch.randint(4, args.vocab, (args.batch, args.src_len), device=dev)
    tgt = torch.randint(4, args.vocab, (args.batch, args.tgt_len + 1), device=dev)
    for i in range(args.batch):  # ragged lengths, as in real batches
        src[i, args.src_len - i % 8:] = 0
    ac = dict(device_type="cuda" if dev == "cuda" else "cpu", dtype=dt,
              enabled=dt != torch.float32)

    def step_fn(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast(**ac):
                logits = model(src, tgt[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten(),
                                       label_smoothing=0.1, ignore_index=0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev == "cuda":
                torch.cuda.synchronize()
        return step

    steps = {"attnkit": step_fn(ours.train()), "nn.Transformer": step_fn(ref.train())}
    for s in steps.values():
        for _ in range(args.warmup):
            s()
    times = interleaved(steps, args.repeats)
    tokens = int((src != 0).sum() + args.batch * args.tgt_len)
    name = torch.cuda.get_device_name() if dev == "cuda" else \
        f"CPU {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads"
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"# torch {torch.__version__}; {name}; {args.dtype}; d{args.dim}, {args.enc}+{args.dec} "
          f"layers, {args.heads} heads, vocab {args.vocab}, batch {args.batch} x "
          f"{args.src_len}/{args.tgt_len}; params {n_ours / 1e6:.2f}M vs {n_ref / 1e6:.2f}M")
    base = statistics.median(times["nn.Transformer"])
    print(f"{'training':16} {'ms/step':>8} {'spread':>7} {'tokens/s':>9} {'vs nn.Transformer':>18}")
    for n, t in times.items():
        med = statistics.median(t)
        print(f"{n:16} {med * 1e3:8.1f} {100 * (max(t) - min(t)) / med:6.0f}% "
              f"{tokens / med:9.0f} {base / med:17.2f}x")

    ours.eval()
    dsrc = src[:args.decode_batch]

    def decode(cached):
        def run():
            with torch.autocast(**ac):
                ours.beam_search(dsrc, beam_size=args.beam, max_len_a=1.0, max_len_b=4,
                                 use_cache=cached)
        return run

    fns = {cached: decode(cached) for cached in (True, False)}
    for f in fns.values():
        f()
    times = interleaved(fns, max(3, args.repeats // 3))
    res = {cached: len(dsrc) / statistics.median(t) for cached, t in times.items()}
    print(f"\nbeam search (beam {args.beam}, {len(dsrc)} sentences, up to src_len + 4 tokens)")
    print(f"  with caches:    {res[True]:8.1f} sentences/s ({res[True] / res[False]:.2f}x)")
    print(f"  recompute:      {res[False]:8.1f} sentences/s")


if __name__ == "__main__":
    main()
