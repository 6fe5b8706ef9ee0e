"""Autoregressive sampling for decoder-only models: greedy, temperature, top-k, nucleus
(top-p; Holtzman et al., 2020), batched prompts of different lengths, KV cache.

Prompts are left-padded; padded keys are masked out and every sequence gets its own RoPE
positions, so a prompt decodes the same in a batch as alone.

``compile=True`` decodes each new token with a ``torch.compile``'d step over a static cache
(``StaticDecoder``): the prompt is processed eagerly, then every step has the same shapes,
so it compiles once per (model, batch size, cache bucket, dtype). Inductor freezes the
weights (prepacked for the CPU's GEMM kernels) and, on the CPU, autotunes its own GEMM
templates. That costs about a minute of compilation and pays off over long or repeated
generation; the output equals eager decoding.
"""

from __future__ import annotations

import types
import warnings
import weakref

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
        compile: decode new tokens with a compiled ``StaticDecoder`` step (needs the cache).
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
