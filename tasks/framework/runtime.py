"""The run itself: its directory, which process is rank zero, the Lightning Trainer with
our callbacks, preemption and requeue under SLURM, and the clock."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import (
    Callback,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
)
from omegaconf import DictConfig, OmegaConf

from .errors import UserError

log = logging.getLogger("attnkit")


class _DropAdvertising(logging.Filter):
    """Lightning prints tips advertising its hosted services into every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_DropAdvertising())

# Wherever srun is installed (a login node, a machine with the SLURM client) Lightning warns
# on every run that srun is not used, also outside any SLURM job, where it is only noise.
if "SLURM_JOB_ID" not in os.environ:
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system")


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
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"run_dir={str(path)!r} cannot be used: {exc.strerror}; expected a "
                        f"folder that can be created or written to") from None
    return path.resolve()


def refuse_finished_run(out: Path) -> None:
    """A new training run in a folder that already holds one would overwrite its results,
    curves and split: ask for another folder, or ``resume=auto`` to continue that run."""
    held = [name for name, there in (
        ("results.json", (out / "results.json").is_file()),
        ("checkpoints", any((out / "checkpoints").glob("*.ckpt")))) if there]
    if held:
        raise UserError(f"run_dir={str(out)!r} already holds a run ({' and '.join(held)}); "
                        f"expected a new folder, or resume=auto to continue that run")


@contextlib.contextmanager
def files_kept_on_error(out: Path):
    """The files directly in ``out`` as they were, should the block fail: a resume whose
    data or model turns out not to fit leaves the run it points at as it found it (its
    split, its data files) instead of half rewritten."""
    saved = {p: p.read_bytes() for p in out.iterdir() if p.is_file()} if out.is_dir() else {}
    try:
        yield
    except BaseException:
        for p in (out.iterdir() if out.is_dir() else ()):
            if p.is_file() and p not in saved:
                p.unlink()
        for p, data in saved.items():
            if not p.is_file() or p.read_bytes() != data:
                p.write_bytes(data)
        raise


