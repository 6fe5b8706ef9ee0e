"""A memory of training pairs that retrieval scores through: a text meets an image also
through the training captions nearest to it in a sentence encoder's space (their images
stand in for it), an image a text through the training images nearest to it (their
captions' sentence vectors), with each query's hubness taken out (``memory_scores``).
``modules.fusion.TextImageModel.memory_similarity`` scales these scores as logits.

Shape legend: N memory pairs, D joint embedding, S sentence-vector width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PairMemory:
    """Training pairs as a model sees them: ``images`` ``(N, D)`` unit image embeddings,
    ``texts`` ``(N, D)`` their captions' retrieval embeddings
    (``TextImageModel.retrieval_text``), ``sentences`` ``(N, S)`` the captions' unit
    sentence vectors."""

    images: Tensor
    texts: Tensor
    sentences: Tensor

    def state(self) -> dict[str, Tensor]:
        return {"images": self.images, "texts": self.texts, "sentences": self.sentences}

    @classmethod
    def from_state(cls, state, embed_dim: int, sentence_dim: int) -> PairMemory:
        """The memory of ``state()``, its shapes checked against the model's widths."""
        want = {"images": embed_dim, "texts": embed_dim, "sentences": sentence_dim}
        if not isinstance(state, dict) or set(state) != set(want) or not all(
                isinstance(v, Tensor) and v.is_floating_point() and v.dim() == 2
                for v in state.values()):
            raise ValueError(f"its pair memory is not {sorted(want)} as float matrices")
        rows = {v.shape[0] for v in state.values()}
        widths = {k: v.shape[1] for k, v in state.items()}
        if len(rows) != 1 or min(rows) < 1 or widths != want:
            raise ValueError(f"its pair memory has rows {sorted(rows)} and widths {widths}; "
                             f"expected one count of rows and widths {want}")
        return cls(**{k: v.float() for k, v in state.items()})


def neighbour_mean(queries: Tensor, keys: Tensor, values: Tensor, k: int,
                   temperature: float, exclude_self: bool = False,
                   chunk: int = 1024) -> Tensor:
    """For each row of ``queries`` ``(Q, E)``, the unit-length mean of the ``values``
    ``(N, V)`` of its ``k`` nearest ``keys`` ``(N, E)`` by dot product, weighted by the
    softmax of those products over ``temperature``. ``exclude_self``: the queries are the
    keys, and no row is its own neighbour."""
    k = min(k, keys.shape[0] - int(exclude_self))
    if k < 1:
        raise ValueError("neighbour_mean needs at least one neighbour besides the query")
    out = []
    for s in range(0, len(queries), chunk):
        sim = queries[s:s + chunk] @ keys.T / temperature
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + s] = float("-inf")
        top = sim.topk(k, dim=1)
        w = top.values.softmax(1).unsqueeze(-1)
        out.append(F.normalize((w * values[top.indices]).sum(1), dim=-1))
    return torch.cat(out) if out else values.new_zeros(0, values.shape[1])


def memory_scores(image_emb: Tensor, text_emb: Tensor, sentences: Tensor,
                  memory: PairMemory, *, neighbours: int = 10, temperature: float = 0.05,
                  text_weight: float = 1.5, image_weight: float = 0.5,
                  hubness: int = 10) -> Tensor:
    """Scores ``(B_img, B_txt)`` of images ``image_emb`` and texts (``text_emb``, their
    retrieval embeddings; ``sentences``, their unit sentence vectors) through ``memory``:

        S(i, t) = u_i . w_t + text_weight * u_i . p_t + image_weight * q_i . s_t

    where ``p_t`` is the mean image embedding of the ``neighbours`` training captions
    nearest to the text in the sentence encoder's space, and ``q_i`` the mean sentence
    vector of the captions of the training images nearest to the image
    (``neighbour_mean``). With ``hubness`` k > 0, each score less the mean of r_t and r_i,
    the means of the text's k best scores against the memory's images and of the image's
    against the memory's texts (cross-domain similarity local scaling, Conneau et al.,
    2018): a query near everything no longer ranks first for every other query. The
    memory's own items are scored against each other with themselves left out of their
    neighbours."""
    m = memory
    kw = dict(k=neighbours, temperature=temperature)
    p = neighbour_mean(sentences, m.sentences, m.images, **kw)        # texts -> images
    q = neighbour_mean(image_emb, m.images, m.sentences, **kw)       # images -> sentences

    def pair(u, q_, w, p_, s):
        return u @ w.T + text_weight * u @ p_.T + image_weight * q_ @ s.T
    scores = pair(image_emb, q, text_emb, p, sentences)
    if hubness <= 0:
        return scores
    k = min(hubness, m.images.shape[0])
    p_mem = neighbour_mean(m.sentences, m.sentences, m.images, exclude_self=True, **kw)
    q_mem = neighbour_mean(m.images, m.images, m.sentences, exclude_self=True, **kw)
    r_text = pair(m.images, q_mem, text_emb, p, sentences).topk(k, dim=0).values.mean(0)
    r_image = pair(image_emb, q, m.texts, p_mem, m.sentences).topk(k, dim=1).values.mean(1)
    return scores - (r_text[None, :] + r_image[:, None]) / 2
