"""Rotary position embeddings (Su et al., 2021, "RoFormer").

The rotate-half layout used by Llama-format / Hugging Face checkpoints: the head dim is
split into two halves (x1, x2) and rotated as (x1 cos - x2 sin, x2 cos + x1 sin), with
frequency theta ** (-2i / D) shared by element i of each half.

Shapes: x is (B, H, L, D); positions are an int offset or a (B, L) tensor of positions
(left-padded batched decoding gives each sequence its own positions).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` (or the inverse rotation) in four fused
    multiply-adds written straight into each half of the output, for x of any strides.

    The plain expression makes five full-size temporaries; on the CPU it cost as much as
    the attention kernel itself for the speech encoder (head dim 36, 200 frames).
    ``cos``/``sin`` come from the tables below, whose two halves are equal."""
    h = x.shape[-1] // 2
    c, s = cos[..., :h], sin[..., :h]
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty(torch.broadcast_shapes(x.shape, cos.shape), dtype=x.dtype,
                      device=x.device)
    sign = 1.0 if inverse else -1.0
    torch.mul(x1, c, out=out[..., :h]).addcmul_(x2, s, value=sign)
    torch.mul(x2, c, out=out[..., h:]).addcmul_(x1, s, value=-sign)
    return out


class _Rotate(torch.autograd.Function):
    """``rotate`` with its gradient: a rotation's adjoint is the inverse rotation."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, sin, inverse=True), None, None


class RotaryEmbedding(nn.Module):
    """Caches cos/sin tables once per (length, device, dtype) and rotates q and k.

    Args:
        head_dim: the rotated dimension (even).
        theta: base of the frequencies (10000 in Llama 1/2, 500000 in Llama 3).
        max_seq_len: table length built up front; longer positions grow it.
    """

    def __init__(self, *, head_dim: int, theta: float = 10000.0, max_seq_len: int = 2048):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        if not theta > 0:
            raise ValueError(f"rope_theta={theta}; expected a positive base (e.g. 10000)")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.max_seq_len = max_seq_len
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _table(self, length: int, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        hit = self._tables.get(key)
        if hit is not None and hit[0].shape[0] >= length:
            return hit
        n = max(length, self.max_seq_len)
        # Computed in float32 then cast once, as Hugging Face's Llama does.
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device,
                                                       dtype=torch.float32) / self.head_dim))
        freqs = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._tables[key] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return self._tables[key]

    def cos_sin(self, length: int, positions: int | Tensor, device, dtype):
        """cos and sin broadcastable to (B, H, L, D)."""
        if isinstance(positions, Tensor):
            # A compiled graph cannot read tensor values into Python: it indexes the table
            # built up front (max_seq_len rows); eager calls grow the table as needed.
            need = self.max_seq_len if torch.compiler.is_compiling() else int(positions.max()) + 1
            cos, sin = self._table(need, device, dtype)
            return cos[positions][:, None], sin[positions][:, None]  # (B, 1, L, D)
        cos, sin = self._table(positions + length, device, dtype)
        return cos[positions:positions + length], sin[positions:positions + length]

    def forward(self, q: Tensor, k: Tensor, positions: int | Tensor = 0) -> tuple[Tensor, Tensor]:
        """Rotate q (B, H, L, D) and k (B, Hk, L, D) for their positions."""
        cos, sin = self.cos_sin(q.shape[-2], positions, q.device, q.dtype)
        if torch.compiler.is_compiling():  # the compiler fuses the plain expression itself
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            return _Rotate.apply(q, cos, sin), _Rotate.apply(k, cos, sin)
        return rotate(q, cos, sin), rotate(k, cos, sin)

    def _apply(self, fn, recurse=True):
        self._tables.clear()  # tables follow the module's device/dtype on next use
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta:g}"
