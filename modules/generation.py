"""Autoregressive decoding.

- ``generate``: sampling for decoder-only models: greedy, temperature, top-k, nucleus
  (top-p; Holtzman et al., 2020), batched prompts of different lengths, KV cache.
- ``beam_search`` and ``greedy_search``: model-agnostic searches over a ``BeamDecoder``
  (any decoder with a KV cache and optional cross-attention memory: translation today,
  captioning or speech later). Batched beam search as in fairseq (Ott et al., 2019): 2K
  candidates per step so K beams stay alive when some end, and a finished hypothesis
  scores ``logp / length ** alpha`` (the simple form of Wu et al., 2016, "GNMT").

In ``generate``, prompts are left-padded; padded keys are masked out and every sequence
gets its own RoPE positions, so a prompt decodes the same in a batch as alone.

``compile=True`` decodes each new token with a ``torch.compile``'d step over a static cache
(``StaticDecoder``): the prompt is processed eagerly, then every step has the same shapes,
so it compiles once per (model, batch size, cache bucket, dtype). Inductor freezes the
weights (prepacked for the CPU's GEMM kernels) and, on the CPU, autotunes its own GEMM
templates. That costs about a minute of compilation and pays off over long or repeated
generation; the output equals eager decoding.

Shape legend for the searches: B sentences, K beams, rows = B * K (sentence-major: row
``b * K + k`` is beam k of sentence b), t tokens so far (BOS first), V vocabulary.
"""

from __future__ import annotations