@contextlib.contextmanager
def lightning_notes_held():
    """Lightning's notes (``GPU available: ...``) written at the end of the block, not
    during it, and not at all should it fail: a check that needs the built Trainer (a
    resume's number of processes) then stays the one line of its error."""
    log = logging.getLogger("lightning.pytorch")
    held: list[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    handlers, propagate = log.handlers[:], log.propagate
    log.handlers, log.propagate = [_Hold()], False
    try:
        yield
    finally:
        log.handlers, log.propagate = handlers, propagate
    for record in held:
        log.handle(record)


def global_rank() -> int:
    """This process's rank as Lightning sees it: from the trainer's launcher, torchrun
    (``RANK``), or SLURM (``SLURM_PROCID``), before and after the process group exists."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_rank_zero() -> bool:
    return global_rank() == 0


def slurm_job() -> bool:
    """Whether this process is a task of a SLURM job step (started by ``srun``), where
    Lightning takes ranks and world size from SLURM's environment."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    return SLURMEnvironment.detect()


class SlurmRequeue(Callback):
    """Preemption under SLURM: ``SIGUSR1`` (``#SBATCH --signal=USR1@120``, or ``scancel
    --signal=USR1 JOBID``) saves ``checkpoints/preempted.ckpt``, requeues the job with
    ``scontrol requeue`` and ends this process; the requeued job resumes from that checkpoint
    in the same run directory (``checkpoints.resume_path``). The checkpoint is removed when
    training finishes.

    Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves from inside the
    signal handler, wherever in a training step the signal lands, so a resumed run may repeat
    or skip part of a step. Here the handler only sets a flag and the checkpoint is written at
    the end of an optimizer step, a point Lightning resumes from exactly; a step that is
    followed by validation is left to finish first (resuming from a checkpoint taken before a
    validation skips that validation). srun signals every rank, not necessarily within the
    same step, so under DDP the ranks agree on the step by reducing the flag once per step.

    Args:
        out: the run directory.
        enabled: handle the signal (in a SLURM job step); otherwise the callback only removes
            a preemption checkpoint left by an earlier part of the run.
    """

    def __init__(self, out: Path, *, enabled: bool):
        from .checkpoints import preemption_checkpoint
        self.path, self.enabled = preemption_checkpoint(out), enabled
        self.signalled = False
        self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGUSR1, self._on_signal)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled or not trainer.strategy.reduce_boolean_decision(self.signalled,
                                                                            all=False):
            return
        # Lightning's own test for "validation follows this step" (private; checked on
        # lightning 2.6.6; tests/test_cluster.py preempts right before a validation).
        loop = trainer.fit_loop.epoch_loop
        if loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            return
        trainer.save_checkpoint(self.path)
        # Every rank says so before the broadcast below: once rank zero exits, srun may end
        # the other ranks before they could print anything.
        print(f"rank {trainer.global_rank} preempted at step {trainer.global_step}",
              file=sys.stderr, flush=True)
        requeued = trainer.strategy.broadcast(self._requeue() if trainer.is_global_zero
                                              else False, src=0)
        self.signalled = False
        if requeued:
            raise SystemExit(f"job requeued after preemption at step {trainer.global_step}: "
                             f"saved {self.path}")

    def _requeue(self) -> bool:
        job = os.environ.get("SLURM_JOB_ID", "")
        if os.environ.get("SLURM_ARRAY_JOB_ID"):  # one element of a job array (a sweep)
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        try:
            proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                                  timeout=60)
            ok, why = proc.returncode == 0, proc.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            ok, why = False, str(exc)
        if ok:
            log.warning("SIGUSR1: saved %s and requeued SLURM job %s", self.path, job)
        else:
            log.warning("SIGUSR1: saved %s; requeueing SLURM job %s failed (%s); training "
                        "goes on, and resume=auto continues from it later", self.path, job, why)
        return ok

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.path.unlink(missing_ok=True)


def seconds_since(t0: float) -> float:
    return round(time.time() - t0, 1)


