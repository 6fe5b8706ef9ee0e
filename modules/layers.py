"""Small layers shared by every model: norms, MLPs, stochastic depth.

RMSNorm: Zhang & Sennrich, 2019. SwiGLU: Shazeer, 2020, "GLU Variants Improve
Transformer". DropPath: Huang et al., 2016, "Deep Networks with Stochastic Depth".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(F, "rms_norm") and x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with the (dim, eps=) signature every norm here shares."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)


class GeluMLP(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 (the ViT / BERT feed-forward)."""

    def __init__(self, *, embed_dim: int, hidden_dim: int, bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, embed_dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) W_down; gate and up share one matmul."""

    def __init__(self, *, embed_dim: int, hidden_dim: int, bias: bool = False, drop: float = 0.0):
        super().__init__()
        self.gate_up_proj = nn.Linear(embed_dim, 2 * hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, embed_dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.drop(F.silu(gate) * up))


class DropPath(nn.Module):
    """Drops the whole residual branch per sample with probability p (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}
MLPS = {"swiglu": SwiGLU, "gelu": GeluMLP}


def lookup(table: dict, name: str, what: str):
    """A class from a name in config, with a clear error for an unknown name."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; expected one of {sorted(table)}") from None
