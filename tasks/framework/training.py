"""The one training skeleton every task runs, and ``Task``, what a task file provides.

A task is its data, its network config, its step and metric code, and its results:

    class MyTask(Task):
        name, module_class = "mytask", MyModule      # MyModule(TaskModule): the steps
        monitor, monitor_mode = "val/acc", "max"     # what picks the best checkpoint
        curves = [(["train/loss", "val/loss"], "loss_curves.png", "loss")]

        def prepare(self, cfg, out) -> Prepared: ...         # data, loaders, model config
        def evaluate(self, trainer, module, prep, cfg, out) -> dict: ...  # closing figures

``train`` then does the rest in this order: clock and seeds, ``prepare``, the module,
``init_from``, the trainer, fit (or resume) and restore the best weights, ``evaluate``,
curves, ``results.json`` and the summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from omegaconf import DictConfig, OmegaConf

from data.cache import atomic_write_text

from . import runtime
from .checkpoints import (
    check_resume_fits,
    init_weights_from,
    load_checkpoint,
    model_state,
    resume_path,
    resume_settings,
)
from .config import select_mode
from .errors import UserError
from .module import TaskModule
from .optim import configure_optimization
from .reporting import finish, plot_curves


@dataclass
class Prepared:
    """What a task's ``prepare`` hands to the skeleton.

    Args:
        train_loader, val_loader: the loaders ``fit`` uses.
        model_cfg: the network config, completed with what the data decides (vocabulary
            size, class count).
        meta: inference metadata stored in checkpoints (``TaskModule.meta``).
        options: further keyword arguments of the task's module (label smoothing, ...).
        info: data figures for ``results.json`` (source, sizes).
        data: anything else ``evaluate`` needs (test split, tokenizer, ...).
        split: what each part of a seeded split holds (item ids, files or texts, as JSON
            values); its digest is stored in the checkpoints (``meta["split_digest"]``) and
            ``resume=`` requires the same, so a resumed run never tests on what it trained on.
    """

    train_loader: Any
    val_loader: Any
    model_cfg: dict
    meta: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    data: Any = None
    split: Any = None


class Task:
    """Base of the task definitions; see the module docstring."""

    name: ClassVar[str] = ""
    module_class: ClassVar[type[TaskModule]] = TaskModule
    monitor: ClassVar[str] = "val/loss"
    monitor_mode: ClassVar[str] = "min"
    curves: ClassVar[list[tuple[list[str], str, str]]] = []
    # output layer -> the ``meta`` key naming its rows (class names, answers): init_from
    # moves those rows by name, resume requires the same names
    named_rows: ClassVar[dict[str, str]] = {}
    # mode -> the ``MODE_SETTINGS`` it reads, where the modes read different ones; a mode
    # refuses the others' (``questions=`` given to ``mode=classify`` would be ignored)
    mode_settings: ClassVar[dict[str, tuple[str, ...]]] = {}

    def modes(self) -> dict[str, Callable[[DictConfig], dict]]:
        """Modes besides ``train`` (``generate``, ``predict``, ...). Each returns its
        results, which ``run`` writes to ``<mode>.json`` in the run directory."""
        return {}

    def prepare(self, cfg: DictConfig, out: Path) -> Prepared:
        raise NotImplementedError

    def init_from(self, module: TaskModule, cfg: DictConfig, prep: Prepared) -> dict | None:
        """``init_from=PATH``: by default a checkpoint of this task, weights only."""
        return init_weights_from(
            module.model, model_state(cfg.init_from, self.name, module, self.named_rows),
            strict=cfg.init_strict, source=str(cfg.init_from))

    def evaluate(self, trainer: L.Trainer, module: TaskModule, prep: Prepared,
                 cfg: DictConfig, out: Path) -> dict:
        """Closing figures (every rank calls it; may run collectives). May return
        ``plots``: a list of PNG paths."""
        return {}


def model_config(cfg: DictConfig, **completed) -> dict:
    """``cfg.model`` as a plain dict, with the fields the data decides filled in."""
    m = OmegaConf.to_container(cfg.model, resolve=True)
    m.update(completed)
    return m


def fit_and_restore_best(trainer: L.Trainer, module: TaskModule, prep: Prepared,
                         resume: str | None) -> str:
    """Fit (resuming from ``resume`` if given, with weights-only loading), then load the best
    checkpoint's weights on every rank, so a closing evaluation (collectives under DDP) runs
    on all of them."""
    trainer.fit(module, prep.train_loader, prep.val_loader, ckpt_path=resume,
                weights_only=True)
    best = trainer.checkpoint_callback.best_model_path
    if best:
        module.load_state_dict(load_checkpoint(best, module.task)["state_dict"])
    return best


def _batches(loader) -> int | None:
    """Batches in an epoch of ``loader``; None when it cannot tell (an iterable stream)."""
    try:
        return len(loader)
    except TypeError:
        return None


# Settings only the other modes read (null or empty by default): given to a training run,
# they mean the mode was left out, and the run would train instead of what was asked.
MODE_SETTINGS = ("ckpt", "images", "audio", "input", "texts", "classes", "questions", "prompts")


def _given(cfg: DictConfig, key: str) -> bool:
    value = OmegaConf.select(cfg, key, default=None)
    return value is not None and value != [] and value != ""


def refuse_mode_settings(task: Task, cfg: DictConfig) -> None:
    for key in MODE_SETTINGS:
        if _given(cfg, key):
            modes = "|".join(sorted(task.modes()))
            raise UserError(f"{key}= is a setting of this task's other modes "
                            f"(mode={modes}), and mode=train trains; expected the mode it is "
                            f"for (init_from= or resume= trains from a checkpoint)")


def train(task: Task, cfg: DictConfig) -> dict:
    """The training skeleton; returns the results dict (empty on ranks other than zero)."""
    refuse_mode_settings(task, cfg)
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps < 1:
        raise UserError(f"trainer.max_steps={cfg.trainer.max_steps} must be a positive number "
                        f"of optimizer steps")
    t0, out = runtime.begin(cfg)
    resume = resume_path(cfg, out)  # a bad resume= fails here, before any work
    own = resume is not None and Path(resume).resolve().is_relative_to(out.resolve())
    if not own and runtime.is_rank_zero():  # other ranks start once rank 0 wrote
        runtime.refuse_finished_run(out)  # only its own checkpoint continues a run
    with runtime.files_kept_on_error(out) if resume else contextlib.nullcontext():
        prep = task.prepare(cfg, out)
        if prep.split is not None:
            prep.meta["split_digest"] = hashlib.sha256(
                json.dumps(prep.split, sort_keys=True, default=str).encode()).hexdigest()[:16]
        prep.meta["resume_settings"] = resume_settings(cfg)
        t_data = runtime.seconds_since(t0)
        if _batches(prep.train_loader) == 0:
            raise UserError("the training set gives no batch: it holds fewer items than "
                            "data.batch_size; expected a smaller data.batch_size or more data")
        module = task.module_class(model_cfg=prep.model_cfg, meta=prep.meta,
                                   optimizer_cfg=cfg.optimizer, scheduler_cfg=cfg.scheduler,
                                   total_steps=cfg.trainer.max_steps, **prep.options)
        optimization = configure_optimization(module.model, cfg.optimizer, cfg.scheduler,
                                              cfg.trainer.max_steps)  # fail early
        init_report = task.init_from(module, cfg, prep) if cfg.init_from else None
        with runtime.lightning_notes_held():
            trainer, history = runtime.build_trainer(cfg, out, monitor=task.monitor,
                                                     mode=task.monitor_mode)
            # each step takes data.batch_size from every process, and the saved data
            # position counts such steps: a resume keeps the number of processes
            module.meta["resume_settings"]["processes"] = (trainer.num_devices *
                                                           trainer.num_nodes)
            if resume:
                check_resume_fits(module, resume, cfg.task, optimization,
                                  task.named_rows.values(), max_steps=cfg.trainer.max_steps)
    best = fit_and_restore_best(trainer, module, prep, resume)
    figures = task.evaluate(trainer, module, prep, cfg, out)
    if not trainer.is_global_zero:
        return {}
    plots = [plot_curves(history, keys, out / fname, title) for keys, fname, title in
             task.curves] + list(figures.pop("plots", []))
    results = {
        "task": task.name, **prep.info,
        "params": sum(p.numel() for p in module.model.parameters()),
        "steps": trainer.global_step, **figures, "data_seconds": t_data,
        "total_seconds": runtime.seconds_since(t0), "best_checkpoint": best,
        "last_checkpoint": str(last) if (last := out / "checkpoints" / "last.ckpt").is_file()
        else None, "init_from": init_report,
        "plots": [str(p) for p in plots if p], "run_dir": str(out),
    }
    return finish(out, results, f"{task.name}: {out}")


def run_mode(task: Task, mode: Callable[[DictConfig], dict], cfg: DictConfig) -> dict:
    """A mode other than ``train``: its results go to ``<mode>.json`` in the run directory
    (never over an earlier one's), its path to stderr, so stdout keeps the mode's output."""
    for key in ("resume", "init_from"):  # a mode reads ckpt= alone
        if _given(cfg, key):
            raise UserError(f"{key}= is a setting of training (mode=train), which mode="
                            f"{cfg.mode} does not read; expected ckpt= for the checkpoint it "
                            f"uses")
    reads = task.mode_settings.get(cfg.mode)
    for key in MODE_SETTINGS if reads is not None else ():
        if key not in reads and _given(cfg, key):
            owner = "|".join(m for m, keys in task.mode_settings.items() if key in keys)
            raise UserError(f"{key}= is a setting of mode={owner}, which mode={cfg.mode} does "
                            f"not read; expected it left out, or mode={owner}")
    out = runtime.run_dir(cfg)
    path = out / f"{cfg.mode}.json"
    if path.exists():
        raise UserError(f"run_dir={str(out)!r} already holds {path.name} of an earlier "
                        f"mode={cfg.mode}; expected a new folder (without run_dir=, each run "
                        f"gets its own)")
    result = mode(cfg)
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")
    print(f"results: {path}", file=sys.stderr)
    return result


def run(task: Task, cfg: DictConfig) -> dict:
    """``cfg.mode``: ``train`` or one of the task's other modes."""
    modes = {name: partial(run_mode, task, fn) for name, fn in task.modes().items()}
    return select_mode(cfg, task.name, {"train": partial(train, task), **modes})(cfg)
