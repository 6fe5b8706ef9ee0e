"""Encoder-decoder transformer for translation (Vaswani et al., 2017), pre-norm, with RoPE
in self-attention, a shared source/target embedding (joint vocabulary), and greedy and
batched beam-search decoding (``modules.generation``) on the decoder's KV cache, with
cross-attention keys/values computed once per sentence.

Shape legend: B sentences, K beams, S source length, T target length, V vocabulary,
E embed_dim. Token 0 is padding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .generation import beam_search, greedy_search
from .transformer import Transformer


class Seq2SeqTransformer(nn.Module):
    """Args:
        vocab_size: joint source/target vocabulary V.
        embed_dim, encoder_depth, decoder_depth, num_heads, num_kv_heads, mlp_hidden_dim.
        norm, mlp: block variants (``rmsnorm``/``layernorm``, ``swiglu``/``gelu``).
        tie_embeddings: the output projection shares the embedding matrix.
        qk_norm: RMSNorm on each head's queries and keys, in self- and cross-attention
            (see ``MultiHeadAttention``).
        max_seq_len, rope_theta, drop, attn_drop, backend: as in ``Transformer``.
        pad_id, bos_id, eos_id: special tokens.
    """

    def __init__(self, *, vocab_size: int, embed_dim: int = 256, encoder_depth: int = 3,
                 decoder_depth: int = 3, num_heads: int = 4, num_kv_heads: int | None = None,
                 mlp_hidden_dim: int = 1024, norm: str = "rmsnorm", mlp: str = "swiglu",
                 tie_embeddings: bool = True, qk_norm: bool = False, max_seq_len: int = 512,
                 rope_theta: float = 10000.0, drop: float = 0.1, attn_drop: float = 0.0,
                 backend: str = "auto", pad_id: int = 0, bos_id: int = 2, eos_id: int = 3):
        super().__init__()
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.max_seq_len = max_seq_len
        shared = dict(embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      mlp_hidden_dim=mlp_hidden_dim, norm=norm, mlp=mlp,
                      rope_theta=rope_theta, max_seq_len=max_seq_len, qk_norm=qk_norm,
                      drop=drop, attn_drop=attn_drop, backend=backend)
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
               caches: list | None = None, positions: int | None = None,
               head: bool = True) -> Tensor:
        """tgt ``(B, T)`` (teacher forcing, or the newest tokens with caches) -> logits
        (``head=False``: the features before the output layer)."""
        x = self.embed(tgt) * self.scale
        x = self.decoder(x, context=memory, context_mask=src_mask, caches=caches,
                         positions=positions)
        return self.lm_head(x) if head else x

    def forward(self, src: Tensor, tgt_in: Tensor, *, head: bool = True) -> Tensor:
        """Teacher-forced logits ``(B, T, V)``; target padding needs no mask: causal
        attention never lets a real token see a later pad, and pads are not scored."""
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask, head=head)

    # ----------------------------------------------------------------------- decoding
    def _decode_limits(self, src_mask: Tensor, max_len_a: float, max_len_b: int) -> Tensor:
        """Per-sentence target limits ``(B,)``: ``ceil(a * source_length) + b``, within
        ``[1, max_seq_len - 1]`` so that BOS, the hypothesis and its EOS fit the model."""
        limit = (src_mask.sum(-1).float() * max_len_a).ceil().long() + max_len_b
        return limit.clamp(1, max(1, self.max_seq_len - 1))

    @torch.no_grad()
    def greedy(self, src: Tensor, *, max_len_a: float = 1.5, max_len_b: int = 10,
               use_cache: bool = True, no_repeat_ngram_size: int = 0) -> list[list[int]]:
        """Greedy decoding (the argmax each step); ids per sentence, without BOS/EOS.
        Arguments as in ``beam_search``."""
        memory, src_mask = self.encode(src)
        limit = self._decode_limits(src_mask, max_len_a, max_len_b)
        return greedy_search(Seq2SeqSteps(self, memory, src_mask, use_cache=use_cache),
                             src.shape[0], max_len=limit, bos_id=self.bos_id,
                             eos_id=self.eos_id, no_repeat_ngram_size=no_repeat_ngram_size)

    @torch.no_grad()
    def beam_search(self, src: Tensor, *, beam_size: int = 4, length_penalty: float = 1.0,
                    max_len_a: float = 1.5, max_len_b: int = 10, use_cache: bool = True,
                    no_repeat_ngram_size: int = 0) -> list[list[int]]:
        """Batched beam search (``modules.generation.beam_search``).

        Args:
            src: ``(B, S)`` source ids, 0-padded.
            beam_size: K hypotheses per sentence; 1 is greedy decoding.
            length_penalty: alpha; a finished hypothesis scores ``logp / len ** alpha``.
            max_len_a, max_len_b: at most ``a * source_length + b`` target tokens (and at
                most ``max_seq_len - 1``).
            use_cache: decode incrementally with the KV cache (False recomputes the
                whole prefix and the cross-attention each step).
            no_repeat_ngram_size: n > 0 never repeats an n-gram within a hypothesis.

        Returns:
            the best hypothesis of each sentence, as ids without BOS/EOS.
        """
        memory, src_mask = self.encode(src)
        limit = self._decode_limits(src_mask, max_len_a, max_len_b)
        hyps = beam_search(Seq2SeqSteps(self, memory, src_mask, use_cache=use_cache),
                           src.shape[0], max_len=limit, bos_id=self.bos_id,
                           eos_id=self.eos_id, pad_id=self.pad_id, beam_size=beam_size,
                           length_penalty=length_penalty,
                           no_repeat_ngram_size=no_repeat_ngram_size)
        return [h.tokens for h in hyps]


class Seq2SeqState(NamedTuple):
    """Decoding state of B * K rows: self-attention caches holding the cross-attention
    keys/values (with the cache), or the memory repeated per row (without), and the
    source key padding mask ``(rows, S)``."""

    caches: list | None
    memory: Tensor | None
    src_mask: Tensor


class Seq2SeqSteps:
    """The ``BeamDecoder`` steps of a ``Seq2SeqTransformer`` over one encoded source batch.

    Args:
        model: the network.
        memory, src_mask: ``encode``'s output, ``(B, S, E)`` and ``(B, S)``.
        use_cache: decode incrementally with the KV cache, the cross-attention keys/values
            computed once per sentence; False recomputes the whole prefix every step.
    """

    def __init__(self, model: Seq2SeqTransformer, memory: Tensor, src_mask: Tensor, *,
                 use_cache: bool = True):
        self.model, self.memory, self.src_mask = model, memory, src_mask
        self.use_cache = use_cache

    def start(self, beams: int, max_len: int) -> Seq2SeqState:
        rows_mask = self.src_mask.repeat_interleave(beams, 0)
        if not self.use_cache:
            return Seq2SeqState(None, self.memory.repeat_interleave(beams, 0), rows_mask)
        decoder = self.model.decoder
        caches = decoder.new_caches(rows_mask.shape[0], max_len + 1,
                                    device=self.memory.device, dtype=self.memory.dtype)
        for block, (_, cross) in zip(decoder.blocks, caches):
            k, v = block.cross_attn._context_kv(self.memory)
            cross.k, cross.v = (t.repeat_interleave(beams, 0) for t in (k, v))
        return Seq2SeqState(caches, None, rows_mask)

    def step(self, tokens: Tensor, state: Seq2SeqState) -> Tensor:
        if state.caches is not None:
            logits = self.model.decode(tokens[:, -1:], None, state.src_mask,
                                       caches=state.caches)
        else:
            logits = self.model.decode(tokens, state.memory, state.src_mask)
        return F.log_softmax(logits[:, -1].float(), dim=-1)

    def reorder(self, state: Seq2SeqState, rows: Tensor) -> Seq2SeqState:
        # Cross-attention K/V rows are the same for all of a sentence's beams: not moved.
        if state.caches is not None:
            for self_cache, _ in state.caches:
                self_cache.reorder(rows)
        return state
