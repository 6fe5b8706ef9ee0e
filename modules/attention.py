"""The one attention function every module calls, and the kernels behind it.

Scaled dot-product attention (Vaswani et al., 2017, "Attention Is All You Need") with
grouped-query attention (Ainslie et al., 2023, "GQA"), bottom-right aligned causal masks
for cached decoding, boolean masks, and three interchangeable kernels:

- ``math``:  the short reference written with matmul and softmax; every other backend is
  tested against it.
- ``sdpa``:  ``torch.nn.functional.scaled_dot_product_attention``, which dispatches to
  fused flash / memory-efficient / cuDNN kernels on GPU and a flash kernel on CPU.
- ``flash``: the flash-attn package (FlashAttention-2 ``flash_attn`` or FlashAttention-4
  ``flash_attn.cute``), imported lazily; CUDA with fp16/bf16 only.
- ``auto``:  ``flash`` where the call can run on it and the installed kernels are
  FlashAttention-2, else ``sdpa``. FlashAttention-4 (``flash_attn.cute``, a beta) runs only
  when asked for by name: on an H200 it measured slower than torch's SDPA for most shapes
  (its per-call launch cost is high), so choosing it silently would make ``auto`` slower.

Shape legend used throughout:
    B batch, H query heads, Hk key/value heads (H % Hk == 0), Lq query length,
    Lk key length, D head dim.

Mask convention: a boolean tensor where True means "may attend". A ``(B, Lk)`` mask is a
key padding mask; a 4-D mask must broadcast to ``(B, H, Lq, Lk)``. A query row that may
attend to nothing returns zeros (and zero gradients), on every backend.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

BACKENDS = ("auto", "math", "sdpa", "flash")


# --------------------------------------------------------------------------- masks
@functools.lru_cache(maxsize=32)
def _causal_cached(q_len: int, kv_len: int, device: torch.device) -> Tensor:
    # Bottom-right alignment: query i sits at absolute position i + (kv_len - q_len).
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def causal_mask(q_len: int, kv_len: int, device: torch.device | str = "cpu") -> Tensor:
    """``(Lq, Lk)`` boolean mask, True where query i may see key j <= i + (Lk - Lq)."""
    return _causal_cached(q_len, kv_len, torch.device(device))


def _as_4d(mask: Tensor, batch: int, heads: int, q_len: int, kv_len: int) -> Tensor:
    if mask.dtype != torch.bool:
        raise ValueError(f"attention mask must be torch.bool (True = may attend), got {mask.dtype}")
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, kv_len):
            raise ValueError(
                f"a 2-D mask is a key padding mask of shape (batch, kv_len) = "
                f"({batch}, {kv_len}), got {tuple(mask.shape)}"
            )
        return mask[:, None, None, :]
    if mask.dim() == 4:
        try:
            torch.broadcast_shapes(mask.shape, (batch, heads, q_len, kv_len))
        except RuntimeError:
            raise ValueError(
                f"a 4-D mask must broadcast to (batch, heads, q_len, kv_len) = "
                f"{(batch, heads, q_len, kv_len)}, got {tuple(mask.shape)}"
            ) from None
        return mask
    raise ValueError(
        f"attention mask must be (batch, kv_len) or 4-D broadcastable to "
        f"(batch, heads, q_len, kv_len), got {mask.dim()}-D shape {tuple(mask.shape)}"
    )


def combine_masks(
    mask: Tensor | None, causal: bool, batch: int, heads: int, q_len: int, kv_len: int,
    device: torch.device,
) -> Tensor | None:
    """One boolean mask (broadcastable 4-D) from a user mask and the causal flag."""
    out = None if mask is None else _as_4d(mask, batch, heads, q_len, kv_len)
    if causal and not (q_len == 1 and kv_len >= 1):  # one bottom-right query sees every key
        c = causal_mask(q_len, kv_len, device)
        out = c if out is None else out & c
    return out


# --------------------------------------------------------------------------- kernels
def attend_math(q, k, v, *, mask=None, causal=False, dropout_p=0.0, scale=None) -> Tensor:
    """Reference: softmax(q k^T * scale + mask) v, K/V heads repeated for GQA."""
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    k = k.repeat_interleave(H // Hk, dim=1)
    v = v.repeat_interleave(H // Hk, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    allowed = combine_masks(mask, causal, B, H, Lq, Lk, q.device)
    if allowed is not None:
        # finfo.min (not -inf) keeps an all-masked row finite; it is zeroed just below.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    if allowed is not None:
        probs = probs.masked_fill(~allowed, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def attend_sdpa(q, k, v, *, mask=None, causal=False, dropout_p=0.0, scale=None) -> Tensor:
    """torch's fused scaled_dot_product_attention, with GQA handled without K/V copies."""
    B, H, Lq, _ = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    gqa = H != Hk
    if mask is None and (not causal or Lq == 1 and Lk >= 1 or Lq == Lk):
        # is_causal is top-left aligned, which equals bottom-right only when Lq == Lk; a
        # single query against a cache sees every key. Both keep SDPA on its fastest path.
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal and Lq == Lk and Lq > 1,
            scale=scale, enable_gqa=gqa,
        )
    allowed = combine_masks(mask, causal, B, H, Lq, Lk, q.device)
    # Rows with nothing to attend to would give NaN (forward and backward). Let them see
    # every key, then zero their output: the zero also stops their gradient.
    has_any = allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed | ~has_any, dropout_p=dropout_p, scale=scale,
        enable_gqa=gqa,
    )
    return out * has_any


