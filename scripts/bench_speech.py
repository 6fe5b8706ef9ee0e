"""Speech encoder speed: our Conformer (modules.speech) against torchaudio's
``models.Conformer`` of the same shape (same subsampled input, heads, FFN and convolution
sizes, a CTC head on both), training step and inference, on padded batches with a
realistic spread of lengths, measured side by side in one process (see the README).

    python scripts/bench_speech.py                       # CPU fp32, d144 x 6, batch 16
    python scripts/bench_speech.py --frames 400 --batch 8
    python scripts/bench_speech.py --device cuda --dtype bfloat16 --batch 64

torchaudio's attention is ``nn.MultiheadAttention`` with a key padding mask; ours calls
``modules.attention.attend`` (SDPA's fused kernels, padding mask included). Ours also
applies rotary positions (torchaudio's has none), so it does a little more work; the
``attnkit (no rope)`` row takes them out. GFLOP/s count the matmuls (2 * params per frame
forward, x3 for training) plus attention (4 * L * E per frame forward, x3.5 training).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from modules.speech import Conformer  # noqa: E402
from scripts.bench_attention import matmul_peak  # noqa: E402
from scripts.timing import side_by_side  # noqa: E402


class TorchaudioCTC(torch.nn.Module):
    def __init__(self, shape: dict, vocab: int):
        super().__init__()
        import torchaudio
        self.encoder = torchaudio.models.Conformer(
            input_dim=shape["embed_dim"], num_heads=shape["num_heads"],
            ffn_dim=shape["mlp_hidden_dim"], num_layers=shape["depth"],
            depthwise_conv_kernel_size=shape["conv_kernel"], dropout=0.1)
        self.head = torch.nn.Linear(shape["embed_dim"], vocab)

    def forward(self, x, lengths):
        h, _ = self.encoder(x, lengths)
        return self.head(h)


class OurCTC(torch.nn.Module):
    def __init__(self, shape: dict, vocab: int, rope: bool, backend: str):
        super().__init__()
        self.encoder = Conformer(embed_dim=shape["embed_dim"], depth=shape["depth"],
                                 num_heads=shape["num_heads"],
                                 mlp_hidden_dim=shape["mlp_hidden_dim"],
                                 conv_kernel=shape["conv_kernel"],
                                 rope_theta=10000.0 if rope else None, max_seq_len=4096,
                                 drop=0.1, backend=backend)
        self.head = torch.nn.Linear(shape["embed_dim"], vocab)

    def forward(self, x, lengths):
        keep = torch.arange(x.shape[1], device=x.device) < lengths[:, None]
        return self.head(self.encoder(x, mask=keep))


def make_step(model, x, lengths, targets, target_lengths, autocast, train: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None

    def step():
        if train:
            with torch.autocast(**autocast):
                logits = model(x, lengths)
            loss = F.ctc_loss(logits.float().log_softmax(-1).transpose(0, 1), targets, lengths,
                              target_lengths, zero_infinity=True)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), torch.autocast(**autocast):
                model(x, lengths)
        if x.is_cuda:
            torch.cuda.synchronize()
    return step


def flops(model, lengths, embed_dim: int, depth: int, train: bool) -> float:
    n = sum(p.numel() for p in model.parameters())
    frames = float(lengths.sum())
    longest = float(lengths.max())
    attn = depth * 4 * longest * embed_dim * frames
    return (6 * n * frames + 3.5 * attn) if train else (2 * n * frames + attn)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--embed-dim", type=int, default=144)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=576)
    p.add_argument("--conv-kernel", type=int, default=15)
    p.add_argument("--frames", type=int, default=200, help="longest utterance, encoder frames "
                   "(after x4 subsampling: 200 = 8 s)")
    p.add_argument("--min-fraction", type=float, default=0.4,
                   help="shortest utterance as a fraction of the longest")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=29)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev, dt = args.device, getattr(torch, args.dtype)
    shape = dict(embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads,
                 mlp_hidden_dim=args.ffn, conv_kernel=args.conv_kernel)
    models = {"torchaudio": TorchaudioCTC(shape, args.vocab),
              "attnkit": OurCTC(shape, args.vocab, rope=True, backend="auto"),
              "attnkit (no rope)": OurCTC(shape, args.vocab, rope=False, backend="auto")}
    g = torch.Generator().manual_seed(0)
    lo = int(args.frames * args.min_fraction)
    lengths = torch.randint(lo, args.frames + 1, (args.batch,), generator=g)
    lengths[0] = args.frames
    x = torch.randn(args.batch, args.frames, args.embed_dim, generator=g).to(dev)
    target_lengths = (lengths // 3).clamp(min=1)
    targets = torch.randint(1, args.vocab, (args.batch, int(target_lengths.max())), generator=g)
    lengths, targets, target_lengths = lengths.to(dev), targets.to(dev), target_lengths.to(dev)
    ac = dict(device_type="cuda" if dev == "cuda" else "cpu", dtype=dt,
              enabled=dt != torch.float32)
    name = torch.cuda.get_device_name() if dev == "cuda" else \
        f"CPU {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads"
    peak = matmul_peak(dev, dt) / 1e3
    pad = 1 - float(lengths.sum()) / (args.batch * args.frames)
    print(f"# torch {torch.__version__}; {name}; {args.dtype}; conformer d{args.embed_dim} x "
          f"{args.depth}, {args.heads} heads, ffn {args.ffn}, conv {args.conv_kernel}; batch "
          f"{args.batch}, {lo}-{args.frames} frames ({100 * pad:.0f}% padding); "
          f"{sum(p.numel() for p in models['attnkit'].parameters()) / 1e6:.2f}M params; "
          f"matmul peak {peak * 1e3:.0f} GFLOP/s")
    print(f"{'pass':10} {'model':18} {'ms':>8} {'spread':>7} {'frames/s':>9} {'GFLOP/s':>8} "
          f"{'MFU':>5} {'vs torchaudio':>13}  {'paired: median [25%, 75%]':>27}")
    for label, train in (("train", True), ("inference", False)):
        steps = {}
        for n, m in models.items():
            m.to(dev).train(train)
            steps[n] = make_step(m, x, lengths, targets, target_lengths, ac, train)
        timing = side_by_side(steps, args.repeats, args.warmup)
        med = timing.median
        frames = float(lengths.sum())
        for n, m in models.items():
            gflops = flops(m, lengths, args.embed_dim, args.depth, train) / med[n] / 1e9
            q1, q2, q3 = timing.paired("torchaudio", n)
            print(f"{label:10} {n:18} {med[n] * 1e3:8.1f} {100 * timing.spread(n):6.0f}% "
                  f"{frames / med[n]:9.0f} {gflops:8.1f} {100 * gflops / (peak * 1e3):4.0f}% "
                  f"{med['torchaudio'] / med[n]:12.2f}x  {q2:17.3f}x [{q1:.3f}, {q3:.3f}]",
                  flush=True)


if __name__ == "__main__":
    main()
