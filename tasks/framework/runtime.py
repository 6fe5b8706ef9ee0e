"""The run itself: its directory, which process is rank zero, the Lightning Trainer with
our callbacks, and the clock."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
)
from omegaconf import DictConfig, OmegaConf

from .errors import UserError


class _DropAdvertising(logging.Filter):
    """Lightning prints tips advertising its hosted services into every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_DropAdvertising())


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


def global_rank() -> int:
    """This process's rank as Lightning sees it: from the trainer's launcher, torchrun
    (``RANK``), or SLURM (``SLURM_PROCID``), before and after the process group exists."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_rank_zero() -> bool:
    return global_rank() == 0


def seconds_since(t0: float) -> float:
    return round(time.time() - t0, 1)


def begin(cfg: DictConfig) -> tuple[float, Path]:
    """Start a training run: the clock, the seeds, the run directory."""
    t0 = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return t0, run_dir(cfg)


def build_trainer(cfg: DictConfig, out: Path, *, monitor: str, mode: str = "min",
                  extra_callbacks: list[Callback] | None = None):
    """Lightning Trainer from ``cfg.trainer`` with our checkpoints, history, RNG state and
    progress bar; returns ``(trainer, history)``."""
    from .checkpoints import RNGState
    from .reporting import History
    history = History()
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor,
                           mode=mode, save_top_k=1, save_last=True, auto_insert_metric_name=False)
    interactive = sys.stdout.isatty() and not os.environ.get("CI")
    bar = RichProgressBar(leave=True) if interactive else TQDMProgressBar(refresh_rate=50)
    callbacks = [ckpt, history, RNGState(), bar, LearningRateMonitor("step")]
    callbacks += extra_callbacks or []
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    # logs/version_N/metrics.csv: a resumed run adds a version instead of overwriting one.
    logger = L.pytorch.loggers.CSVLogger(save_dir=str(out), name="logs")
    try:
        trainer = L.Trainer(default_root_dir=str(out), callbacks=callbacks, logger=logger,
                            enable_model_summary=True, **tcfg)
    except (ValueError, TypeError) as exc:
        raise UserError(f"trainer settings are not valid: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # Lightning's MisconfigurationException, e.g. no GPU found
        if type(exc).__name__ != "MisconfigurationException":
            raise
        raise UserError(f"trainer settings are not valid: {str(exc).splitlines()[0]}") from None
    return trainer, history
