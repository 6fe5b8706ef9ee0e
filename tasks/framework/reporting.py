"""What a run leaves behind: the metric history and its curves (PNG), ``results.json`` and
the short summary printed at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from .runtime import is_rank_zero


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
        # Every log_every_n_steps steps, at least ten points a run (a run shorter than the
        # interval drew no training curve), and the last step.
        every = max(min(trainer.log_every_n_steps, (trainer.max_steps or 0) // 10), 1)
        if trainer.global_step % every == 0 or trainer.global_step == trainer.max_steps:
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


def plot_confusion(cm: torch.Tensor, classes: list[str], path: Path, title: str) -> Path:
    """A confusion matrix (rows: true class, columns: predicted) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * k, 0.8 + 0.45 * k), dpi=110)
    ax.imshow(cm.numpy(), cmap="Blues")
    for i in range(k):
        for j in range(k):
            if k <= 20:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    # side by side, labels longer than a cell's width would run into each other
    upright = k <= 10 and max(map(len, classes), default=0) <= 3
    ax.set_xticks(range(k), classes, rotation=0 if upright else 90)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
    """Write results.json (atomically) and print a short summary (rank zero only)."""
    if not is_rank_zero():
        return results
    tmp = out / f".results.json.{os.getpid()}"
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(out / "results.json")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    for k, v in results.items():
        if not isinstance(v, dict | list):
            table.add_row(k, _fmt(v))
    Console(width=110).print(table)
    print(f"results: {out / 'results.json'}")
    return results
