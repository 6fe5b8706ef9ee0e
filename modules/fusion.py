"""Text-image models: a contrastive dual encoder with a cross-attention fusion encoder.

- Dual encoder (Radford et al., 2021, "CLIP"): the ViT of ``modules.vit`` for images and a
  transformer text encoder with padding masks for captions, each projected to a joint
  space; trained with the symmetric contrastive loss and a learned temperature, or the
  sigmoid loss with a learned bias (Zhai et al., 2023, "SigLIP").
- Fusion encoder (Li et al., 2021, "ALBEF"; 2022, "BLIP"): transformer blocks whose text
  tokens cross-attend to the image's patch tokens. Its pooled output scores image-text
  matching (a re-ranker of the contrastive top-k) and answers questions about the image
  (classification over the answer vocabulary).
- Sentence head (optional): vectors of a frozen sentence encoder (``modules.sentence``) for
  the same texts, with a projection and a temperature of their own; retrieval adds their
  cosine to the text encoder's, so words the captions never taught still carry meaning.
- Pair memory (optional, retrieval only): the training pairs' embeddings kept beside the
  model; a text also meets an image through the training captions nearest to it in the
  sentence encoder's space (their images stand in for it), and an image a text through the
  training images nearest to it (their captions' sentence vectors), with the hubness of
  each query taken out (``modules.memory``).

Every attention here is the shared core's ``MultiHeadAttention`` (``modules.transformer``).

Shape legend: B batch, L text length, N image tokens, E width, D joint embedding, A answers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .memory import PairMemory, memory_scores
from .mha import StaticKV
from .transformer import Transformer
from .vit import VisionTransformer


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``(B, L, E)`` over the positions where ``mask`` ``(B, L)`` is True."""
    if mask is None:
        return x.mean(1)
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


