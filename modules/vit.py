"""Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words").

Patch embedding (a strided convolution, optionally after a small convolutional stem as in
Xiao et al., 2021, "Early Convolutions Help Transformers See Better"), a class token or
mean pooling, learned or fixed 2-D sin-cos position embeddings (MAE, He et al., 2022),
the shared bidirectional encoder, and a linear head.

Shape legend: B batch, C channels, HxW image, N patches, E embed_dim, K classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transformer import Transformer


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos position embeddings ``(grid_h * grid_w, dim)``."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need embed_dim % 4 == 0, got {dim}")
    y, x = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                          torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    parts = []
    for pos in (y.flatten(), x.flatten()):
        out = pos[:, None] * omega[None]
        parts += [out.sin(), out.cos()]
    return torch.cat(parts, dim=1).float()


class PatchEmbed(nn.Module):
    """Image ``(B, C, H, W)`` -> patch tokens ``(B, N, E)``.

    Args:
        img_size, patch_size, in_chans, embed_dim: sizes; ``img_size % patch_size == 0``.
        stem_channels: widths of 3x3 conv + BN + GELU layers before the patchify
            convolution; empty for the plain ViT.
        stem_stride: 1 (the stem keeps the resolution) or 2 (each stem layer halves it and
            the patchify convolution covers ``patch_size / 2**len(stem_channels)`` of its
            pixels, as in Xiao et al.: overlapping receptive fields at a small cost).
    """

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 stem_channels: tuple[int, ...] = (), stem_stride: int = 1):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size "
                             f"({patch_size})")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        down = stem_stride ** len(stem_channels)
        if patch_size % down:
            raise ValueError(f"patch_size ({patch_size}) must be a multiple of {down}: "
                             f"{len(stem_channels)} stem layers of stride 2")
        layers, c = [], in_chans
        for width in stem_channels:
            layers += [nn.Conv2d(c, width, 3, stride=stem_stride, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.GELU()]
            c = width
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, embed_dim, patch_size // down, stride=patch_size // down)
        self.grid = img_size // patch_size

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT classifier.

    Args:
        img_size, patch_size, in_chans, num_classes: data sizes.
        embed_dim, depth, num_heads, mlp_ratio: encoder sizes.
        stem_channels, stem_stride: optional convolutional stem (see ``PatchEmbed``).
        pool: ``"token"`` (class token) or ``"mean"`` (mean of patch tokens).
        class_token: prepend a class token (default: with ``pool="token"`` only; with
            ``"mean"`` it still attends but is left out of the mean, as timm does).
        fc_norm: normalise the pooled features rather than the tokens (timm's ``fc_norm``,
            its default with mean pooling): the encoder gets no final norm.
        pos_embed: ``"learned"`` or ``"sincos"``.
        registers: learned tokens after the class token that only attend and are attended to
            (Darcet et al., 2024; timm's ``reg_tokens``), left out of the pooling.
        pre_norm: a LayerNorm on the embedded tokens before the encoder (CLIP's ``ln_pre``).
        qkv_bias: bias on the q/k/v projection.
        layer_scale: a learned per-channel scale on each residual branch, starting at this
            value (DeiT III, CaiT; timm's ``init_values``); None: none.
        drop, attn_drop, drop_path_rate: regularisation.
        backend: attention kernel.
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 12,
                 num_heads: int = 3, mlp_ratio: float = 4.0,
                 stem_channels: tuple[int, ...] | list[int] = (), stem_stride: int = 1,
                 pool: str = "token", class_token: bool | None = None, fc_norm: bool = False,
                 pos_embed: str = "learned", qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path_rate: float = 0.0, norm_eps: float = 1e-6,
                 pre_norm: bool = False, layer_scale: float | None = None,
                 registers: int = 0, backend: str = "auto"):
        super().__init__()
        if pool not in ("token", "mean"):
            raise ValueError(f"pool must be 'token' or 'mean', got {pool!r}")
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        class_token = pool == "token" if class_token is None else class_token
        if pool == "token" and not class_token:
            raise ValueError("pool='token' needs the class token (class_token=True)")
        self.img_size, self.pool, self.num_classes = img_size, pool, num_classes
        if not isinstance(registers, int) or isinstance(registers, bool) or registers < 0:
            raise ValueError(f"registers={registers}; expected a count of tokens >= 0")
        self.num_prefix = int(class_token) + registers
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size,
                                      in_chans=in_chans, embed_dim=embed_dim,
                                      stem_channels=tuple(stem_channels),
                                      stem_stride=stem_stride)
        n = self.patch_embed.grid ** 2 + self.num_prefix
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, registers, embed_dim)) if registers else None
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, n, embed_dim) * 0.02)
        else:
            table = sincos_2d(self.patch_embed.grid, self.patch_embed.grid, embed_dim)
            table = torch.cat([torch.zeros(self.num_prefix, embed_dim), table])
            self.register_buffer("pos_embed", table[None], persistent=False)
        self.pos_drop = nn.Dropout(drop)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        self.encoder = Transformer(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_hidden_dim=int(embed_dim * mlp_ratio), norm="layernorm", mlp="gelu",
            norm_eps=norm_eps, qkv_bias=qkv_bias, proj_bias=True, mlp_bias=True,
            attn_drop=attn_drop, drop=drop, drop_path_rate=drop_path_rate,
            layer_scale=layer_scale, backend=backend)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if fc_norm else None
        if fc_norm:
            self.encoder.norm = nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes)
        self.apply(self._init)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)

    def no_weight_decay(self) -> set[str]:
        """The parameters the optimizer leaves undecayed beside norms and biases: the class
        and register tokens and a learned position table (timm's list, which its training
        recipes and checkpoints assume)."""
        return {name for name in ("cls_token", "reg_token", "pos_embed")
                if isinstance(getattr(self, name), nn.Parameter)}

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor, keep: int | None = None) -> Tensor:
        """Encoded tokens ``(B, prefix + N, E)`` (class token, registers, patches), or the
        first ``keep`` of them."""
        x = self.patch_embed(x)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token)
                  if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        return self.encoder(self.norm_pre(self.pos_drop(x + self.pos_embed)), keep=keep)

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> logits ``(B, K)``.

        With class-token pooling only the class token's output is used, so the last block
        runs its query, attention output and MLP for that token alone (the same logits as
        encoding every token; tested against timm).
        """
        return self.head(self.pooled(self.features(x, keep=1 if self.pool == "token" else None)))

    def pooled(self, tokens: Tensor) -> Tensor:
        """Encoded tokens ``(B, prefix + N, E)`` (or the class token's alone) -> the
        features the head reads ``(B, E)``."""
        x = tokens[:, 0] if self.pool == "token" else tokens[:, self.num_prefix:].mean(1)
        return self.fc_norm(x) if self.fc_norm is not None else x


def resize_pos_embed(pos: Tensor, new_grid: int, num_prefix: int) -> Tensor:
    """Bicubically interpolate ``(1, prefix + g*g, E)`` position embeddings to a new grid."""
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"position embeddings of {grid.shape[1]} patches are not a square grid")
    if old == new_grid:
        return pos
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
