"""Optimizer and learning-rate schedule from ``_partial_`` Hydra configs."""

from __future__ import annotations

import logging
import math

import torch
from omegaconf import OmegaConf

from .errors import UserError

log = logging.getLogger("attnkit")


def warmup_cosine(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                  min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio``."""
    if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise UserError(f"scheduler.warmup_steps={warmup_steps}, "
                        f"scheduler.min_lr_ratio={min_lr_ratio}: expected warmup_steps >= 0 "
                        f"and min_lr_ratio in [0, 1]")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def decay_groups(module: torch.nn.Module, weight_decay: float, *, lr: float | None = None,
                 embedding_lr_scale: float = 1.0,
                 embedding_weight_decay: float | None = None) -> list[dict]:
    """Weight decay on matrices only; norms and biases are not decayed, nor the
    parameters a submodule names in its ``no_weight_decay()`` (timm's convention: a ViT's
    class token, registers and learned positions).

    The tables of ``nn.Embedding`` layers form a group of their own when
    ``embedding_lr_scale`` is not 1 (their learning rate is ``lr * embedding_lr_scale``) or
    ``embedding_weight_decay`` is set: a token's row gets a gradient only in the steps
    that see the token, so at a small model's learning rate the table moves slowly.
    """
    own = embedding_lr_scale != 1.0 or embedding_weight_decay is not None
    tables = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)} \
        if own else set()
    exempt = {id(m.get_parameter(name)) for m in module.modules()
              if callable(getattr(m, "no_weight_decay", None)) for name in m.no_weight_decay()}
    decay, keep, embed = [], [], []
    for p in module.parameters():
        if p.requires_grad:
            (embed if id(p) in tables else
             decay if p.dim() >= 2 and id(p) not in exempt else keep).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": keep, "weight_decay": 0.0}]
    if own and not embed:
        log.info("optimizer: embedding_lr_scale / embedding_weight_decay set, but the model "
                 "has no nn.Embedding table")
    if embed:
        if lr is None:
            raise UserError("optimizer.embedding_lr_scale needs optimizer.lr, the rate it "
                            "scales")
        groups.append({"params": embed, "lr": lr * embedding_lr_scale,
                       "weight_decay": weight_decay if embedding_weight_decay is None
                       else embedding_weight_decay})
    return groups


def _embedding_settings(opt_cfg: dict) -> dict:
    """Pop and check ``embedding_lr_scale`` and ``embedding_weight_decay``."""
    scale = opt_cfg.pop("embedding_lr_scale", 1.0)
    wd = opt_cfg.pop("embedding_weight_decay", None)
    number = (int, float)
    if isinstance(scale, bool) or not isinstance(scale, number) or not scale > 0:
        raise UserError(f"optimizer.embedding_lr_scale={scale!r} is not valid: expected a "
                        f"number > 0 (1: the embedding tables learn at optimizer.lr)")
    if wd is not None and (isinstance(wd, bool) or not isinstance(wd, number) or wd < 0):
        raise UserError(f"optimizer.embedding_weight_decay={wd!r} is not valid: expected a "
                        f"number >= 0, or null for optimizer.weight_decay")
    return {"embedding_lr_scale": float(scale), "embedding_weight_decay": wd}


def _clipping_under_mixed_precision(trainer) -> bool:
    """Lightning's mixed-precision plugin refuses to clip gradients for an optimizer that
    unscales them itself (a fused one), even in bf16, where nothing is scaled."""
    if trainer is None or not trainer.gradient_clip_val:
        return False
    from lightning.pytorch.plugins.precision import MixedPrecision
    return isinstance(trainer.precision_plugin, MixedPrecision)


def configure_optimization(module: torch.nn.Module, optimizer_cfg, scheduler_cfg,
                           total_steps: int, trainer=None):
    """Optimizer and per-step scheduler from ``_partial_`` Hydra configs. ``fused: true`` turns
    into ``foreach`` (multi-tensor) where the trainer clips gradients under mixed precision.
    A value the optimizer or schedule refuses (``optimizer.lr=-1``) is a UserError."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    opt_cfg = OmegaConf.to_container(optimizer_cfg, resolve=True)
    wd = opt_cfg.pop("weight_decay", 0.0)
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or wd < 0:
        raise UserError(f"optimizer.weight_decay={wd!r} is not valid: expected a number >= 0")
    embedding = _embedding_settings(opt_cfg)
    betas = opt_cfg.get("betas")
    if "betas" in opt_cfg and not (
            isinstance(betas, list) and len(betas) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                for b in betas)):
        raise UserError(f"optimizer.betas={betas!r} is not valid: expected two numbers in "
                        f"[0, 1), the decay rates of Adam's two moments (like [0.9, 0.95])")
    if opt_cfg.get("fused") and _clipping_under_mixed_precision(trainer):
        opt_cfg["fused"], opt_cfg["foreach"] = None, True
        log.info("optimizer: foreach instead of fused (gradient clipping under %s)",
                 trainer.precision)
    if opt_cfg.get("fused") is None:
        opt_cfg.pop("fused", None)
    try:
        optimizer = instantiate(opt_cfg)(decay_groups(module, wd, lr=opt_cfg.get("lr"),
                                                      **embedding))
        scheduler = instantiate(scheduler_cfg)(optimizer, total_steps=total_steps)
    except (ValueError, TypeError, InstantiationException) as exc:
        cause = exc.__cause__ if isinstance(exc, InstantiationException) and exc.__cause__ \
            else exc
        cause = " ".join(str(cause).split())  # one line: Hydra's messages span several
        raise UserError(f"optimizer/scheduler settings are not valid: {cause} (optimizer: "
                        f"{opt_cfg.get('_target_')}, lr={opt_cfg.get('lr')})") from None
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
