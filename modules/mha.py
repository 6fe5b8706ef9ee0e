"""Multi-head attention module: projections, RoPE, KV caches; the kernel is ``attend``.

Self-attention (optionally causal) and cross-attention share one class. Incremental
decoding uses a preallocated ``KVCache`` (no concatenation per step); cross-attention
keys/values are computed from the context once and kept in a ``StaticKV``.

Shape legend: B batch, L new tokens, S context length, E embed_dim, H heads,
Hk kv heads, D head_dim, T tokens held in the cache.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attend, check_backend, resolve_backend
from .layers import RMSNorm
from .rope import RotaryEmbedding

log = logging.getLogger(__name__)


class KVCache:
    """Preallocated keys/values for one self-attention layer.

    Two ways to fill it:

    - growing (default): ``append`` writes after the ``length`` cached tokens and returns
      views of the filled part, so attention sees exactly the tokens so far;
    - static: with ``slot`` set to a 1-element long tensor, ``append`` writes one step at
      that index and returns the whole buffer. Shapes never change from step to step, which
      is what a compiled decoding step needs; the caller masks keys past the slot.

    Args:
        batch, num_kv_heads, max_len, head_dim: buffer shape ``(B, Hk, max_len, D)``.
    """

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int, *,
                 device=None, dtype=torch.float32):
        self.k = torch.zeros(batch, num_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.slot: Tensor | None = None

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k_BHLD: Tensor, v_BHLD: Tensor) -> tuple[Tensor, Tensor]:
        """Write new keys/values after the cached ones (or at ``slot``); return the keys and
        values attention should see."""
        if self.slot is not None:
            self.k.index_copy_(2, self.slot, k_BHLD)
            self.v.index_copy_(2, self.slot, v_BHLD)
            return self.k, self.v
        end = self.length + k_BHLD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold {end}; "
                             f"create it with a larger max_len")
        self.k[:, :, self.length:end] = k_BHLD
        self.v[:, :, self.length:end] = v_BHLD
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search picks surviving hypotheses)."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


class StaticKV:
    """Cross-attention keys/values, computed from the context on first use."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with grouped-query heads.

    Args:
        embed_dim: model width E (input and output).
        num_heads: query heads H.
        num_kv_heads: key/value heads Hk (H % Hk == 0); None means H (plain MHA), 1 is MQA.
        head_dim: D, default E // H.
        context_dim: width of the context for cross-attention (None: self-attention).
        causal: mask future keys (decoder self-attention).
        rope: rotary embedding applied to q and k (self-attention only).
        qkv_bias, out_bias: biases on the projections.
        qk_norm: RMSNorm over each head's queries and keys before RoPE (as Qwen3), which
            bounds the attention logits; the norms' weights are learned. norm_eps: its eps.
        attn_drop: attention-probability dropout, training only.
        backend: attention kernel, see ``modules.attention``.
    """

    def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, context_dim: int | None = None,
                 causal: bool = False, rope: RotaryEmbedding | None = None,
                 qkv_bias: bool = False, out_bias: bool = False, qk_norm: bool = False,
                 norm_eps: float = 1e-6, attn_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                                 f"({num_heads}) unless head_dim is given")
            head_dim = embed_dim // num_heads
        if context_dim is not None and (causal or rope is not None):
            raise ValueError("cross-attention takes neither causal masking nor rotary "
                             "embeddings: queries and context keys have no shared positions")
        if rope is not None and rope.head_dim != head_dim:
            raise ValueError(f"rope.head_dim ({rope.head_dim}) != head_dim ({head_dim})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"attn_drop={attn_drop}; expected a probability in [0, 1)")
        self.causal, self.rope, self.attn_drop = causal, rope, attn_drop
        self.is_cross = context_dim is not None
        self.backend = check_backend(backend, head_dim)
        q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
        if self.is_cross:
            self.q_proj = nn.Linear(embed_dim, q_dim, bias=qkv_bias)
            self.kv_proj = nn.Linear(context_dim, 2 * kv_dim, bias=qkv_bias)
        else:  # one matmul for q, k and v
            self.qkv_proj = nn.Linear(embed_dim, q_dim + 2 * kv_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(q_dim, embed_dim, bias=out_bias)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self._logged = False

    def _heads(self, x: Tensor, n: int, norm: nn.Module | None = None) -> Tensor:
        B, L, _ = x.shape
        x = x.view(B, L, n, self.head_dim)
        return (x if norm is None else norm(x)).transpose(1, 2)  # (B, n, L, D)

    def _context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv_proj(context).chunk(2, dim=-1)
        return (self._heads(k, self.num_kv_heads, self.k_norm),
                self._heads(v, self.num_kv_heads))

    def forward(self, x: Tensor, context: Tensor | None = None, *, mask: Tensor | None = None,
                cache: KVCache | StaticKV | None = None,
                positions: int | Tensor | None = None, queries: int | None = None,
                values: Tensor | None = None) -> Tensor:
        """Attend from x ``(B, L, E)``.

        Args:
            context: ``(B, S, context_dim)`` for cross-attention (may be None when a
                filled ``StaticKV`` cache is given).
            mask: boolean, True = may attend: ``(B, kv_len)`` key padding or 4-D
                broadcastable to ``(B, H, L, kv_len)``; with a KVCache, kv_len counts the
                cached tokens too.
            cache: KVCache (self-attention) or StaticKV (cross-attention).
            positions: RoPE positions, an int offset or ``(B, L)``; default: the cache
                length (0 without cache).
            queries: outputs for the first ``queries`` tokens only, ``(B, queries, E)``:
                their queries attend to keys and values from all L tokens (bidirectional
                self-attention without cache or RoPE, e.g. a ViT's class token at the end).
            values: ``(B, L, Hk * D)`` added to the values of x's tokens before attention
                (value embeddings: a per-token table lookup; self-attention only); with a
                cache, what is stored includes it.
        """
        B, L, _ = x.shape
        if values is not None and (self.is_cross or queries is not None):
            raise ValueError("values are added in self-attention over all tokens only, not "
                             "in cross-attention or with queries")
        if queries is not None:
            given = [name for name, on in (("cross-attention", self.is_cross),
                                           ("causal", self.causal),
                                           ("rotary embeddings", self.rope is not None),
                                           ("a cache", cache is not None)) if on]
            if given:
                raise ValueError(f"queries={queries} needs bidirectional self-attention "
                                 f"without cache or rotary embeddings; this call has "
                                 f"{', '.join(given)}")
            q, k, v = self._qkv_first(x, queries)
            if mask is not None and mask.dim() == 4 and mask.shape[-2] > 1:
                mask = mask[..., :queries, :]  # rows of the kept queries
            L = queries
        elif self.is_cross:
            q = self._heads(self.q_proj(x), self.num_heads, self.q_norm)
            if cache is not None and cache.k is not None:
                k, v = cache.k, cache.v
            else:
                if context is None:
                    raise ValueError("cross-attention needs a context (or a filled StaticKV)")
                k, v = self._context_kv(context)
                if cache is not None:
                    cache.k, cache.v = k, v
        else:
            q, k, v = self.qkv_proj(x).split(
                [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2,
                dim=-1)
            if values is not None:
                v = v + values
            q, k, v = (self._heads(t, n, norm) for t, n, norm in
                       ((q, self.num_heads, self.q_norm), (k, self.num_kv_heads, self.k_norm),
                        (v, self.num_kv_heads, None)))
            if self.rope is not None:
                if positions is None:
                    positions = cache.length if cache is not None else 0
                q, k = self.rope(q, k, positions)
            if cache is not None:
                k, v = cache.append(k, v)
        if not self._logged and not torch.compiler.is_compiling():
            chosen = resolve_backend(self.backend, q, mask, self.causal,
                                     self.attn_drop if self.training else 0.0, k.shape[2])
            log.debug("attention backend %s -> %s", self.backend, chosen)
            self._logged = True
        out = attend(q, k, v, mask=mask, causal=self.causal, backend=self.backend,
                     dropout_p=self.attn_drop if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, -1))

    def _qkv_first(self, x: Tensor, queries: int) -> tuple[Tensor, Tensor, Tensor]:
        """Heads of q for the first ``queries`` tokens and of k, v for all tokens, with
        the rows of the fused projection split so no query is computed for nothing."""
        nq = self.num_heads * self.head_dim
        w, b = self.qkv_proj.weight, self.qkv_proj.bias
        q = F.linear(x[:, :queries], w[:nq], None if b is None else b[:nq])
        k, v = F.linear(x, w[nq:], None if b is None else b[nq:]).chunk(2, dim=-1)
        return (self._heads(q, self.num_heads, self.q_norm),
                self._heads(k, self.num_kv_heads, self.k_norm),
                self._heads(v, self.num_kv_heads))

    def new_cache(self, batch: int, max_len: int, *, device=None, dtype=None):
        w = self.out_proj.weight
        if self.is_cross:
            return StaticKV()
        return KVCache(batch, self.num_kv_heads, max_len, self.head_dim,
                       device=device or w.device, dtype=dtype or w.dtype)
