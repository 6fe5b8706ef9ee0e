"""A Llama-style decoder-only language model (Touvron et al., 2023, "LLaMA"):
token embedding, pre-norm blocks with RMSNorm, SwiGLU and RoPE, grouped-query attention,
final RMSNorm, and a (optionally tied) output projection.

Shape legend: B batch, L tokens, V vocabulary, E embed_dim.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .transformer import Transformer


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
        norm_eps, drop, attn_drop: as in ``Transformer``.
        backend: attention kernel (``auto``, ``sdpa``, ``math``, ``flash``).
    """

    def __init__(self, *, vocab_size: int, embed_dim: int, depth: int, num_heads: int,
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 mlp_hidden_dim: int | None = None, max_seq_len: int = 1024, rope_theta: float = 10000.0,
                 tie_embeddings: bool = False, qk_norm: bool = False, norm_eps: float = 1e-5,
                 drop: float = 0.0, attn_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        if mlp_hidden_dim is None:
            mlp_hidden_dim = 64 * math.ceil(8 * embed_dim / 3 / 64)
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.decoder = Transformer(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, mlp_hidden_dim=mlp_hidden_dim, norm="rmsnorm", mlp="swiglu", norm_eps=norm_eps,
            causal=True, rope_theta=rope_theta, max_seq_len=max_seq_len, qk_norm=qk_norm, drop=drop,
            attn_drop=attn_drop, backend=backend)
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
                positions: int | Tensor | None = None) -> Tensor:
        """tokens ``(B, L)`` -> logits ``(B, L, V)``.

        Args:
            mask: ``(B, kv_len)`` key padding mask (True = real token); with caches,
                kv_len includes the cached tokens.
            caches: from ``new_caches``; the new tokens are appended.
            positions: RoPE positions (int offset or ``(B, L)``), default cache length.
        """
        x = self.decoder(self.embed(tokens), mask=mask, caches=caches, positions=positions)
        return self.lm_head(x)

    def new_caches(self, batch: int, max_len: int | None = None, *, device=None, dtype=None):
        return self.decoder.new_caches(batch, max_len or self.max_seq_len, device=device,
                                       dtype=dtype)

    def num_params(self, exclude_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n