# (flash_attn_func, flash_attn_varlen_func, supports dropout, used by auto), or why the
# import failed.
_FLASH: tuple[Callable, Callable, bool, bool] | str | None = None


def _load_flash() -> tuple[Callable, Callable, bool, bool] | str:
    """The flash-attn kernels, or why they cannot be imported. Kept in a module global either
    way: a failed import is not remembered by Python, and retrying it on every call costs
    milliseconds. (A global, not functools.lru_cache: torch.compile reads a global as a
    constant but traces through an lru_cache wrapper into the import machinery.)"""
    global _FLASH
    if _FLASH is None:
        errors = []
        for name, fa2 in (("flash_attn", True), ("flash_attn.cute", False)):
            try:
                mod = importlib.import_module(name)
                _FLASH = mod.flash_attn_func, mod.flash_attn_varlen_func, fa2, fa2
                return _FLASH
            except Exception as exc:  # ImportError, or a CUDA library that fails to load
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
        _FLASH = "; ".join(errors)
    return _FLASH


def _flash_module() -> tuple[Callable, Callable, bool, bool]:
    """(flash_attn_func, flash_attn_varlen_func, supports_dropout, used_by_auto) from the
    flash-attn package: FlashAttention-2 first, then FlashAttention-4 (``flash_attn.cute``)."""
    loaded = _load_flash()
    if isinstance(loaded, str):
        raise ImportError(loaded)
    return loaded


def flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        _flash_module()
    except ImportError:
        return False
    return True


# FlashAttention-4 (flash_attn.cute 4.0 beta, CuTe DSL 4.4) on an H200 (sm90), checked with
# scripts/flash_check.py: head_dim 64, 96 and 128 match the float64 reference in outputs and
# gradients; 80 returns wrong q/k/v gradients (relative error ~1) and 48 fails to compile its
# backward. Only the checked sizes are let through.
FA4_HEAD_DIMS = (64, 96, 128)


def flash_head_dim_reason(head_dim: int, fa2: bool) -> str | None:
    """Why the installed flash kernels cannot take this head dim, or None."""
    if fa2:
        if head_dim % 8 or head_dim > 256:
            return f"flash attention needs head_dim a multiple of 8 and <= 256, got {head_dim}"
    elif head_dim not in FA4_HEAD_DIMS:
        return (f"FlashAttention-4 (flash_attn.cute) is used here only for head_dim in "
                f"{FA4_HEAD_DIMS}, the sizes whose gradients were verified; got {head_dim} "
                f"(use backend=sdpa, or install FlashAttention-2)")
    return None