import types
import warnings
import weakref
from typing import Any, NamedTuple, Protocol

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
                top_p: float | None = None,
                generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``; temperature 0 = greedy.
    ``generator``: one for the batch, or one per row (each row then draws as it would
    alone, whatever else is in the batch)."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p).softmax(-1)
    if isinstance(generator, list | tuple):
        return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g)
                          for i, g in enumerate(generator)]).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StaticDecoder:
    """A compiled single-token decoding step over preallocated caches of fixed length.

    Keys past the current step are masked, so the cache length (a power of two, at least
    the total length asked for) only has to be large enough. Weights are frozen into the
    compiled step: if any parameter changes afterwards (training), ``for_model`` builds a
    new one instead of decoding with stale weights.
    """

    _built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, model, batch: int, cache_len: int, device, dtype):
        # A weak reference: decoders are kept per model in a WeakKeyDictionary, and a strong
        # one would keep every model that ever decoded with compile=True alive.
        self._model, self.cache_len = weakref.ref(model), cache_len
        self.caches = model.new_caches(batch, cache_len, device=device, dtype=dtype)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.versions = _param_versions(model)
        # Inductor reads these while compiling, which happens on a step call: they are
        # patched around each call rather than set globally for the whole process.
        options = {"freezing": True}
        if torch.device(device).type == "cpu":
            options.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN",
                           autotune_num_choices_displayed=0,
                           max_autotune_report_choices_stats=False)
        self._inductor_options = options
        # torch.compile keeps its compiled code per code object, and freezing bakes weights
        # into that code: a private copy of the function keeps every decoder's weights its
        # own (another model, or these weights after an update, never reuses stale code).
        code = StaticDecoder._forward.__code__.replace(co_name=f"decode_step_{id(self):x}")
        step = types.FunctionType(code, StaticDecoder._forward.__globals__)
        self._step = torch.compile(types.MethodType(step, self), fullgraph=True, dynamic=False)

    def _forward(self, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        return self._model()(tokens, mask=mask, caches=self.caches, positions=positions)[:, -1]

    @classmethod
    def for_model(cls, model, batch: int, total: int, device) -> StaticDecoder:
        dtype = next(model.parameters()).dtype
        cache_len = min(max(64, 1 << (total - 1).bit_length()), model.max_seq_len)
        key = (batch, cache_len, str(device), dtype)
        built = cls._built.setdefault(model, {})
        dec = built.get(key)
        if dec is None or dec.versions != _param_versions(model):
            dec = built[key] = cls(model, batch, cache_len, device, dtype)
        return dec

    def start(self) -> list:
        """Empty the caches (growing mode) for the eager prompt pass."""
        for cache, _ in self.caches:
            cache.length, cache.slot = 0, None
        return self.caches

    def step(self, tokens: Tensor, positions: Tensor, mask: Tensor, index: int) -> Tensor:
        """Logits ``(B, V)`` for ``tokens (B, 1)`` written at cache position ``index``;
        ``mask (B, cache_len)`` marks the real keys up to and including ``index``."""
        self.slot.fill_(index)
        for cache, _ in self.caches:
            cache.slot = self.slot
        # Fresh contiguous inputs: slices of the token buffer would change strides (guards).
        tokens = tokens.clone(memory_format=torch.contiguous_format)
        positions = positions.clone(memory_format=torch.contiguous_format)
        with torch._inductor.config.patch(self._inductor_options), warnings.catch_warnings():
            # Inductor's generated code touches TypedStorage while compiling; not ours to fix.
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            return self._step(tokens, positions, mask)


def _param_versions(model) -> tuple[int, ...]:
    return tuple(p._version for p in model.parameters())


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             pad_id: int = 0, use_cache: bool = True, compile: bool = False,
             generator: torch.Generator | list[torch.Generator] | None = None
             ) -> list[list[int]]:
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
        compile: decode new tokens with a compiled ``StaticDecoder`` step (needs the cache).
        generator: for sampling; one per prompt makes each prompt's draws its own.
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

    if compile and not use_cache:
        raise ValueError("compile=True decodes with the KV cache; it needs use_cache=True")

    was_training = model.training
    model.eval()
    decoder = StaticDecoder.for_model(model, B, total, device) if compile else None
    if decoder is not None:
        caches = decoder.start()
        # Keys the compiled step may see: real tokens (not left padding) up to the step.
        real_keys = torch.zeros(B, decoder.cache_len, dtype=torch.bool, device=device)
        real_keys[:, :total] = real
        before = torch.arange(decoder.cache_len, device=device)
    else:
        caches = model.new_caches(B, total, device=device) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    start = 0
    for cur in range(P, total):
        if decoder is not None and cur > P:
            i = cur - 1
            last = decoder.step(tokens[:, i:cur], positions[:, i:cur],
                                real_keys & (before <= i), i)
        else:
            # With the cache, feed only the tokens it has not seen; else the whole prefix.
            lo = start if use_cache else 0
            last = model(tokens[:, lo:cur],
                         mask=None if mask is None else mask[:, :cur],
                         caches=caches,
                         positions=positions[:, lo:cur] if padded else lo)[:, -1]
        start = cur
        nxt = sample_next(last, temperature=temperature, top_k=top_k, top_p=top_p,
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


# --------------------------------------------------------------------------- search
class BeamDecoder(Protocol):
    """One decoding step at a time for ``rows`` hypotheses, the interface of the searches.

    The decoder holds what it decodes from (an encoded source, an image, audio frames; or
    nothing, for a decoder-only model); the searches only pass tokens and a state.
    """

    def start(self, beams: int, max_len: int) -> Any:
        """The state for ``B * beams`` rows that will decode at most ``max_len`` tokens
        after BOS (a KV cache holds at most ``max_len`` of them: BOS and all but the last
        token): e.g. empty self-attention caches and each sentence's cross-attention
        keys/values repeated ``beams`` times."""

    def step(self, tokens: Tensor, state: Any) -> Tensor:
        """Log-probabilities ``(rows, V)`` of the next token after ``tokens (rows, t)``,
        each row's whole prefix from BOS; a cached decoder feeds only ``tokens[:, -1:]``."""

    def reorder(self, state: Any, rows: Tensor) -> Any:
        """The state after row i becomes row ``rows[i]``, ``rows (rows,)``; may work in
        place. A row is only ever replaced by a row of its own sentence, so what is the
        same for all of a sentence's beams (cross-attention keys/values) need not move."""


class Hypothesis(NamedTuple):
    """A finished hypothesis: ids without BOS/EOS, and ``logp / length ** alpha``."""

    tokens: list[int]
    score: float


def _limits(max_len: int | Tensor, batch_size: int, device) -> Tensor:
    """Per-sentence token limits ``(B,)``; the searches loop as long as the largest, so a
    sentence's forced end and the loop can never disagree."""
    limit = torch.as_tensor(max_len, dtype=torch.long, device=device)
    if limit.dim() == 0:
        limit = limit.expand(batch_size)
    if batch_size < 1 or limit.shape != (batch_size,) or int(limit.min()) < 1:
        raise ValueError(f"max_len must be an int or a ({batch_size},) tensor, at least 1 "
                         f"for every sentence, for batch_size={batch_size}; got {max_len}")
    return limit


def block_repeated_ngrams(tokens: Tensor, logp: Tensor, n: int) -> Tensor:
    """``logp (rows, V)`` with -inf for every token that would repeat an n-gram already in
    its row's prefix ``tokens (rows, t)`` (fairseq's ``no_repeat_ngram_size``); n < 1 or a
    prefix shorter than n - 1 tokens changes nothing."""
    if n < 1 or tokens.shape[1] < max(n, 2):  # no n-gram (besides BOS) to repeat yet
        return logp
    if n == 1:
        seen = tokens[:, 1:]  # BOS is never a candidate
        hits = torch.ones_like(seen, dtype=logp.dtype)
    else:
        windows = tokens.unfold(1, n - 1, 1)  # (rows, t - n + 2, n - 1)
        # A window that equals the last n - 1 tokens bans the token that followed it.
        hits = (windows[:, :-1] == windows[:, -1:]).all(-1).to(logp.dtype)
        seen = tokens[:, n - 1:]
    banned = torch.zeros_like(logp).scatter_add_(1, seen, hits)
    return logp.masked_fill(banned > 0, float("-inf"))


@torch.no_grad()
def greedy_search(decoder: BeamDecoder, batch_size: int, *, max_len: int | Tensor,
                  bos_id: int, eos_id: int, no_repeat_ngram_size: int = 0,
                  device=None) -> list[list[int]]:
    """Greedy decoding (the argmax each step) of ``batch_size`` sentences.

    Args:
        decoder: the step adapter; ``start`` is called with one beam.
        batch_size: B.
        max_len: at most this many tokens per sentence, an int or ``(B,)``; a sentence
            that reaches it ends there with its last token kept.
        bos_id, eos_id: the first token fed, and the token that ends a sentence.
        no_repeat_ngram_size: n > 0 never repeats an n-gram within a sentence.
        device: of the token tensors (default: that of a ``max_len`` tensor, else CPU).

    Returns:
        the ids of each sentence, without BOS/EOS.
    """
    device = device if device is not None else getattr(max_len, "device", None)
    limit = _limits(max_len, batch_size, device).tolist()
    steps = max(limit)
    state = decoder.start(1, steps)
    tokens = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in range(batch_size)]
    alive = [True] * batch_size
    for step in range(1, steps + 1):
        logp = block_repeated_ngrams(tokens, decoder.step(tokens, state), no_repeat_ngram_size)
        nxt = logp.argmax(-1).tolist()
        for b in range(batch_size):
            if not alive[b]:
                continue
            if nxt[b] == eos_id:
                alive[b] = False
                continue
            out[b].append(nxt[b])
            alive[b] = step < limit[b]
        if not any(alive):
            break
        tokens = torch.cat([tokens, torch.tensor(nxt, device=device)[:, None]], 1)
    return out


