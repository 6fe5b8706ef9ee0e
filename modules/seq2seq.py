"""Encoder-decoder transformer for translation (Vaswani et al., 2017), pre-norm, with RoPE
in self-attention, a shared source/target embedding (joint vocabulary), and greedy and
batched beam-search decoding (Wu et al., 2016, "GNMT", for the length penalty) on the
decoder's KV cache, with cross-attention keys/values computed once per sentence.

Shape legend: B sentences, K beams, S source length, T target length, V vocabulary,
E embed_dim. Token 0 is padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transformer import Transformer


class Seq2SeqTransformer(nn.Module):
    """Args:
        vocab_size: joint source/target vocabulary V.
        embed_dim, encoder_depth, decoder_depth, num_heads, num_kv_heads, mlp_hidden_dim.
        norm, mlp: block variants (``rmsnorm``/``layernorm``, ``swiglu``/``gelu``).
        tie_embeddings: the output projection shares the embedding matrix.
        max_seq_len, rope_theta, drop, attn_drop, backend: as in ``Transformer``.
        pad_id, bos_id, eos_id: special tokens.
    """

    def __init__(self, *, vocab_size: int, embed_dim: int = 256, encoder_depth: int = 3,
                 decoder_depth: int = 3, num_heads: int = 4, num_kv_heads: int | None = None,
                 mlp_hidden_dim: int = 1024, norm: str = "rmsnorm", mlp: str = "swiglu",
                 tie_embeddings: bool = True, max_seq_len: int = 512,
                 rope_theta: float = 10000.0, drop: float = 0.1, attn_drop: float = 0.0,
                 backend: str = "auto", pad_id: int = 0, bos_id: int = 2, eos_id: int = 3):
        super().__init__()
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.max_seq_len = max_seq_len
        shared = dict(embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      mlp_hidden_dim=mlp_hidden_dim, norm=norm, mlp=mlp,
                      rope_theta=rope_theta, max_seq_len=max_seq_len, drop=drop,
                      attn_drop=attn_drop, backend=backend)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.encoder = Transformer(depth=encoder_depth, **shared)
        self.decoder = Transformer(depth=decoder_depth, causal=True, context_dim=embed_dim,
                                   **shared)
        self.lm_head = nn.Linear(embed_dim, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=embed_dim ** -0.5)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.scale = math.sqrt(embed_dim)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src ``(B, S)`` -> memory ``(B, S, E)`` and its key padding mask ``(B, S)``."""
        mask = src != self.pad_id
        return self.encoder(self.embed(src) * self.scale, mask=mask), mask

    def decode(self, tgt: Tensor, memory: Tensor | None, src_mask: Tensor, *,
               caches: list | None = None, positions: int | None = None) -> Tensor:
        """tgt ``(B, T)`` (teacher forcing, or the newest tokens with caches) -> logits."""
        x = self.embed(tgt) * self.scale
        x = self.decoder(x, context=memory, context_mask=src_mask, caches=caches,
                         positions=positions)
        return self.lm_head(x)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, T, V)``; target padding needs no mask: causal
        attention never lets a real token see a later pad, and pads are not scored."""
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask)

    # ----------------------------------------------------------------------- decoding
    def _start(self, memory: Tensor, src_mask: Tensor, beams: int, max_len: int):
        """Caches for B*K rows, cross-attention K/V computed once per sentence then shared."""
        B = memory.shape[0]
        caches = self.decoder.new_caches(B * beams, max_len + 1, device=memory.device,
                                         dtype=memory.dtype)
        for block, (_, cross) in zip(self.decoder.blocks, caches):
            k, v = block.cross_attn._context_kv(memory)
            cross.k, cross.v = (t.repeat_interleave(beams, 0) for t in (k, v))
        return caches, src_mask.repeat_interleave(beams, 0)

    def _step(self, tokens: Tensor, memory, src_mask, caches, use_cache: bool) -> Tensor:
        """Log-probabilities of the next token for each row, ``(rows, V)``."""
        if use_cache:
            logits = self.decode(tokens[:, -1:], None, src_mask, caches=caches)
        else:
            logits = self.decode(tokens, memory, src_mask)
        return F.log_softmax(logits[:, -1].float(), dim=-1)

    def _limits(self, src_mask: Tensor, max_len_a: float, max_len_b: int):
        src_len = src_mask.sum(-1)
        limit = (src_len.float() * max_len_a).ceil().long() + max_len_b  # per sentence
        return limit, max(1, min(int(limit.max()), self.max_seq_len - 1))

    @torch.no_grad()
    def greedy(self, src: Tensor, *, max_len_a: float = 1.5, max_len_b: int = 10,
               use_cache: bool = True) -> list[list[int]]:
        """Greedy decoding (the argmax each step); ids per sentence, without BOS/EOS."""
        memory, src_mask = self.encode(src)
        B = src.shape[0]
        limit, max_len = self._limits(src_mask, max_len_a, max_len_b)
        caches = self._start(memory, src_mask, 1, max_len)[0] if use_cache else None
        tokens = torch.full((B, 1), self.bos_id, dtype=torch.long, device=src.device)
        out: list[list[int]] = [[] for _ in range(B)]
        alive = [True] * B
        for step in range(1, max_len + 1):
            nxt = self._step(tokens, memory, src_mask, caches, use_cache).argmax(-1).tolist()
            for b in range(B):
                if not alive[b]:
                    continue
                if nxt[b] == self.eos_id:
                    alive[b] = False
                    continue
                out[b].append(nxt[b])
                alive[b] = step < int(limit[b])
            if not any(alive):
                break
            tokens = torch.cat([tokens, torch.tensor(nxt, device=src.device)[:, None]], 1)
        return out

    @torch.no_grad()
    def beam_search(self, src: Tensor, *, beam_size: int = 4, length_penalty: float = 1.0,
                    max_len_a: float = 1.5, max_len_b: int = 10,
                    use_cache: bool = True) -> list[list[int]]:
        """Batched beam search.

        Args:
            src: ``(B, S)`` source ids, 0-padded.
            beam_size: K hypotheses per sentence; 1 is greedy decoding.
            length_penalty: alpha; a finished hypothesis scores ``logp / len ** alpha``.
            max_len_a, max_len_b: at most ``a * source_length + b`` target tokens.
            use_cache: decode incrementally with the KV cache (False recomputes the
                whole prefix and the cross-attention each step).

        Returns:
            the best hypothesis of each sentence, as ids without BOS/EOS.
        """
        K, dev = beam_size, src.device
        memory, src_mask = self.encode(src)
        B = src.shape[0]
        limit, max_len = self._limits(src_mask, max_len_a, max_len_b)
        if use_cache:
            caches, rows_mask = self._start(memory, src_mask, K, max_len)
            rows_memory = None
        else:
            caches, rows_mask = None, src_mask.repeat_interleave(K, 0)
            rows_memory = memory.repeat_interleave(K, 0)
        tokens = torch.full((B * K, 1), self.bos_id, dtype=torch.long, device=dev)
        scores = torch.full((B, K), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # all beams start identical: keep one alive
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for step in range(1, max_len + 1):
            logp = self._step(tokens, rows_memory, rows_mask, caches, use_cache)  # (B*K, V)
            V = logp.shape[-1]
            cand = (scores.unsqueeze(-1) + logp.view(B, K, V)).view(B, K * V)
            top_scores, top_idx = cand.topk(2 * K, dim=-1)  # (B, 2K)
            beam_idx, tok = top_idx // V, top_idx % V
            is_eos = (tok == self.eos_id) | (step >= limit).unsqueeze(-1)
            new_scores = torch.full((B, K), float("-inf"), device=dev)
            new_rows = torch.zeros(B, K, dtype=torch.long, device=dev)
            new_tok = torch.full((B, K), self.pad_id, dtype=torch.long, device=dev)
            ts, bi, tk, eos = (t.tolist() for t in (top_scores, beam_idx, tok, is_eos))
            for b in range(B):
                if done[b]:
                    continue
                kept = 0
                for j in range(2 * K):
                    if ts[b][j] == float("-inf"):
                        break
                    row = b * K + bi[b][j]
                    if eos[b][j]:
                        if j < K:  # only an end among the K best counts (as in fairseq)
                            hyp = tokens[row, 1:].tolist()
                            if tk[b][j] != self.eos_id:
                                hyp.append(tk[b][j])
                            norm = len(hyp) + 1 if tk[b][j] == self.eos_id else len(hyp)
                            finished[b].append((ts[b][j] / max(norm, 1) ** length_penalty,
                                                hyp))
                        continue
                    new_scores[b, kept], new_rows[b, kept] = ts[b][j], row
                    new_tok[b, kept] = tk[b][j]
                    kept += 1
                    if kept == K:
                        break
                if len(finished[b]) >= K or kept == 0:
                    done[b] = True
            if bool(done.all()):
                break
            rows = new_rows.flatten()
            tokens = torch.cat([tokens[rows], new_tok.view(-1, 1)], dim=1)
            scores = new_scores.masked_fill(done.unsqueeze(-1), float("-inf"))
            if use_cache:  # cross-attention K/V rows are shared by a sentence's beams
                for self_cache, _ in caches:
                    self_cache.reorder(rows)
        return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]
