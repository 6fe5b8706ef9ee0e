"""Cross entropy through a model's output layer, a slice of tokens at a time on the CPU.

The logits of a language-model batch are large (2,048 tokens x 4,096 pieces is 32 MiB in
fp32) and short-lived. On the CPU, glibc's allocator hands blocks of 32 MiB and more
straight to the kernel and takes them back when freed, so the logits, their log-softmax
and both gradients arrive as fresh pages on every step, and the passes over them miss the
caches. Computing the output layer and the loss on slices of at most ``MAX_LOGITS``
elements keeps every block small and warm; the loss is the same sum, and so are the
gradients (up to the order of the additions). On a GPU the whole batch goes in one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_LOGITS = 1 << 21  # elements per slice on the CPU (8 MiB of fp32 logits)


def _wide(logits: Tensor) -> Tensor:
    """bf16 / fp16 logits (under autocast) are scored in fp32."""
    return logits.float() if logits.element_size() < 4 else logits


def head_cross_entropy(hidden: Tensor, head: nn.Module, targets: Tensor, *,
                       ignore_index: int = -100, label_smoothing: float = 0.0,
                       reduction: str = "mean", max_logits: int | None = None) -> Tensor:
    """``F.cross_entropy(head(hidden), targets)`` over every position.

    Args:
        hidden: ``(..., E)`` features before the output layer.
        head: the output layer, ``E -> V``. Only an ``nn.Linear`` is sliced; any other
            module gets one call.
        targets: ``(...)`` class indices; ``ignore_index`` positions are not scored.
        reduction: ``mean`` (over the scored positions), ``sum`` or ``none`` (a loss of
            the shape of ``targets``).
        max_logits: slice size in logits (default ``MAX_LOGITS`` on the CPU, no slicing
            elsewhere; 0: one call). A slice keeps at least ``E`` rows: with fewer, each
            slice's ``V x E`` weight gradient would outweigh its logits (a vocabulary of
            150,000 gets one call).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    x, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if max_logits is None:
        max_logits = MAX_LOGITS if hidden.device.type == "cpu" else 0
    vocab = head.out_features if isinstance(head, nn.Linear) else None
    rows = max_logits // vocab if max_logits and vocab else x.shape[0]
    if rows >= x.shape[0] or rows < x.shape[1]:
        loss = F.cross_entropy(_wide(head(x)), y, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss
    parts = [F.cross_entropy(_wide(head(xs)), ys, ignore_index=ignore_index,
                             label_smoothing=label_smoothing,
                             reduction="none" if reduction == "none" else "sum")
             for xs, ys in zip(x.split(rows), y.split(rows))]
    if reduction == "none":
        return torch.cat(parts).view(targets.shape)
    total = sum(parts[1:], parts[0])
    if reduction == "sum":
        return total
    return total / (y != ignore_index).sum()


__all__ = ["head_cross_entropy", "MAX_LOGITS"]
