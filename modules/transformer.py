"""Pre-norm transformer blocks and the encoder / decoder stack every task shares.

Pre-norm residual layout (Xiong et al., 2020, "On Layer Normalization in the Transformer
Architecture"): x + Attn(Norm(x)), [x + CrossAttn(Norm(x), context)], x + MLP(Norm(x)).

One ``Transformer`` class covers the variants: an encoder (bidirectional, key padding
masks for long padded sequences such as speech frames), a causal decoder (language
modelling), and a decoder with cross-attention (translation, text-image fusion).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import (
    MLPS,
    NORMS,
    DropPath,
    LayerScale,
    add_on_rows,
    check_sizes,
    kept_rows,
    lookup,
    residual_add,
)
from .mha import KVCache, MultiHeadAttention, StaticKV
from .rope import RotaryEmbedding


class TransformerBlock(nn.Module):
    """One pre-norm block.

    Args:
        embed_dim, num_heads, num_kv_heads, head_dim: attention sizes.
        mlp_hidden_dim: width of the feed-forward layer.
        norm_layer: a norm class taking ``(dim, eps=)``; mlp_layer: an MLP class taking
            ``(embed_dim=, hidden_dim=, bias=, drop=)``.
        causal: causal self-attention. context_dim: adds cross-attention to a context of
            that width. rope: rotary embedding for self-attention.
        qkv_bias, proj_bias, mlp_bias: projection biases.
        qk_norm: RMSNorm on each head's queries and keys (see ``MultiHeadAttention``).
        attn_drop, drop, drop_path: attention-probability, residual and stochastic depth.
        layer_scale: a learned per-channel scale on the self-attention and MLP branches,
            starting at this value (``layers.LayerScale``; None: none).
    """

    def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, mlp_hidden_dim: int,
                 norm_layer: type[nn.Module], mlp_layer: type[nn.Module],
                 norm_eps: float = 1e-6, causal: bool = False, context_dim: int | None = None,
                 rope: RotaryEmbedding | None = None, qkv_bias: bool = False,
                 proj_bias: bool = False, mlp_bias: bool = False, qk_norm: bool = False,
                 attn_drop: float = 0.0, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale: float | None = None, backend: str = "auto"):
        super().__init__()
        heads = dict(embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, qkv_bias=qkv_bias, out_bias=proj_bias,
                     qk_norm=qk_norm, norm_eps=norm_eps, attn_drop=attn_drop,
                     backend=backend)
        self.norm1 = norm_layer(embed_dim, eps=norm_eps)
        self.attn = MultiHeadAttention(causal=causal, rope=rope, **heads)
        self.cross_norm = self.cross_attn = None
        if context_dim is not None:
            self.cross_norm = norm_layer(embed_dim, eps=norm_eps)
            self.cross_attn = MultiHeadAttention(context_dim=context_dim, **heads)
        self.norm2 = norm_layer(embed_dim, eps=norm_eps)
        self.mlp = mlp_layer(embed_dim=embed_dim, hidden_dim=mlp_hidden_dim, bias=mlp_bias,
                             drop=drop)
        self.drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path)
        scale = (lambda: LayerScale(embed_dim, layer_scale)) if layer_scale is not None \
            else nn.Identity
        self.ls1, self.ls2 = scale(), scale()

    def forward(self, x: Tensor, *, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, cache=None, positions=None,
                keep: int | None = None, rows: Tensor | None = None,
                in_place: bool = False, values: Tensor | None = None) -> Tensor:
        """x ``(B, L, E)`` -> ``(B, L, E)``, or ``(B, keep, E)``: with ``keep``, only the
        first ``keep`` tokens are carried through (see ``MultiHeadAttention``'s queries).
        ``rows``: the real tokens (``layers.kept_rows``); the MLP runs on those alone.
        ``in_place``: the residual sums update ``x`` and return it (no gradients; see
        ``Transformer``), so a hook keeping a block's output sees it change afterwards.
        ``values``: added to the self-attention values (``MultiHeadAttention``)."""
        self_cache, cross_cache = cache if cache is not None else (None, None)
        h = self.attn(self.norm1(x), mask=mask, cache=self_cache, positions=positions,
                      queries=keep, values=values)
        if keep is not None:
            x = x[:, :keep]
        x = residual_add(x, self.drop_path(self.drop(self.ls1(h))), in_place=in_place)
        if self.cross_attn is not None:
            x = add_on_rows(x, lambda t: self.drop_path(self.drop(self.cross_attn(
                self.cross_norm(t), context, mask=context_mask, cache=cross_cache))),
                in_place=in_place)
        if self.drop_path.p and self.training:  # drawn per sequence: every row
            rows = None
        return add_on_rows(
            x, lambda t: self.drop_path(self.drop(self.ls2(self.mlp(self.norm2(t))))), rows,
            in_place=in_place)


class Transformer(nn.Module):
    """A stack of ``TransformerBlock`` with a final norm.

    Args:
        embed_dim, depth, num_heads, num_kv_heads, head_dim, mlp_hidden_dim: sizes.
        norm: ``"rmsnorm"`` or ``"layernorm"``; mlp: ``"swiglu"`` or ``"gelu"``.
        causal: decoder self-attention. context_dim: cross-attention in every block.
        rope_theta: rotary embeddings with this base (None: no RoPE, e.g. learned or
            sin-cos absolute positions added by the caller).
        max_seq_len: size of the RoPE table built up front.
        drop_path_rate: stochastic depth, linearly increasing to this over depth.
        layer_scale: see ``TransformerBlock``.
        Other arguments go to every block.
    """

    def __init__(self, *, embed_dim: int, depth: int, num_heads: int,
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 mlp_hidden_dim: int, norm: str = "rmsnorm", mlp: str = "swiglu",
                 norm_eps: float = 1e-6, causal: bool = False, context_dim: int | None = None,
                 rope_theta: float | None = None, max_seq_len: int = 2048,
                 qkv_bias: bool = False, proj_bias: bool = False, mlp_bias: bool = False,
                 qk_norm: bool = False, attn_drop: float = 0.0, drop: float = 0.0,
                 drop_path_rate: float = 0.0, layer_scale: float | None = None,
                 backend: str = "auto"):
        super().__init__()
        check_sizes(embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                    num_kv_heads=num_kv_heads, head_dim=head_dim, mlp_hidden_dim=mlp_hidden_dim)
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads}) unless head_dim is given")
        norm_layer, mlp_layer = lookup(NORMS, norm, "norm"), lookup(MLPS, mlp, "mlp")
        hd = head_dim or embed_dim // num_heads
        self.rope = (RotaryEmbedding(head_dim=hd, theta=rope_theta, max_seq_len=max_seq_len)
                     if rope_theta is not None else None)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
                head_dim=head_dim, mlp_hidden_dim=mlp_hidden_dim, norm_layer=norm_layer,
                mlp_layer=mlp_layer, norm_eps=norm_eps, causal=causal,
                context_dim=context_dim, rope=self.rope, qkv_bias=qkv_bias,
                proj_bias=proj_bias, mlp_bias=mlp_bias, qk_norm=qk_norm,
                attn_drop=attn_drop, drop=drop,
                drop_path=drop_path_rate * i / max(depth - 1, 1), layer_scale=layer_scale,
                backend=backend)
            for i in range(depth))
        self.norm = norm_layer(embed_dim, eps=norm_eps)
        self.backend = backend

    def forward(self, x: Tensor, *, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, caches: list | None = None,
                positions: int | Tensor | None = None, keep: int | None = None,
                values: list | None = None) -> Tensor:
        """x ``(B, L, E)`` -> ``(B, L, E)``; see ``MultiHeadAttention.forward`` for masks.

        A ``(B, L)`` self-attention mask marks padding: no real token sees a padded one,
        and the outputs at padded positions are finite but unspecified (on the CPU the MLPs
        skip them, ``layers.kept_rows``), so a mask whose hidden positions are read later
        (masked-token prediction) is not a padding mask: pass it 4-D,
        ``mask[:, None, None, :]``. Without gradients the blocks update one copy of ``x``
        in place.

        ``keep``: return only the first ``keep`` tokens ``(B, keep, E)``. The last block
        then computes attention outputs, MLP and norm for those tokens alone, since nothing
        else reaches the result: a class-token classifier skips most of its last block.

        ``values``: one ``(B, L, Hk * D)`` tensor or None per block, added to that block's
        self-attention values (value embeddings, see ``modules.lm.CausalLM``).
        """
        if values is not None and len(values) != len(self.blocks):
            raise ValueError(f"values has {len(values)} entries for {len(self.blocks)} blocks")
        last = len(self.blocks) - 1
        rows = kept_rows(mask, x) if caches is None and keep is None else None
        in_place = not torch.is_grad_enabled()
        if in_place:
            x = x.clone(memory_format=torch.contiguous_format)
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, context=context, context_mask=context_mask,
                      cache=None if caches is None else caches[i], positions=positions,
                      keep=keep if i == last else None, rows=rows, in_place=in_place,
                      values=None if values is None else values[i])
        if keep is not None and not self.blocks:
            x = x[:, :keep]
        return self.norm(x)

    def new_caches(self, batch: int, max_len: int, *, device=None, dtype=None) -> list:
        """One (KVCache, StaticKV | None) pair per block for incremental decoding."""
        return [(b.attn.new_cache(batch, max_len, device=device, dtype=dtype),
                 StaticKV() if b.cross_attn is not None else None) for b in self.blocks]


def reorder_caches(caches: list, index: Tensor) -> None:
    """Select batch rows of every cache in place (beam search)."""
    for self_cache, cross_cache in caches:
        self_cache.reorder(index)
        if cross_cache is not None:
            cross_cache.reorder(index)


def cache_length(caches: list) -> int:
    return caches[0][0].length if caches else 0


__all__ = ["TransformerBlock", "Transformer", "KVCache", "StaticKV", "reorder_caches",
           "cache_length"]
