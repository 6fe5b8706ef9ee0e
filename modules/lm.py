"""A Llama-style decoder-only language model (Touvron et al., 2023, "LLaMA"):
token embedding, pre-norm blocks with RMSNorm, SwiGLU and RoPE, grouped-query attention,
final RMSNorm, and a (optionally tied) output projection. Two optional tables, both cheap
in compute: hashed bigram embeddings (a row for each pair of a token and the one before it,
hashed into a fixed number of rows and added to the token's embedding; the 2-gram input
embeddings of Huang et al., 2025, "Over-Tokenized Transformer"), and value embeddings (a
per-token table added to the attention values of the first blocks, as in the
modded-nanogpt speedruns).

Shape legend: B batch, L tokens, V vocabulary, E embed_dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .transformer import Transformer, cache_length


class CausalLM(nn.Module):
    """Decoder-only LM.

    Args:
        vocab_size: V.
        embed_dim, depth, num_heads, num_kv_heads, head_dim: model sizes.
        mlp_hidden_dim: SwiGLU width (Llama uses about 8/3 * E rounded up).
        max_seq_len: longest context; sizes the RoPE table and caches by default.
        rope_theta: RoPE base.
        tie_embeddings: share the embedding and output matrices.
        qk_norm: RMSNorm on each head's queries and keys (as Qwen3).
        bigram_buckets: rows of the hashed bigram table (0: none). Row
            ``bigram_index(previous, token)`` is added to the token's embedding; a token
            at position 0 has no previous token and uses ``vocab_size`` in its place.
        bigram_drop: dropout on the bigram rows in training (0: none). Over several passes
            the table learns the training text's pairs by heart; dropping part of each row
            makes the model keep predicting from the context as well.
        value_embeds: blocks 0 .. value_embeds - 1 each get a token table of width
            ``num_kv_heads * head_dim`` whose row for a token is added to that token's
            attention values (0: none, a plain Llama). Cheap in compute; the tables are
            ``nn.Embedding`` layers, so ``optimizer.embedding_lr_scale`` applies to them.
        norm_eps, drop, attn_drop: as in ``Transformer``.
        backend: attention kernel (``auto``, ``sdpa``, ``math``, ``flash``).
    """

    def __init__(self, *, vocab_size: int, embed_dim: int, depth: int, num_heads: int,
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 mlp_hidden_dim: int | None = None, max_seq_len: int = 1024, rope_theta: float = 10000.0,
                 tie_embeddings: bool = False, qk_norm: bool = False, bigram_buckets: int = 0,
                 bigram_drop: float = 0.0, value_embeds: int = 0, norm_eps: float = 1e-5,
                 drop: float = 0.0, attn_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        if not _whole(value_embeds) or value_embeds < 0 or value_embeds > max(depth, 0):
            raise ValueError(f"value_embeds={value_embeds!r}; expected a whole number of "
                             f"blocks from 0 to depth={depth}")
        if not _whole(bigram_buckets) or bigram_buckets < 0:
            raise ValueError(f"bigram_buckets={bigram_buckets!r}; expected a whole number "
                             f">= 0 (0: no bigram table)")
        if isinstance(bigram_drop, bool) or not isinstance(bigram_drop, (int, float)) \
                or not 0.0 <= bigram_drop < 1.0:
            raise ValueError(f"bigram_drop={bigram_drop!r}; expected a number in [0, 1) "
                             f"(0: no dropout on the bigram rows)")
        if mlp_hidden_dim is None:
            mlp_hidden_dim = 64 * math.ceil(8 * embed_dim / 3 / 64)
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.bigram = nn.Embedding(bigram_buckets, embed_dim) if bigram_buckets else None
        self.bigram_drop = nn.Dropout(bigram_drop)
        self.decoder = Transformer(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, mlp_hidden_dim=mlp_hidden_dim, norm="rmsnorm", mlp="swiglu", norm_eps=norm_eps,
            causal=True, rope_theta=rope_theta, max_seq_len=max_seq_len, qk_norm=qk_norm, drop=drop,
            attn_drop=attn_drop, backend=backend)
        kv_dim = (num_kv_heads or num_heads) * (head_dim or embed_dim // num_heads)
        self.value_embeds = nn.ModuleList(nn.Embedding(vocab_size, kv_dim)
                                          for _ in range(value_embeds))
        self.lm_head = nn.Linear(embed_dim, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init)
        # GPT-2 / Llama practice: scale residual output projections by depth.
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: Tensor, *, mask: Tensor | None = None, caches: list | None = None,
                positions: int | Tensor | None = None, head: bool = True) -> Tensor:
        """tokens ``(B, L)`` -> logits ``(B, L, V)``.

        Args:
            mask: ``(B, kv_len)`` key padding mask (True = real token); with caches,
                kv_len includes the cached tokens.
            caches: from ``new_caches``; the new tokens are appended.
            positions: RoPE positions (int offset or ``(B, L)``), default cache length.
                Position 0 starts a sequence: the bigram table sees no previous token
                there (left-padded prompts decode as they do alone).
            head: False returns the features before the output layer ``(B, L, E)``
                (for ``modules.losses.head_cross_entropy``).
        """
        x = self.embed(tokens)
        if self.bigram is not None:
            x = x + self.bigram_drop(self.bigram(self._bigram_rows(tokens, caches, positions)))
        values = None
        if len(self.value_embeds):
            values = [table(tokens) for table in self.value_embeds]
            values += [None] * (len(self.decoder.blocks) - len(values))
        x = self.decoder(x, mask=mask, caches=caches, positions=positions, values=values)
        return self.lm_head(x) if head else x

    def _bigram_rows(self, tokens: Tensor, caches: LMCaches | None,
                     positions: int | Tensor | None) -> Tensor:
        """Bigram table rows ``(B, L)``: each token with the one before it, from the cache
        for the first new token; ``vocab_size`` where a position is 0."""
        B, L = tokens.shape
        none = torch.full((B, 1), self.vocab_size, dtype=tokens.dtype, device=tokens.device)
        before = none if caches is None else caches.last[:, None]
        prev = torch.cat([before, tokens[:, :-1]], 1)
        if isinstance(positions, Tensor):
            starts = positions == 0
        else:
            offset = positions if positions is not None else \
                (cache_length(caches) if caches is not None else 0)
            starts = (torch.arange(L, device=tokens.device) + offset == 0)[None]
        prev = torch.where(starts, none, prev)
        if caches is not None:
            caches.last.copy_(tokens[:, -1])
        return bigram_index(prev, tokens, self.bigram.num_embeddings)

    def new_caches(self, batch: int, max_len: int | None = None, *, device=None,
                   dtype=None) -> LMCaches:
        caches = LMCaches(self.decoder.new_caches(batch, max_len or self.max_seq_len,
                                                  device=device, dtype=dtype))
        caches.last = torch.full((batch,), self.vocab_size, dtype=torch.long,
                                 device=device or self.embed.weight.device)
        return caches

    def num_params(self, exclude_embeddings: bool = True) -> int:
        """Parameters; with ``exclude_embeddings`` without the input tables (token,
        bigram and value embeddings: lookups, no compute)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding)
                     and m.weight is not self.lm_head.weight)
        return n


class LMCaches(list):
    """The decoder's per-block caches (``Transformer.new_caches``) and ``last``, each row's
    last token so far, which the bigram table pairs with the next one."""

    last: Tensor


def bigram_index(prev: Tensor, tokens: Tensor, buckets: int) -> Tensor:
    """Row of the pair (``prev``, ``tokens``) in a table of ``buckets`` rows:
    ``((prev * 1000003 + tokens * 972663749) mod (2^31 - 1)) mod buckets``, a universal
    (Carter-Wegman) hash; the prime modulus mixes the bits, so ids that share their low bits
    do not crowd into few rows, and nothing overflows for ids below 2^31."""
    return (prev * 1_000_003 + tokens * 972_663_749) % 2_147_483_647 % buckets


def _whole(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool)
