"""Small layers shared by every model: norms, MLPs, stochastic depth, and running
position-wise layers on the real tokens of a padded batch only.

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


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch, starting at ``init`` (CaiT,
    DeiT III; timm's ``ls1``/``ls2``, whose ``gamma`` keys it shares)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Drops the whole residual branch per sample with probability p (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path rate {p}; expected a probability in [0, 1)")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def kept_rows(mask_BL: Tensor | None, x_BLE: Tensor) -> Tensor | None:
    """Flat indices ``(N,)`` of the real tokens of ``x`` viewed as ``(B * L, E)``, from a
    ``(B, L)`` key padding mask (True = real token), so that position-wise layers (norms,
    feed-forward layers) skip the padding; see ``add_on_rows``.

    None (compute every row) without such a mask, when nothing is padded, off the CPU (an
    accelerator would wait for the count) or while compiling (a data-dependent shape)."""
    if (mask_BL is None or mask_BL.dim() != 2 or mask_BL.shape != x_BLE.shape[:2]
            or x_BLE.device.type != "cpu" or torch.compiler.is_compiling()):
        return None
    rows = mask_BL.reshape(-1).nonzero().squeeze(1)
    return None if rows.numel() == mask_BL.numel() else rows


def add_on_rows(x_BLE: Tensor, fn, rows: Tensor | None = None, alpha: float = 1.0,
                in_place: bool = False) -> Tensor:
    """The residual update ``x + alpha * fn(x)``.

    With ``rows`` (``kept_rows``) ``fn`` must be position-wise (each token on its own): it
    sees only those rows and the other rows of ``x`` pass through unchanged. At 20% padding
    a Conformer's two feed-forward layers do 20% less work, and the real tokens get the
    same values up to float rounding. (Dropout inside ``fn`` then draws its masks for the
    real rows only: the same distribution, another random stream.)"""
    if rows is None:
        return residual_add(x_BLE, fn(x_BLE), alpha, in_place)
    flat = x_BLE.reshape(-1, x_BLE.shape[-1])
    y = fn(flat.index_select(0, rows))
    # As ``x + y`` would promote (under autocast: an fp32 stream, bf16 outputs).
    dtype = torch.promote_types(flat.dtype, y.dtype)
    if in_place and dtype == flat.dtype:
        return flat.index_add_(0, rows, y.to(dtype), alpha=alpha).view(x_BLE.shape)
    return flat.to(dtype).index_add(0, rows, y.to(dtype), alpha=alpha).view(x_BLE.shape)


def residual_add(x: Tensor, y: Tensor, alpha: float = 1.0, in_place: bool = False) -> Tensor:
    """``x + alpha * y``; ``in_place``: into ``x`` itself (the caller owns ``x`` and needs no
    gradients), which saves a full-size temporary, unless ``x + y`` would change dtype."""
    if in_place and torch.promote_types(x.dtype, y.dtype) == x.dtype:
        return x.add_(y, alpha=alpha)
    return torch.add(x, y, alpha=alpha)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}
MLPS = {"swiglu": SwiGLU, "gelu": GeluMLP}


def check_sizes(**sizes: int) -> None:
    """Model sizes that cannot build a model (``embed_dim=0``) are a ``ValueError`` naming
    them; ``depth`` may be 0, the others must be positive."""
    for name, value in sizes.items():
        if value is not None and value < (0 if name == "depth" else 1):
            raise ValueError(f"{name}={value}; expected {'>= 0' if name == 'depth' else '>= 1'}")


def lookup(table: dict, name: str, what: str):
    """A class from a name in config, with a clear error for an unknown name."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; expected one of {sorted(table)}") from None
