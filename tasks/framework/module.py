"""``TaskModule``: the LightningModule base of every task.

A task subclasses it with its loss and metrics (``training_step``, ``validation_step``,
...). The base builds the network from its config (only this project's model classes),
sets up the optimizer and schedule, writes the checkpoint metadata, and restores a module
for inference with ``from_checkpoint``.
"""

from __future__ import annotations

from typing import ClassVar

import lightning as L
import torch

from .checkpoints import CKPT_KEY, check_model_target, load_checkpoint, shape_mismatches
from .errors import UserError
from .optim import configure_optimization


def build_model(model_cfg: dict, source: str = "model") -> torch.nn.Module:
    """The network a model config names; an impossible setting (a head count that does not
    divide the width, a backend this machine lacks) is a UserError naming it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    check_model_target(model_cfg, source)
    try:
        return instantiate(model_cfg)
    except (ValueError, TypeError, InstantiationException) as exc:
        cause = exc
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        msg = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        if isinstance(cause, InstantiationException):  # Hydra's wording; keep its first line
            msg = msg.removeprefix("Error in call to target ")
        raise UserError(f"{source} ({model_cfg.get('_target_')}) cannot be built: {msg}") \
            from None


class TaskModule(L.LightningModule):
    """Base of every task's LightningModule.

    Args:
        model_cfg: the network's config (``_target_`` + constructor arguments); stored in
            every checkpoint, so ``from_checkpoint`` rebuilds the same network.
        meta: what inference needs besides the weights (a tokenizer, class names,
            normalisation); stored in every checkpoint and read back as ``self.meta``.
        optimizer_cfg, scheduler_cfg: ``_partial_`` configs (training only).
        total_steps: steps of the learning-rate schedule.
    """

    task: ClassVar[str] = ""
    # The metadata every checkpoint of this task holds, by type (None: any value).
    meta_types: ClassVar[dict[str, type | tuple[type, ...] | None]] = {}

    def __init__(self, *, model_cfg: dict, meta: dict | None = None, optimizer_cfg=None,
                 scheduler_cfg=None, total_steps: int = 1):
        super().__init__()
        self.model_cfg, self.meta = model_cfg, dict(meta or {})
        self.model = build_model(model_cfg)
        self.optimizer_cfg, self.scheduler_cfg = optimizer_cfg, scheduler_cfg
        self.total_steps = total_steps

    def configure_optimizers(self):
        return configure_optimization(self.model, self.optimizer_cfg, self.scheduler_cfg,
                                      self.total_steps, trainer=self.trainer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CKPT_KEY] = {"task": self.task, "model": self.model_cfg, **self.meta}

    @classmethod
    def from_checkpoint(cls, path, **options) -> TaskModule:
        """A module with the checkpoint's network and weights, in eval mode."""
        ckpt = load_checkpoint(path, cls.task)
        meta = dict(ckpt[CKPT_KEY])
        meta.pop("task")
        for key, kind in cls.meta_types.items():
            if key not in meta or kind is not None and not isinstance(meta[key], kind):
                found = f"a {type(meta[key]).__name__}" if key in meta else "nothing"
                raise UserError(f"checkpoint {path} holds {found} as its {key!r}; expected a "
                                f"{cls.task} checkpoint as attnkit writes it")
        try:
            module = cls(model_cfg=meta.pop("model"), meta=meta, **options)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise UserError(f"checkpoint {path} has settings its task cannot use "
                            f"({type(exc).__name__}: {exc}); expected a {cls.task} "
                            f"checkpoint as attnkit writes it") from None
        try:
            module.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:
            own = module.state_dict()
            wrong = shape_mismatches(ckpt["state_dict"], own)
            detail = (f"{len(wrong)} tensors differ in shape (checkpoint vs model), e.g. "
                      f"{wrong[0]}" if wrong else str(exc).splitlines()[-1].strip()[:160])
            raise UserError(f"checkpoint {path}: its weights do not fit its own model config "
                            f"({detail})") from None
        try:  # what the task keeps beside the weights, as a resumed fit reads it
            module.on_load_checkpoint(ckpt)
        except ValueError as exc:
            raise UserError(f"checkpoint {path}: {exc}; expected a {cls.task} checkpoint as "
                            f"attnkit writes it") from None
        return module.eval()