def begin(cfg: DictConfig) -> tuple[float, Path]:
    """Start a training run: the clock, the seeds, the run directory."""
    t0 = time.time()
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or \
            not 0 <= cfg.seed < 2**32:
        raise UserError(f"seed={cfg.seed!r}; expected a whole number from 0 to 4294967295")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return t0, run_dir(cfg)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` for a run directory that may have moved since the
    resumed checkpoint was written. Lightning keeps the saved best and last paths only when
    the folder is the same; otherwise it keeps the old best path alone, so a moved run
    saved ``last-v1.ckpt`` beside ``last.ckpt`` (a later ``resume=auto`` then went back to
    the older one), and a run continued from another run's checkpoint restored and reported
    that run's best. Here the saved paths move with the folder when their files are in
    this one (the run was moved); otherwise (another run's checkpoint) this run starts its
    own best."""

    def load_state_dict(self, state_dict: dict) -> None:
        saved, here = state_dict.get("dirpath"), self.dirpath
        if saved is None or saved == here:
            return super().load_state_dict(state_dict)
        state = dict(state_dict, dirpath=here)

        def moved(path):
            if not path:
                return path
            rel = os.path.relpath(path, saved)
            return None if rel.startswith("..") else os.path.join(here, rel)

        paths = [state.get(k) for k in ("best_model_path", "last_model_path")]
        if all(p and moved(p) and Path(moved(p)).is_file() for p in paths):
            state.update({k: moved(state.get(k)) for k in
                          ("best_model_path", "last_model_path", "kth_best_model_path")})
            state["best_k_models"] = {moved(k): v for k, v in
                                      state.get("best_k_models", {}).items()}
        else:
            state.update(best_model_path="", last_model_path="", kth_best_model_path="",
                         best_model_score=None, best_k_models={})
            state.pop("kth_value", None)
        super().load_state_dict(state)


def build_trainer(cfg: DictConfig, out: Path, *, monitor: str, mode: str = "min",
                  extra_callbacks: list[Callback] | None = None):
    """Lightning Trainer from ``cfg.trainer`` with our checkpoints, history, RNG state,
    progress bar and SLURM requeue; returns ``(trainer, history)``."""
    from .checkpoints import RNGState
    from .reporting import History
    history = History()
    ckpt = RunCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor,
                           mode=mode, save_top_k=1, save_last=True, auto_insert_metric_name=False)
    interactive = sys.stdout.isatty() and not os.environ.get("CI")
    bar = RichProgressBar(leave=True) if interactive else TQDMProgressBar(refresh_rate=50)
    on_slurm = slurm_job()
    callbacks = [ckpt, history, RNGState(), bar, LearningRateMonitor("step"),
                 SlurmRequeue(out, enabled=on_slurm)]
    callbacks += extra_callbacks or []
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in ("accumulate_grad_batches", "log_every_n_steps"):
        value = tcfg.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"trainer.{key}={value!r}; expected a whole number of at least 1")
    clip = tcfg.get("gradient_clip_val")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                             or clip < 0):
        raise UserError(f"trainer.gradient_clip_val={clip!r}; expected a norm >= 0 (0 or null: "
                        f"no clipping)")
    ema_decay = tcfg.pop("ema_decay", None)
    if ema_decay is not None:
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) \
                or not 0.0 < ema_decay < 1.0:
            raise UserError(f"trainer.ema_decay={ema_decay!r}; expected a number between 0 and 1 "
                            f"(e.g. 0.998) or null")
        if "fsdp" in str(tcfg.get("strategy", "")):
            raise UserError("trainer.ema_decay is not supported with FSDP (the average would be "
                            "of one shard); use DDP or ema_decay=null")
        callbacks.append(EMAWeightAveraging(decay=ema_decay))
    sharded = next((kind for kind in ("fsdp", "deepspeed")
                    if kind in str(tcfg.get("strategy", "")).lower()), None)
    if sharded and str(cfg.get("optimizer", {}).get("_target_", "")).endswith(".MuonAdamW"):
        raise UserError(f"optimizer=muon is not supported with trainer.strategy="
                        f"{tcfg.get('strategy')} (Muon orthogonalises whole matrices, and "
                        f"{'FSDP' if sharded == 'fsdp' else 'DeepSpeed'} gives each rank a "
                        f"shard); use DDP or optimizer=adamw")
    if on_slurm:  # ranks from SLURM; SlurmRequeue, not Lightning, handles SIGUSR1
        from lightning.fabric.plugins.environments import SLURMEnvironment
        tcfg["plugins"] = [SLURMEnvironment(auto_requeue=False)]
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
    warn_of_emulated_bf16(trainer)
    return trainer, history


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 matrix kernels for this CPU (AVX512 and later); without
    them PyTorch emulates bf16 products, measured at 0.87 GFLOP/s against 110 in fp32 on
    a 2-core AVX2-only CPU."""
    import torch
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_of_emulated_bf16(trainer: L.Trainer) -> None:
    """A bf16 precision on a CPU without bf16 kernels runs, but ten to a hundred times
    slower than fp32: say so once (by rank zero alone under DDP), naming the setting (the
    defaults are fp32 on CPU)."""
    from lightning.pytorch.accelerators import CPUAccelerator
    precision = str(trainer.precision)
    if ("bf16" in precision and isinstance(trainer.accelerator, CPUAccelerator)
            and is_rank_zero() and not cpu_has_bf16_kernels()):
        log.warning("trainer.precision=%s: this CPU has no bf16 matrix kernels (AVX2 only), "
                    "so bf16 is emulated and runs many times slower than fp32; "
                    "trainer.precision=32-true is the fast setting here", precision)
