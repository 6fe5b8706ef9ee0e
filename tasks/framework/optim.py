"""Optimizer and learning-rate schedule from ``_partial_`` Hydra configs."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

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
                 embedding_weight_decay: float | None = None,
                 hidden_apart: bool = False) -> list[dict]:
    """Weight decay on matrices only; norms and biases are not decayed, nor the
    parameters a submodule names in its ``no_weight_decay()`` (timm's convention: a ViT's
    class token, registers and learned positions).

    The tables of ``nn.Embedding`` layers form a group of their own when
    ``embedding_lr_scale`` is not 1 (their learning rate is ``lr * embedding_lr_scale``) or
    ``embedding_weight_decay`` is set: a token's row gets a gradient only in the steps
    that see the token, so at a small model's learning rate the table moves slowly.

    ``hidden_apart``: the weight matrices of the hidden ``nn.Linear`` layers form a first
    group of their own, marked ``"hidden": True``, for an optimizer that treats them apart
    (``MuonAdamW``). Not hidden: the output layers (modules named ``head`` or ``*_head``) and
    the parameters a submodule names in its ``no_muon()`` (other input and output
    projections, such as a speech model's input layer or a contrastive model's projections).
    """
    own = embedding_lr_scale != 1.0 or embedding_weight_decay is not None
    tables = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)} \
        if own else set()
    exempt = {id(m.get_parameter(name)) for m in module.modules()
              if callable(getattr(m, "no_weight_decay", None)) for name in m.no_weight_decay()}
    hidden_ids = {id(m.weight) for name, m in module.named_modules()
                  if isinstance(m, torch.nn.Linear) and not _is_head(name)} if hidden_apart \
        else set()
    outer = {id(m.get_parameter(name)) for m in module.modules()
             if callable(getattr(m, "no_muon", None)) for name in m.no_muon()}
    hidden_ids -= tables | exempt | outer
    hidden, decay, keep, embed = [], [], [], []
    for p in module.parameters():
        if p.requires_grad:
            (embed if id(p) in tables else hidden if id(p) in hidden_ids else
             decay if p.dim() >= 2 and id(p) not in exempt else keep).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": keep, "weight_decay": 0.0}]
    if hidden_apart:
        groups.insert(0, {"params": hidden, "weight_decay": weight_decay, "hidden": True})
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


def _is_head(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last == "head" or last.endswith("_head")


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the hidden layers' weight matrices, AdamW on the rest: the embedding tables,
    the output layers, norms, biases and convolutions.

    Muon steps each matrix along its momentum made semi-orthogonal (five Newton-Schulz
    iterations), so every direction of the update moves at the same rate. The update is
    ``torch.optim.Muon``'s (Nesterov momentum, decoupled weight decay, the same iteration and
    learning-rate adjustment) with one difference: ``ns_dtype`` chooses the precision of the
    iteration's products. ``torch.optim.Muon`` always uses bfloat16, which a CPU without
    AVX512-BF16 or AMX emulates hundreds of times slower than float32; ``auto`` takes
    bfloat16 on a GPU or such a CPU and float32 elsewhere.

    ``adjust_lr_fn="match_rms_adamw"`` scales the update to AdamW's typical size, so
    ``muon_lr_scale=1`` reuses AdamW's rate; ``"original"`` is Keller Jordan's scaling, for
    rates near 0.02. The groups come from ``decay_groups(..., hidden_apart=True)``: those
    marked ``hidden`` are Muon's, the others AdamW's.
    """

    takes_hidden_group = True

    def __init__(self, params, lr: float = 1e-3, *, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, fused: bool | None = None,
                 foreach: bool | None = None, muon_lr_scale: float = 1.0,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns_coefficients=(3.4445, -4.775, 2.0315),
                 adjust_lr_fn: str = "match_rms_adamw", ns_dtype: str = "auto"):
        groups = list(params)
        if not groups or not all(isinstance(g, dict) for g in groups):
            raise TypeError("MuonAdamW takes parameter groups, those of decay_groups(model, "
                            "weight_decay, hidden_apart=True), not bare parameters")
        groups = [dict(g) for g in groups]
        hidden = [g for g in groups if g.pop("hidden", False)]
        rest = [g for g in groups if all(g is not h for h in hidden)]
        _check_muon_settings(momentum=momentum, muon_lr_scale=muon_lr_scale, nesterov=nesterov,
                             ns_steps=ns_steps, ns_coefficients=ns_coefficients,
                             adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
        if not any(p.dim() == 2 for g in hidden for p in g["params"]):
            raise ValueError("MuonAdamW found no hidden weight matrix (an nn.Linear outside "
                             "the output layers)")
        if any(p.dim() != 2 for g in hidden for p in g["params"]):
            raise ValueError("MuonAdamW: the hidden groups hold 2-D matrices only")
        muon_ids = {id(p) for g in hidden for p in g["params"]}
        if any(id(p) in muon_ids for g in rest for p in g["params"]):
            raise ValueError("MuonAdamW: a parameter is in a hidden group and in another one")
        self.adamw = torch.optim.AdamW(rest, lr=lr, betas=tuple(betas), eps=eps,
                                       weight_decay=weight_decay, fused=fused, foreach=foreach)
        # the products' precision suits the machine, so it is not saved with the state: a run
        # resumed elsewhere chooses again
        self.ns_dtype = ns_dtype
        muon = {"lr": lr * muon_lr_scale, "weight_decay": weight_decay, "momentum": momentum,
                "nesterov": nesterov, "ns_steps": ns_steps,
                "ns_coefficients": tuple(ns_coefficients), "adjust_lr_fn": adjust_lr_fn,
                "muon": True}
        super().__init__(hidden, muon)
        self._n_muon = len(self.param_groups)
        self.param_groups = self.param_groups + self.adamw.param_groups
        self.adamw.state = self.state

    def add_param_group(self, param_group: dict) -> None:
        """A group added after construction (as Lightning's fine-tuning callbacks add one)
        goes to Muon when marked ``hidden``, to AdamW otherwise."""
        if "_n_muon" not in self.__dict__:  # the constructor's own groups
            return super().add_param_group(param_group)
        group = dict(param_group)
        params = group["params"]
        params = [params] if torch.is_tensor(params) else list(params)
        known = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in known for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        muon = self.param_groups[:self._n_muon]
        if group.pop("hidden", False):
            if any(p.dim() != 2 for p in params):
                raise ValueError("MuonAdamW: the hidden groups hold 2-D matrices only")
            self.param_groups = muon
            super().add_param_group(group)
            muon = self.param_groups
        else:
            self.adamw.add_param_group(group)
        self._n_muon = len(muon)
        self.param_groups = muon + self.adamw.param_groups

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # AdamW's own reading of a file: the settings torch added since it was written filled
        # in, a step stored as a number made a tensor
        torch.optim.AdamW.__setstate__(self.adamw, {
            "state": self.state, "param_groups": self.param_groups[self._n_muon:]})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        for group in self.param_groups[:self._n_muon]:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            same_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                same_shape.setdefault((tuple(p.shape), p.device), []).append((p, update))
            for (shape, device), pairs in same_shape.items():
                # matrices of one shape in one batch: small products run faster together
                updates = newton_schulz(torch.stack([u for _, u in pairs]),
                                        group["ns_coefficients"], group["ns_steps"],
                                        _ns_dtype(self.ns_dtype, device))
                a, b = shape
                scale = max(1.0, a / b) ** 0.5 if group["adjust_lr_fn"] == "original" \
                    else 0.2 * max(a, b) ** 0.5
                for (p, _), update in zip(pairs, updates):
                    p.mul_(1 - lr * wd)
                    p.add_(update.to(p.dtype), alpha=-lr * scale)
        return loss


def newton_schulz(g: torch.Tensor, coefficients=(3.4445, -4.775, 2.0315), steps: int = 5,
                  dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration on a matrix or a stack of matrices ``(k, m, n)``:
    matrices with ``g``'s singular vectors and singular values near 1 (about 0.7 to 1.2),
    in ``dtype``."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    mm = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def _check_muon_settings(**settings) -> None:
    """Muon's settings, each checked with its own message (``optimizer.ns_steps=2.5 is not
    valid: ...``)."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    m, co, steps = settings["momentum"], settings["ns_coefficients"], settings["ns_steps"]
    checks = {
        "momentum": (number(m) and 0 <= m < 1, "a number in [0, 1)"),
        "muon_lr_scale": (number(settings["muon_lr_scale"]) and settings["muon_lr_scale"] > 0,
                          "a number > 0, Muon's rate over optimizer.lr"),
        "nesterov": (isinstance(settings["nesterov"], bool), "true or false"),
        "ns_steps": (isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps < 100,
                     "a whole number of Newton-Schulz iterations from 1 to 99"),
        "ns_coefficients": (isinstance(co, Sequence) and not isinstance(co, str) and len(co) == 3
                            and all(number(c) for c in co),
                            "three numbers a, b, c (the iteration a x + b x^3 + c x^5)"),
        "adjust_lr_fn": (settings["adjust_lr_fn"] in ("original", "match_rms_adamw"),
                         "original or match_rms_adamw"),
        "ns_dtype": (settings["ns_dtype"] in ("auto", "float32", "bfloat16"),
                     "auto, float32 or bfloat16"),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"optimizer.{key}={settings[key]!r} is not valid: expected "
                             f"{expected}")


def _ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        from .runtime import cpu_has_bf16_kernels
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_kernels())
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, name)


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
        optimizer = instantiate(opt_cfg)
        hidden_apart = getattr(getattr(optimizer, "func", None), "takes_hidden_group", False)
        optimizer = optimizer(decay_groups(module, wd, lr=opt_cfg.get("lr"),
                                           hidden_apart=hidden_apart, **embedding))
        scheduler = instantiate(scheduler_cfg)(optimizer, total_steps=total_steps)
    except (ValueError, TypeError, InstantiationException) as exc:
        cause = exc.__cause__ if isinstance(exc, InstantiationException) and exc.__cause__ \
            else exc
        cause = " ".join(str(cause).split())  # one line: Hydra's messages span several
        raise UserError(f"optimizer/scheduler settings are not valid: {cause} (optimizer: "
                        f"{opt_cfg.get('_target_')}, lr={opt_cfg.get('lr')})") from None
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
