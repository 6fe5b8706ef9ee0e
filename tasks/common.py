"""What every task shares: run directory, trainer, callbacks, checkpoints, init-from,
resume, config checks, the results file, the closing summary, and the error boundary."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
)
from omegaconf import DictConfig, OmegaConf

from data.cache import DataError

log = logging.getLogger("attnkit")

CKPT_KEY = "attnkit"  # our metadata inside every Lightning checkpoint


class UserError(Exception):
    """A problem with the user's input; reported as one line, exit status 2."""


# --------------------------------------------------------------------------- config checks
def _leaves(cfg, prefix=""):
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], cfg


def check_override_types(cfg: DictConfig, config_name: str) -> None:
    """An override whose type differs from the default's (``trainer.max_steps=abc``) is an
    error naming the key, the value and the type expected."""
    try:
        from hydra import compose
        from hydra.core.hydra_config import HydraConfig
        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # not under @hydra.main (tests call run(cfg) directly)
        return
    groups = [o for o in overrides if "=" in o and "." not in o.split("=")[0].lstrip("+~")]
    defaults = OmegaConf.to_container(compose(config_name, overrides=groups), resolve=False)
    actual = OmegaConf.to_container(cfg, resolve=False)
    actual_leaves = dict(_leaves(actual))
    for key, default in _leaves(defaults):
        if key not in actual_leaves or default is None:
            continue
        value = actual_leaves[key]
        if isinstance(value, str) and value.startswith("${"):
            continue
        ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default))
        if ok is None or isinstance(value, ok) and not (type(default) is int and
                                                         isinstance(value, bool)):
            continue
        if value is None:
            continue
        raise UserError(f"{key}={value!r} is not valid: expected {type(default).__name__} "
                        f"like the default {default!r}")


# --------------------------------------------------------------------------- run directory
def run_dir(cfg: DictConfig) -> Path:
    """Hydra's output directory (shared by all DDP ranks), or cfg.run_dir outside Hydra."""
    if cfg.get("run_dir"):
        path = Path(cfg.run_dir)
    else:
        try:
            from hydra.core.hydra_config import HydraConfig
            path = Path(HydraConfig.get().runtime.output_dir)
        except Exception:
            path = Path("outputs") / cfg.task / time.strftime("%Y-%m-%d_%H-%M-%S")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


# --------------------------------------------------------------------------- callbacks
class History(Callback):
    """Keeps every logged train/val scalar by step; rank zero plots them at the end."""

    def __init__(self):
        self.rows: list[dict] = []

    def _grab(self, trainer, prefix: str):
        row = {"step": trainer.global_step}
        for k, v in trainer.callback_metrics.items():
            if k.startswith(prefix) and v.numel() == 1:
                row[k] = float(v)
        if len(row) > 1:
            self.rows.append(row)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._grab(trainer, "train/")

    def on_validation_end(self, trainer, pl_module):
        # After the module's epoch-end hook, so this validation's metrics are the ones read;
        # only during fit (the closing trainer.validate/test would add a duplicate point).
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._grab(trainer, "val/")

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state):
        self.rows = list(state.get("rows", []))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(history: History, keys: list[str], path: Path, title: str) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    drawn = 0
    for key in keys:
        x, y = history.series(key)
        if x:
            ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, label=key)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def build_trainer(cfg: DictConfig, out: Path, *, monitor: str, mode: str = "min",
                  extra_callbacks: list[Callback] | None = None) -> tuple[L.Trainer, History]:
    """Lightning Trainer from ``cfg.trainer`` with our checkpoints, history and progress bar."""
    history = History()
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor,
                           mode=mode, save_top_k=1, save_last=True, auto_insert_metric_name=False)
    interactive = sys.stdout.isatty() and not os.environ.get("CI")
    bar = RichProgressBar(leave=True) if interactive else TQDMProgressBar(refresh_rate=50)
    callbacks = [ckpt, history, bar, LearningRateMonitor("step")] + (extra_callbacks or [])
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    # logs/version_N/metrics.csv: a resumed run adds a version instead of overwriting one.
    logger = L.pytorch.loggers.CSVLogger(save_dir=str(out), name="logs")
    trainer = L.Trainer(default_root_dir=str(out), callbacks=callbacks, logger=logger,
                        enable_model_summary=True, **tcfg)
    return trainer, history