def flash_unsupported_reason(q: Tensor, mask: Tensor | None, causal: bool,
                             dropout_p: float) -> str | None:
    """Why the flash backend cannot run this call, or None if it can."""
    if not q.is_cuda:
        return f"flash attention needs CUDA tensors, got device {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash attention needs float16 or bfloat16, got {q.dtype}"
    if mask is not None and mask.dim() != 2:
        return "flash attention takes only a (batch, kv_len) key padding mask, not a full mask"
    if mask is not None and causal:
        return "flash attention cannot combine a key padding mask with causal masking exactly"
    try:
        _, _, dropout_ok, fa2 = _flash_module()
    except ImportError as exc:
        return f"the flash-attn package is not importable ({exc}); pip install 'attnkit[gpu]'"
    reason = flash_head_dim_reason(q.shape[-1], fa2)
    if reason is not None:
        return reason
    if dropout_p > 0.0 and not dropout_ok:
        return "FlashAttention-4 has no attention dropout; set attn_drop=0 or use backend=sdpa"
    return None


@torch.compiler.disable  # flash-attn's kernels are opaque to torch.compile: run them eagerly
def attend_flash(q, k, v, *, mask=None, causal=False, dropout_p=0.0, scale=None) -> Tensor:
    """flash-attn kernels; flash-attn's layout is (B, L, H, D), so we pass transposed views."""
    reason = flash_unsupported_reason(q, mask, causal, dropout_p)
    if reason is not None:
        raise ValueError(reason)
    func, varlen_func, dropout_ok, _ = _flash_module()
    extra = {"dropout_p": dropout_p} if dropout_ok else {}
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
    if mask is None:
        # flash-attn aligns causal masks bottom-right, as we do.
        out = func(q_, k_, v_, softmax_scale=scale, causal=causal, **extra)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    # Key padding: drop padded keys and run the variable-length kernel.
    B, Lq, H, D = q_.shape
    Lk, Hk = k_.shape[1], k_.shape[2]
    seqlens_k = mask.sum(-1, dtype=torch.int32)
    cu_k = F.pad(seqlens_k.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=q.device)
    keep = mask.reshape(-1).nonzero().squeeze(-1)
    out = varlen_func(
        q_.reshape(B * Lq, H, D), k_.reshape(B * Lk, Hk, D)[keep],
        v_.reshape(B * Lk, Hk, D)[keep], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=Lq, max_seqlen_k=Lk, softmax_scale=scale, causal=False, **extra,
    )
    out = out[0] if isinstance(out, tuple) else out
    out = out.reshape(B, Lq, H, D).transpose(1, 2)
    # A sequence with no keys: the kernel's rows are undefined (possibly NaN); masked_fill
    # (not a multiply, which keeps NaN) makes them zeros and stops their gradient.
    return out.masked_fill((seqlens_k == 0)[:, None, None, None], 0.0)


_KERNELS = {"math": attend_math, "sdpa": attend_sdpa, "flash": attend_flash}