class TextEncoder(nn.Module):
    """Token ids ``(B, L)`` with a padding mask -> token states ``(B, L, E)`` and a pooled
    vector ``(B, E)``.

    Args:
        vocab_size, embed_dim, depth, num_heads, mlp_ratio: sizes.
        max_len: longest text (learned position table; RoPE table size).
        pos_embed: ``"learned"`` (added to the token embeddings, as OpenCLIP) or ``"rope"``.
        causal: causal self-attention (OpenCLIP's text tower) instead of bidirectional.
        pool: ``"mean"`` (over the real tokens), ``"first"`` or ``"last"`` (the last real
            token: OpenCLIP's end-of-text pooling).
        norm_eps, qkv_bias, drop, attn_drop, drop_path_rate, layer_scale, backend: as in
            ``Transformer``.
    """

    def __init__(self, *, vocab_size: int, embed_dim: int = 128, depth: int = 3,
                 num_heads: int = 4, mlp_ratio: float = 4.0, max_len: int = 32,
                 pos_embed: str = "learned", causal: bool = False, pool: str = "mean",
                 norm_eps: float = 1e-5, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path_rate: float = 0.0,
                 layer_scale: float | None = None, backend: str = "auto"):
        super().__init__()
        if pos_embed not in ("learned", "rope"):
            raise ValueError(f"text pos_embed must be 'learned' or 'rope', got {pos_embed!r}")
        if pool not in ("mean", "first", "last"):
            raise ValueError(f"text pool must be 'mean', 'first' or 'last', got {pool!r}")
        self.max_len, self.pool, self.causal = max_len, pool, causal
        self.token_embed = nn.Embedding(vocab_size, embed_dim)
        self.pos_embed = (nn.Parameter(torch.randn(1, max_len, embed_dim) * 0.01)
                          if pos_embed == "learned" else None)
        self.drop = nn.Dropout(drop)
        self.encoder = Transformer(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_hidden_dim=int(embed_dim * mlp_ratio), norm="layernorm", mlp="gelu",
            norm_eps=norm_eps, causal=causal,
            rope_theta=10000.0 if pos_embed == "rope" else None, max_seq_len=max_len,
            qkv_bias=qkv_bias, proj_bias=True, mlp_bias=True, attn_drop=attn_drop, drop=drop,
            drop_path_rate=drop_path_rate, layer_scale=layer_scale, backend=backend)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, L)`` ids and ``(B, L)`` mask (True = real token) -> ``(B, L, E)``."""
        if ids.shape[1] > self.max_len:
            raise ValueError(f"text of {ids.shape[1]} tokens is longer than the text "
                             f"encoder's max_len={self.max_len}")
        x = self.token_embed(ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, : ids.shape[1]]
        # A causal encoder needs no key padding mask for its real tokens (padding comes
        # after them); passing it anyway keeps padded rows finite.
        return self.encoder(self.drop(x), mask=mask)

    def pooled(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        if self.pool == "mean":
            return masked_mean(tokens, mask)
        if self.pool == "first":
            return tokens[:, 0]
        last = (mask.long().sum(1) - 1 if mask is not None
                else torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device))
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]


class FusionEncoder(nn.Module):
    """Text tokens cross-attending to image tokens; pooled output ``(B, E)``.

    Args:
        embed_dim: the text width; context_dim: the image token width.
        depth, num_heads, mlp_ratio, norm_eps, drop, backend: block sizes.
    """

    def __init__(self, *, embed_dim: int, context_dim: int, depth: int = 2,
                 num_heads: int = 4, mlp_ratio: float = 4.0, norm_eps: float = 1e-5,
                 drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.blocks = Transformer(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_hidden_dim=int(embed_dim * mlp_ratio), norm="layernorm", mlp="gelu",
            norm_eps=norm_eps, context_dim=context_dim, qkv_bias=True, proj_bias=True,
            mlp_bias=True, drop=drop, backend=backend)

    def forward(self, text: Tensor, text_mask: Tensor | None, image: Tensor,
                image_index: Tensor | None = None) -> Tensor:
        """Text ``(B, L, E)`` (mask ``(B, L)``) attending to image tokens ``(B, N, Ev)``, or
        to ``image[image_index]`` when ``image_index`` ``(B,)`` is given: each image's keys and
        values are then projected once however many texts attend to it (image-text matching
        pairs every image with two or three texts)."""
        caches = None
        if image_index is not None:
            caches = []
            for block in self.blocks.blocks:
                kv = StaticKV()
                k, v = block.cross_attn._context_kv(image)
                kv.k, kv.v = k[image_index], v[image_index]
                caches.append((None, kv))
            image = None
        h = self.blocks(text, mask=text_mask, context=image, caches=caches)
        return masked_mean(h, text_mask)


class TextImageModel(nn.Module):
    """Dual encoder + fusion encoder (see the module docstring).

    Args:
        vision: ``VisionTransformer`` arguments (its head is the projection to the joint
            space, so ``num_classes`` is ignored).
        text: ``TextEncoder`` arguments.
        embed_dim: joint embedding size D.
        fusion_depth: cross-attention blocks (0: no fusion encoder, dual encoder only).
        fusion_heads: their heads (default: the text encoder's).
        fusion_mlp_ratio: their feed-forward width over the text width.
        num_answers: size of the answer classifier on the fusion output (0: none).
        fusion_image_pos: add the ViT's position embeddings to the image tokens again where
            the fusion encoder reads them (as DETR adds them to every cross-attention's
            keys): after the image tower the tokens hold little explicit position, and
            questions such as "is the red circle left of the blue square?" stay at chance
            without it (measured on ``data=shapes``).
        loss: ``"clip"`` (softmax over the batch, both directions) or ``"siglip"``.
        init_logit_scale, init_logit_bias: the learned temperature (log of the scale) and
            the sigmoid loss's bias.
        proj_bias: bias on the projections into the joint space.
        sentence_dim: width of vectors from a frozen sentence encoder
            (``modules.sentence``; 0: none). They get a projection of their own into the
            joint space, trained with its own contrastive loss and temperature against the
            same image embeddings; for retrieval a text's embedding is then its own plus
            ``sentence_weight`` x the projected sentence vector, so a pair's score is the sum
            of the two cosines. Words no training caption has are read by the sentence
            encoder, which has met them.
        sentence_weight: that weight (0: the sentence head is trained but not used).
    """

    def __init__(self, *, vision: dict, text: dict, embed_dim: int = 128,
                 fusion_depth: int = 2, fusion_heads: int | None = None,
                 fusion_mlp_ratio: float = 4.0, fusion_image_pos: bool = False,
                 num_answers: int = 0, loss: str = "clip",
                 init_logit_scale: float = math.log(1 / 0.07), init_logit_bias: float = -10.0,
                 proj_bias: bool = True, sentence_dim: int = 0,
                 sentence_weight: float = 1.0, backend: str = "auto"):
        super().__init__()
        if loss not in ("clip", "siglip"):
            raise ValueError(f"loss must be 'clip' or 'siglip', got {loss!r}")
        if fusion_depth < 0:
            raise ValueError(f"fusion_depth={fusion_depth}; expected 0 (no fusion encoder) "
                             f"or more blocks")
        vision = {**dict(vision), "num_classes": embed_dim, "backend": backend}
        text = {**dict(text), "backend": backend}
        self.loss_kind = loss
        self.visual = VisionTransformer(**vision)
        self.text = TextEncoder(**text)
        if not proj_bias:
            self.visual.head = nn.Linear(self.visual.head.in_features, embed_dim, bias=False)
        text_dim = self.text.token_embed.embedding_dim
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=proj_bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = (nn.Parameter(torch.tensor(float(init_logit_bias)))
                           if loss == "siglip" else None)
        vision_dim = self.visual.head.in_features
        self.fusion = (FusionEncoder(embed_dim=text_dim, context_dim=vision_dim,
                                     depth=fusion_depth,
                                     num_heads=fusion_heads or text.get("num_heads", 4),
                                     mlp_ratio=fusion_mlp_ratio,
                                     backend=backend)
                       if fusion_depth > 0 else None)
        self.fusion_image_pos = fusion_image_pos
        self.match_head = nn.Linear(text_dim, 1) if self.fusion is not None else None
        if num_answers and self.fusion is None:
            raise ValueError("num_answers needs the fusion encoder (fusion_depth > 0)")
        self.answer_head = nn.Linear(text_dim, num_answers) if num_answers else None
        if sentence_dim < 0:
            raise ValueError(f"sentence_dim={sentence_dim}; expected 0 (no sentence head) or "
                             f"the width of the sentence encoder's vectors")
        self.sentence_proj = (nn.Linear(sentence_dim, embed_dim, bias=proj_bias)
                              if sentence_dim else None)
        self.sentence_logit_scale = (nn.Parameter(torch.tensor(float(init_logit_scale)))
                                     if sentence_dim else None)
        self.sentence_weight = float(sentence_weight)

    # -- encoders ------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(B, C, H, W)`` -> (unit embeddings ``(B, D)``, tokens ``(B, N, Ev)``)."""
        tokens = self.visual.features(images)
        return F.normalize(self.visual.head(self.visual.pooled(tokens)), dim=-1), tokens

    def no_muon(self) -> set[str]:
        """Under ``optimizer=muon`` the projections into the shared space stay with AdamW,
        as output layers, like the image tower's ``visual.head``."""
        return {f"{name}.weight" for name in ("text_proj", "sentence_proj")
                if getattr(self, name) is not None}

    def encode_text(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Ids and mask ``(B, L)`` -> (unit embeddings ``(B, D)``, tokens ``(B, L, Et)``)."""
        tokens = self.text(ids, mask)
        return F.normalize(self.text_proj(self.text.pooled(tokens, mask)), dim=-1), tokens

    def encode_sentences(self, vectors: Tensor) -> Tensor:
        """Sentence-encoder vectors ``(B, sentence_dim)`` -> unit embeddings ``(B, D)``."""
        if self.sentence_proj is None:
            raise ValueError("this model has no sentence head (sentence_dim=0)")
        return F.normalize(self.sentence_proj(vectors), dim=-1)

    def retrieval_text(self, text_emb: Tensor, vectors: Tensor | None) -> Tensor:
        """The text side of retrieval and zero-shot scores: ``text_emb`` (from
        ``encode_text``) plus ``sentence_weight`` x the sentence head's embedding of the same
        texts' sentence-encoder ``vectors`` (no sentence head: ``text_emb``). Not of unit
        length: ``similarity`` then sums the cosines."""
        if self.sentence_proj is None:
            return text_emb
        if vectors is None:
            raise ValueError("this model has a sentence head: give the texts' sentence "
                             "vectors")
        return text_emb + self.sentence_weight * self.encode_sentences(vectors)

    # -- heads ---------------------------------------------------------------------------
    def similarity(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Logits ``(B_img, B_txt)``: scaled cosine similarity (+ bias for SigLIP)."""
        logits = self.logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def sentence_similarity(self, image_emb: Tensor, sentence_emb: Tensor) -> Tensor:
        """Logits ``(B_img, B_txt)`` of the sentence head's loss: its own temperature (and,
        for SigLIP, the shared bias)."""
        logits = self.sentence_logit_scale.exp().clamp(max=100) * image_emb @ sentence_emb.T
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def memory_similarity(self, image_emb: Tensor, text_emb: Tensor, sentences: Tensor,
                          memory: PairMemory, **settings) -> Tensor:
        """Logits ``(B_img, B_txt)`` through the training pairs: ``memory_scores`` (of the
        joint-space embeddings, the texts' ``retrieval_text``, and their unit sentence
        vectors) at the contrastive temperature."""
        scores = memory_scores(image_emb, text_emb, sentences, memory, **settings)
        logits = self.logit_scale.exp().clamp(max=100) * scores
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def fuse(self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor,
             image_index: Tensor | None = None) -> Tensor:
        """The fusion encoder's pooled output ``(B, Et)`` for aligned rows of text and image
        tokens (or ``image_tokens[image_index]``, see ``FusionEncoder``)."""
        if self.fusion_image_pos:
            image_tokens = image_tokens + self.visual.pos_embed
        return self.fusion(text_tokens, text_mask, image_tokens, image_index)

    def match_logits(self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor,
                     image_index: Tensor | None = None) -> Tensor:
        """Image-text matching logit ``(B,)`` (arguments as ``fuse``)."""
        return self.match_head(self.fuse(text_tokens, text_mask, image_tokens,
                                         image_index)).squeeze(-1)

    def answer_logits(self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor,
                      image_index: Tensor | None = None) -> Tensor:
        """Answer logits ``(B, A)`` for questions (text) about images (or about
        ``image_tokens[image_index]``: several questions per image, see ``FusionEncoder``)."""
        if self.answer_head is None:
            raise ValueError("this model has no answer head (num_answers=0)")
        return self.answer_head(self.fuse(text_tokens, text_mask, image_tokens, image_index))

    def forward(self, images: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Similarity logits between every image and every text of a batch."""
        return self.similarity(self.encode_image(images)[0], self.encode_text(ids, mask)[0])


def contrastive_loss(logits: Tensor, kind: str, rows: Tensor | None = None,
                     positive: Tensor | None = None) -> Tensor:
    """Loss over an image-by-text logit matrix ``(B, B)`` whose diagonal holds the pairs.

    ``kind="clip"``: mean of the cross entropies image->text and text->image.
    ``kind="siglip"``: each pair an independent binary decision (+1 on the diagonal, -1
    elsewhere), summed over texts, averaged over images.
    ``rows``: a subset of row (and column) indices to average over (this rank's share of a
    gathered batch); default all.
    ``positive``: boolean ``(B, B)``, True where image i and text j belong together beyond
    the diagonal (an identical text, the same image): the CLIP target is then spread evenly
    over a row's positives and SigLIP counts them as +1, so a duplicate is never pushed
    away as a negative. Default: the diagonal only.
    """
    n = logits.shape[0]
    if positive is None:
        positive = torch.eye(n, dtype=torch.bool, device=logits.device)
    pos = positive.to(logits.dtype)
    if kind == "clip":
        per_i = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1)
        per_t = -(pos.T / pos.sum(0)[:, None] * F.log_softmax(logits.T, 1)).sum(1)
        if rows is not None:
            per_i, per_t = per_i[rows], per_t[rows]
        return (per_i.mean() + per_t.mean()) / 2
    per_i = -F.logsigmoid((2 * pos - 1) * logits).sum(1)
    if rows is not None:
        per_i = per_i[rows]
    return per_i.mean()


def hard_negatives(sim: Tensor, same: Tensor, generator: torch.Generator | None = None
                   ) -> Tensor:
    """For each row of ``sim`` ``(B, B)``, a column sampled with probability softmax(sim)
    among the columns where ``same`` is False (not the pair itself, nor an identical
    caption). A row without any candidate (a batch of one caption) draws uniformly."""
    # Masked before the softmax: a positive far above the negatives (logit scale 100)
    # would otherwise underflow every negative's weight and make the draw uniform.
    logits = sim.float().masked_fill(same, float("-inf"))
    logits[same.all(-1)] = 0.0
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
