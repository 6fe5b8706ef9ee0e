"""Autoregressive sampling for decoder-only models: greedy, temperature, top-k, nucleus
(top-p; Holtzman et al., 2020), batched prompts of different lengths, KV cache.

Prompts are left-padded; padded keys are masked out and every sequence gets its own RoPE
positions, so a prompt decodes the same in a batch as alone.
"""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits: Tensor, *, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """Set logits outside the top-k / top-p nucleus to -inf. logits: ``(B, V)``."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already cover top_p (keeps at least one).
        drop_sorted = probs.cumsum(-1) - probs > top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``; temperature 0 = greedy."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             pad_id: int = 0, use_cache: bool = True,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each prompt; returns the new tokens of each (without the prompt).

    Args:
        model: a ``CausalLM`` (anything with ``forward(tokens, mask=, caches=, positions=)``
            and ``new_caches``).
        prompts: token id lists, of any lengths (each at least one token).
        max_new_tokens: upper bound on new tokens per prompt.
        temperature: 0 for greedy decoding.
        top_k, top_p: sampling filters.
        eos_id: a sequence stops after producing it (it is included in the output).
        use_cache: decode with the KV cache (False recomputes the whole prefix per token).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + max_new_tokens
    if total > model.max_seq_len:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"the model's max_seq_len {model.max_seq_len}")
    tokens = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    real = torch.zeros(B, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):P] = torch.tensor(p, device=device)
        real[i, P - len(p):] = True  # generated positions are real too
    padded = not bool(real[:, :P].all())
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    mask = real if padded else None

    was_training = model.training
    model.eval()
    caches = model.new_caches(B, total, device=device) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    start = 0
    for cur in range(P, total):
        # With the cache, feed only the tokens it has not seen; else the whole prefix.
        lo = start if use_cache else 0
        logits = model(tokens[:, lo:cur],
                       mask=None if mask is None else mask[:, :cur],
                       caches=caches,
                       positions=positions[:, lo:cur] if padded else lo)
        start = cur
        nxt = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens[:, cur] = nxt
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                total = cur + 1
                break
    model.train(was_training)
    out = []
    for i in range(B):
        seq = tokens[i, P:total].tolist()
        if eos_id is not None and eos_id in seq:
            seq = seq[:seq.index(eos_id) + 1]
        out.append(seq)
    return out