@torch.no_grad()
def beam_search(decoder: BeamDecoder, batch_size: int, *, max_len: int | Tensor, bos_id: int,
                eos_id: int, pad_id: int = 0, beam_size: int = 4, length_penalty: float = 1.0,
                no_repeat_ngram_size: int = 0, device=None) -> list[Hypothesis]:
    """Batched beam search; the best finished hypothesis of each sentence.

    Each step ranks the 2K best continuations of a sentence's K beams. An EOS among the K
    best ends a hypothesis (as in fairseq: an EOS ranked lower is dropped); the K best
    others continue. A sentence is done once it has K finished hypotheses; at its
    ``max_len`` every continuation ends, its last token kept.

    Args:
        decoder: the step adapter; ``start`` is called with ``beam_size`` beams.
        batch_size: B.
        max_len: at most this many tokens per sentence, an int or ``(B,)``.
        bos_id, eos_id: the first token fed, and the token that ends a hypothesis.
        pad_id: fed after a row's hypothesis is dead (its score is -inf; never chosen).
        beam_size: K; 1 gives the greedy decode.
        length_penalty: alpha; a finished hypothesis scores ``logp / length ** alpha``,
            its length counting the EOS (0 ranks by the sum of log-probabilities).
        no_repeat_ngram_size: n > 0 never repeats an n-gram within a hypothesis (a
            continuation that would is scored -inf), against the loops of an undertrained
            model.
        device: of the token tensors (default: that of a ``max_len`` tensor, else CPU).
    """
    K, B = beam_size, batch_size
    if K < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    device = device if device is not None else getattr(max_len, "device", None)
    limit = _limits(max_len, B, device)
    steps = int(limit.max())
    state = decoder.start(K, steps)
    tokens = torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive
    own_rows = torch.arange(B * K, device=device).view(B, K)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(1, steps + 1):
        logp = block_repeated_ngrams(tokens, decoder.step(tokens, state).float(),
                                     no_repeat_ngram_size)  # (rows, V)
        V = logp.shape[-1]
        cand = (scores.unsqueeze(-1) + logp.view(B, K, V)).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=-1)  # (B, 2K)
        beam_idx, tok = top_idx // V, top_idx % V
        ends = (tok == eos_id) | (step >= limit).unsqueeze(-1)
        new_scores = torch.full((B, K), float("-inf"), device=device)
        new_rows = own_rows.clone()  # a dead slot keeps its row: never crosses sentences
        new_tok = torch.full((B, K), pad_id, dtype=torch.long, device=device)
        ts, bi, tk, end = (t.tolist() for t in (top_scores, beam_idx, tok, ends))
        for b in range(B):
            if done[b]:
                continue
            kept = 0
            for j in range(2 * K):
                if ts[b][j] == float("-inf"):
                    break
                row = b * K + bi[b][j]
                if end[b][j]:
                    if j < K:
                        finished[b].append(_finish(tokens[row, 1:].tolist(), tk[b][j],
                                                   ts[b][j], eos_id, length_penalty))
                    continue
                new_scores[b, kept], new_rows[b, kept] = ts[b][j], row
                new_tok[b, kept] = tk[b][j]
                kept += 1
                if kept == K:
                    break
            done[b] = len(finished[b]) >= K or kept == 0
        if all(done):
            break
        rows = new_rows.flatten()
        tokens = torch.cat([tokens[rows], new_tok.view(-1, 1)], dim=1)
        scores = new_scores.masked_fill(torch.tensor(done, device=device)[:, None],
                                        float("-inf"))
        state = decoder.reorder(state, rows)
    return [max(f, key=lambda h: h.score) if f else Hypothesis([], float("-inf"))
            for f in finished]


def _finish(prefix: list[int], token: int, logp: float, eos_id: int,
            length_penalty: float) -> Hypothesis:
    """A hypothesis ended by EOS (not among its tokens, counted in its length) or by the
    length limit (``token`` kept)."""
    tokens = prefix if token == eos_id else prefix + [token]
    return Hypothesis(tokens, logp / (len(prefix) + 1) ** length_penalty)