# --------------------------------------------------------------------------- dispatch
def check_backend(backend: str, head_dim: int | None = None) -> str:
    """Validate a backend name at construction; 'flash' must be usable on this machine (and
    take ``head_dim``, when given)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and torch.cuda.is_available():
        _load_flash()  # settle the import now, outside any compiled region
    if backend == "flash":
        if not torch.cuda.is_available():
            raise ValueError("attention backend 'flash' needs a CUDA GPU; none is visible "
                             "(use backend=auto or sdpa)")
        try:
            _flash_module()
        except ImportError as exc:
            raise ValueError(f"attention backend 'flash' needs the flash-attn package, which "
                             f"failed to import ({exc}); pip install 'attnkit[gpu]'") from None
        reason = None if head_dim is None else flash_head_dim_reason(head_dim, _flash_module()[3])
        if reason is not None:
            raise ValueError(f"attention backend 'flash': {reason}")
    return backend


# On the CPU, SDPA's flash kernel works in key blocks whose set-up dominates when there are
# only a few keys: without gradients, at 26 keys (a ViT's 25 patches and class token, head
# dim 32, batch 128, 2 threads) the plain matmul-softmax-matmul takes half its time, and at
# 50 keys SDPA is ahead again (scripts/bench_fusion.py, docs/benchmarks.md). With gradients
# SDPA stays ahead at every length (its backward recomputes less than math's autograd), and
# so it does for a single query (a decoding step: 2-7x) and for fewer than 64 batch x head
# rows, where math's several ops cost more than SDPA's one call.
CPU_MATH_MAX_KEYS = 32
CPU_MATH_MIN_ROWS = 64


def resolve_backend(backend: str, q: Tensor, mask: Tensor | None = None, causal: bool = False,
                    dropout_p: float = 0.0, kv_len: int | None = None,
                    needs_grad: bool | None = None) -> str:
    """The concrete kernel ('math', 'sdpa' or 'flash') a call with these inputs uses.

    ``auto`` picks flash on CUDA where it can run; math on the CPU for at most
    ``CPU_MATH_MAX_KEYS`` keys, more than one query and at least ``CPU_MATH_MIN_ROWS``
    batch x head rows when no gradient is needed (``needs_grad``, default: grad mode is on
    and q requires grad); sdpa otherwise.
    """
    if backend != "auto":
        return backend
    # The cached import outcome is checked first: this runs on every call.
    if q.is_cuda:
        loaded = _load_flash()
        if not isinstance(loaded, str) and loaded[3] and \
                flash_unsupported_reason(q, mask, causal, dropout_p) is None:
            return "flash"
    elif (kv_len is not None and kv_len <= CPU_MATH_MAX_KEYS and dropout_p == 0.0
          and q.shape[-2] > 1 and q.shape[0] * q.shape[1] >= CPU_MATH_MIN_ROWS):
        if needs_grad is None:
            needs_grad = torch.is_grad_enabled() and q.requires_grad
        if not needs_grad and q.device.type == "cpu":
            return "math"
    return "sdpa"


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention.

    Args:
        q: ``(B, H, Lq, D)`` queries.
        k: ``(B, Hk, Lk, D)`` keys; ``H`` must be a multiple of ``Hk`` (GQA / MQA).
        v: ``(B, Hk, Lk, D)`` values.
        mask: boolean, True = may attend. ``(B, Lk)`` key padding mask, or 4-D and
            broadcastable to ``(B, H, Lq, Lk)``.
        causal: query i attends keys j <= i + (Lk - Lq) (bottom-right aligned, so a
            chunk of new queries against a longer KV cache is masked correctly).
        dropout_p: attention dropout; callers pass 0 outside training.
        scale: softmax temperature, default ``D ** -0.5``.
        backend: ``auto``, ``math``, ``sdpa`` or ``flash``.

    Returns:
        ``(B, H, Lq, D)``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attend expects 4-D q, k, v as (batch, heads, len, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                         f"agree on batch, kv length or head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]})")
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or
                                               v.requires_grad)
    kernel = _KERNELS[resolve_backend(backend, q, mask, causal, dropout_p, k.shape[2],
                                      needs_grad)]
    return kernel(q, k, v, mask=mask, causal=causal, dropout_p=dropout_p, scale=scale)


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int,
                    causal: bool = False, backward: bool = False) -> float:
    """FLOPs by the FlashAttention papers' convention: 4*B*H*Lq*Lk*D forward, halved
    when causal; forward+backward is 3.5x forward."""
    f = 4.0 * batch * heads * q_len * kv_len * head_dim / (2 if causal else 1)
    return f * 3.5 if backward else f


__all__ = ["attend", "attend_math", "attend_sdpa", "attend_flash", "check_backend",
           "flash_head_dim_reason",
           "resolve_backend", "flash_available", "causal_mask", "combine_masks",
           "attention_flops", "BACKENDS", "CPU_MATH_MAX_KEYS", "CPU_MATH_MIN_ROWS"]