# --------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | os.PathLike, task: str) -> dict:
    """A checkpoint of ``task``; any other file is an error that says what it is."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120]}); it may be truncated or not a "
                        f"checkpoint") from None
    meta = ckpt.get(CKPT_KEY) if isinstance(ckpt, dict) else None
    if not meta or "state_dict" not in ckpt:
        raise UserError(f"checkpoint {path} was not written by attnkit (no {CKPT_KEY!r} "
                        f"metadata); expected a {task} checkpoint")
    if meta.get("task") != task:
        raise UserError(f"checkpoint {path} is from the {meta.get('task')!r} task; expected a "
                        f"{task!r} checkpoint")
    return ckpt


def init_weights_from(module: torch.nn.Module, state: dict, *, strict: bool, source: str,
                      skip: Callable[[str], bool] = lambda k: False) -> dict:
    """Load weights only, reporting missing and unexpected keys; shape mismatches and, when
    strict, any missing or unexpected key are errors naming them."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not skip(k)}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise UserError(f"init_from {source} does not fit this model: {len(wrong)} tensors "
                        f"differ in shape (checkpoint vs model), e.g. {wrong[0]}")
    missing = sorted(k for k in own if k not in state)  # skipped keys keep their init
    unexpected = sorted(k for k in state if k not in own)
    if strict and ([k for k in missing if not skip(k)] or unexpected):
        raise UserError(f"init_from {source}: {len(missing)} missing keys {missing[:3]} and "
                        f"{len(unexpected)} unexpected keys {unexpected[:3]}; set "
                        f"init_strict=false to load the rest")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report = {"loaded": len(state) - len(unexpected), "missing": missing,
              "unexpected": unexpected}
    log.info("init_from %s: loaded %d tensors, %d missing, %d unexpected", source,
             report["loaded"], len(missing), len(unexpected))
    return report


def model_state(path: str | os.PathLike, task: str) -> dict:
    """The ``model.*`` weights of a ``task`` checkpoint, with the prefix removed."""
    state = load_checkpoint(path, task)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def resume_path(cfg: DictConfig, out: Path) -> str | None:
    """``resume=PATH``, or ``resume=auto``: the run directory's last checkpoint if any."""
    if not cfg.get("resume"):
        return None
    if cfg.resume == "auto":
        last = out / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    load_checkpoint(cfg.resume, cfg.task)  # fail early with a clear message
    return str(cfg.resume)


# --------------------------------------------------------------------------- run skeleton
def select_mode(cfg: DictConfig, task: str, modes: dict[str, Callable]) -> Callable:
    """The entry point for ``cfg.mode``; an unknown mode is a one-line error."""
    if cfg.mode not in modes:
        raise UserError(f"mode={cfg.mode!r} is not a mode of the {task} task; expected one of "
                        f"{sorted(modes)}")
    return modes[cfg.mode]


def begin(cfg: DictConfig) -> tuple[float, Path]:
    """Start a training run: the clock, the seeds, the run directory."""
    t0 = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return t0, run_dir(cfg)


def fit_and_restore_best(trainer: L.Trainer, module: L.LightningModule, train_loader,
                         val_loader, cfg: DictConfig, out: Path, task: str) -> str:
    """Fit (resuming if asked), then load the best checkpoint's weights on every rank, so a
    closing validation or test (collectives under DDP) runs on all of them."""
    trainer.fit(module, train_loader, val_loader, ckpt_path=resume_path(cfg, out))
    best = trainer.checkpoint_callback.best_model_path
    if best:
        module.load_state_dict(load_checkpoint(best, task)["state_dict"])
    return best


# --------------------------------------------------------------------------- results
def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def gather_to_all(items: list) -> list:
    """Concatenate a list held by every DDP rank (the list itself when not distributed)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]

def finish(out: Path, results: dict, title: str) -> dict:
    """Write results.json and print a short summary (rank zero only)."""
    if not is_rank_zero():
        return results
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    for k, v in results.items():
        if not isinstance(v, dict | list):
            table.add_row(k, _fmt(v))
    Console(width=110).print(table)
    print(f"results: {out / 'results.json'}")
    return results


def seconds_since(t0: float) -> float:
    return round(time.time() - t0, 1)


def main_guard(fn: Callable[[], object]) -> None:
    """Run an entry point; user errors become one line on stderr and exit status 2."""
    try:
        fn()
    except (UserError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------- optimisation
def warmup_cosine(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                  min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def decay_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms and biases are not decayed."""
    decay, keep = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


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
    into ``foreach`` (multi-tensor) where the trainer clips gradients under mixed precision."""
    from hydra.utils import instantiate
    opt_cfg = OmegaConf.to_container(optimizer_cfg, resolve=True)
    wd = opt_cfg.pop("weight_decay", 0.0)
    if opt_cfg.get("fused") and _clipping_under_mixed_precision(trainer):
        opt_cfg["fused"], opt_cfg["foreach"] = None, True
        log.info("optimizer: foreach instead of fused (gradient clipping under %s)",
                 trainer.precision)
    if opt_cfg.get("fused") is None:
        opt_cfg.pop("fused", None)
    optimizer = instantiate(opt_cfg)(decay_groups(module, wd))
    scheduler = instantiate(scheduler_cfg)(optimizer, total_steps=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
