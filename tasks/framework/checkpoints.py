"""Checkpoints: loading without running code, weights-only init, resume, RNG state.

Every file a user points at (``ckpt=``, ``init_from=``, ``resume=``, a timm ``.pth``) is
read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers
only, so a crafted pickle cannot run code. The network class named in a checkpoint's
metadata is built only if it is one of this project's model classes (``MODEL_TARGETS``):
a file naming ``builtins.open`` or ``os.remove`` as its model is refused before anything
is called.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import pickle
import pickletools
import random
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, ListConfig

from .errors import UserError

log = logging.getLogger("attnkit")

CKPT_KEY = "attnkit"  # our metadata inside every Lightning checkpoint

# The network classes a config or checkpoint may name as ``model._target_``.
MODEL_TARGETS = frozenset({
    "modules.lm.CausalLM",
    "modules.seq2seq.Seq2SeqTransformer",
    "modules.vit.VisionTransformer",
    "modules.speech.SpeechEncoder",
    "modules.fusion.TextImageModel",
})


def check_model_target(model_cfg: dict, source: str) -> None:
    """Refuse a model config whose ``_target_`` is not one of our network classes."""
    target = model_cfg.get("_target_") if isinstance(model_cfg, dict) else None
    if target not in MODEL_TARGETS:
        raise UserError(f"{source} names model {target!r}; expected one of "
                        f"{sorted(MODEL_TARGETS)}")
    nested = _nested_target(dict(model_cfg, _target_=None))
    if nested is not None:  # instantiate would call it: sub-configs are plain arguments
        raise UserError(f"{source} names {nested[1]!r} as _target_ of model.{nested[0]}; "
                        f"expected plain arguments below the model's own _target_")


def _nested_target(node, path: str = "") -> tuple[str, object] | None:
    if isinstance(node, dict):
        if node.get("_target_") is not None and path:
            return path.lstrip("."), node["_target_"]
        items = node.items()
    elif isinstance(node, list | tuple):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return None
    for k, v in items:
        found = _nested_target(v, f"{path}.{k}")
        if found is not None:
            return found
    return None


def _names_globals(path: Path) -> bool:
    """Whether ``path`` is a whole pickle (raw, or the ``data.pkl`` of a torch zip file) that
    names a class or function, read with ``pickletools``, which only lists the opcodes."""
    ops: set[str] = set()
    try:
        with contextlib.ExitStack() as stack:
            if zipfile.is_zipfile(path):
                zf = stack.enter_context(zipfile.ZipFile(path))
                name = next((n for n in zf.namelist() if n.endswith("/data.pkl")), None)
                if name is None:
                    return False
                f = stack.enter_context(zf.open(name))
            else:
                f = stack.enter_context(open(path, "rb"))
            for op, _, _ in pickletools.genops(f):  # streamed: a large file is not held
                ops.add(op.name)
    except Exception:  # not a pickle to the end: nothing it names can be trusted either
        return False
    return "STOP" in ops and bool({"GLOBAL", "STACK_GLOBAL", "INST"} & ops)


def _cause(message: str) -> str:
    """The line of a ``torch.load`` error that says what failed, past torch's general
    advice about ``weights_only``."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return next((ln for ln in lines if not ln.startswith(advice)), lines[0] if lines else "")


def safe_load(path: str | os.PathLike, what: str) -> object:
    """``torch.load`` with pickle code execution disabled; unreadable files are UserErrors."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; expected a checkpoint file (a run's "
                        f"checkpoints/best.ckpt or last.ckpt)")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    if path.suffix == ".safetensors":
        folder = (f"; a Hugging Face model is read from its folder: init_from={path.parent}"
                  if (path.parent / "config.json").is_file() else "")
        raise UserError(f"{what} {path} is a safetensors file; expected an attnkit checkpoint "
                        f"(.ckpt; init_from= also reads safetensors weights where the task "
                        f"takes another toolkit's){folder}")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip file, or a pickle
        kind = "an empty file" if not head else f"a file that starts with {head!r}"
        raise UserError(f"{what} {path} is not a PyTorch file ({kind}); expected a "
                        f"checkpoint written by torch.save, such as a run's "
                        f"checkpoints/best.ckpt")
    try:
        with warnings.catch_warnings():  # torch's note on a raw pickle's protocol: noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only reader names a refused class or function as a GLOBAL; a
        # pickle it cannot follow may still name one, which a read that runs nothing finds.
        # Other failures (bytes that are no pickle at all) are an unreadable file.
        if re.search(r"unsupported global", str(exc), re.IGNORECASE) or _names_globals(path):
            raise UserError(f"{what} {path} holds Python objects other than tensors and plain "
                            f"data, which are not loaded (they could run code); expected a "
                            f"checkpoint or state dict of tensors") from None
        raise UserError(f"{what} {path} cannot be read (UnpicklingError: "
                        f"{_cause(str(exc))[:120]}); it may be truncated or not a "
                        f"checkpoint") from None
    except Exception as exc:
        raise UserError(f"{what} {path} cannot be read ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); it may be "
                        f"truncated or not a checkpoint") from None


def load_weights_file(path: str | os.PathLike, expected: str) -> object:
    """A state dict from ``.safetensors`` (never code) or a torch file read weights-only;
    ``expected`` names what the file should be, for the error message."""
    path = Path(str(path)).expanduser()
    if path.suffix != ".safetensors":
        return safe_load(path, "init_from")
    if not path.is_file():
        raise UserError(f"init_from {path} does not exist")
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as exc:
        raise UserError(f"init_from {path} cannot be read as safetensors "
                        f"({type(exc).__name__}); expected {expected}") from None


def load_checkpoint(path: str | os.PathLike, task: str) -> dict:
    """A checkpoint of ``task``; any other file is an error that says what it is."""
    return checked_checkpoint(safe_load(path, "checkpoint"), path, task)


def checked_checkpoint(ckpt: object, path: str | os.PathLike, task: str) -> dict:
    """``ckpt``, read from ``path``, if it is an attnkit checkpoint of ``task``."""
    meta = ckpt.get(CKPT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "state_dict" not in ckpt:
        raise UserError(f"checkpoint {path} was not written by attnkit (no {CKPT_KEY!r} "
                        f"metadata); expected a {task} checkpoint")
    if meta.get("task") != task:
        raise UserError(f"checkpoint {path} is from the {meta.get('task')!r} task; expected a "
                        f"{task!r} checkpoint")
    check_model_target(meta.get("model"), f"checkpoint {path}")
    require_tensor_dict(ckpt["state_dict"], f"checkpoint {path}",
                        "tensors by name, as attnkit writes them")
    bad = _hydra_syntax(meta)
    if bad is not None:
        raise UserError(f"checkpoint {path} holds {bad[1]!r} at {bad[0]}; expected plain "
                        f"values (a checkpoint's settings are never interpolated or "
                        f"given to instantiate's options)")
    return ckpt


INSTANTIATE_KEYS = {"_partial_", "_args_", "_convert_", "_recursive_"}


def _hydra_syntax(node, path: str = CKPT_KEY) -> tuple[str, object] | None:
    """The first key of instantiate's options (``_partial_``...) or ``${...}`` string in a
    checkpoint's metadata: the model is built from it, and an interpolation there would be
    resolved (``${oc.env:TOKEN}`` reads the environment)."""
    if isinstance(node, str):
        return (path, node) if "${" in node else None
    if isinstance(node, dict):
        for k, v in node.items():
            if k in INSTANTIATE_KEYS:
                return f"{path}.{k}", k
            found = _hydra_syntax(v, f"{path}.{k}")
            if found is not None:
                return found
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            found = _hydra_syntax(v, f"{path}.{i}")
            if found is not None:
                return found
    return None


def model_state(path: str | os.PathLike, task: str, module: torch.nn.Module | None = None,
                named_rows: dict[str, str] | None = None) -> dict:
    """The ``model.*`` weights of a ``task`` checkpoint, with the prefix removed.

    ``named_rows``: output layer -> the metadata key naming its rows (class names,
    answers); those rows are moved to the names of ``module`` (a ``TaskModule``: its
    ``meta`` and ``model``) by ``rows_by_name``.
    """
    ckpt = load_checkpoint(path, task)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
             if k.startswith("model.")}
    if named_rows:
        own = module.model.state_dict()
        for layer, key in named_rows.items():
            state = rows_by_name(state, own, layer, ckpt[CKPT_KEY].get(key),
                                 module.meta.get(key), source=str(path))
    return state


def rows_by_name(state: dict, own: dict, layer: str, old: list | None, new: list | None,
                 source: str = "") -> dict:
    """``state`` with the rows of the output layer ``layer`` (``.weight`` and ``.bias``, a
    row per class) moved from the checkpoint's names ``old`` to this run's ``new``: a name
    in both keeps its trained row, a new name the model's own fresh row. Rows stand for
    names, not places: fine-tuning on other classes, even as many, inherits no row of
    another class."""
    if old is None or new is None or list(old) == list(new):
        return state
    index = {name: i for i, name in enumerate(old)}
    state = dict(state)
    for key in (f"{layer}.weight", f"{layer}.bias"):
        if key in state and key in own:
            rows = own[key].clone()
            for j, name in enumerate(new):
                if name in index:
                    rows[j] = state[key][index[name]]
            state[key] = rows
    kept = sum(name in index for name in new)
    log.info("init_from %s: %s keeps the rows of %d of this run's %d names; %d start fresh",
             source, layer, kept, len(new), len(new) - kept)
    return state


def require_tensor_dict(state: object, source: str, expected: str = "tensors by name") -> None:
    """A ``UserError`` naming what keeps ``state`` (read from ``source``) from being a state
    dict, a mapping of names to tensors: "that is a list", "whose 'a.weight' is a int"."""
    if not isinstance(state, dict):
        problem = f"that is a {type(state).__name__}"
    else:
        problem = next((f"whose {k!r} is a {type(v).__name__}" for k, v in state.items()
                        if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if problem:
        raise UserError(f"{source} has a state dict {problem}; expected {expected}")


def overrides_to_match(have: dict, want: dict, cls, prefix: str = "model.",
                       via: dict[str, str] | None = None) -> list[str]:
    """Command-line overrides that turn the model config ``have`` (arguments of ``cls``, its
    defaults where absent) into ``want``: the settings another toolkit's weights were
    trained under. ``via``: keys set through a data setting (``img_size`` ->
    ``data.img_size``); a key neither config nor ``via`` names is added with ``+``.
    ``layer_scale`` is a starting value the loaded weights replace: any set value matches
    a set one."""
    via = via or {}
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    out = []
    for key, value in want.items():
        current = have.get(key, defaults.get(key))
        if current == value or (key == "layer_scale" and None not in (current, value)):
            continue
        name = via.get(key, prefix + key)
        plus = "" if key in have or key in via else "+"
        shown = (str(value).lower() if isinstance(value, bool)
                 else f"[{','.join(map(str, value))}]" if isinstance(value, list | tuple)
                 else value)
        out.append(f"{plus}{name}={shown}")
    return out


def shape_mismatches(state: dict, own: dict) -> list[str]:
    """``"name (checkpoint shape) vs (model shape)"`` for each tensor both have, shaped apart."""
    return [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
            if k in own and own[k].shape != v.shape]


def init_weights_from(module: torch.nn.Module, state: dict, *, strict: bool, source: str,
                      skip: Callable[[str], bool] = lambda k: False) -> dict:
    """Load weights only, reporting missing and unexpected keys; shape mismatches and, when
    strict, any missing or unexpected key are errors naming them."""
    require_tensor_dict(state, f"init_from {source}")
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not skip(k)}
    wrong = shape_mismatches(state, own)
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


def preemption_checkpoint(out: Path) -> Path:
    """Where a preempted SLURM job leaves its state (``runtime.SlurmRequeue``); it is removed
    once the run's training has finished."""
    return out / "checkpoints" / "preempted.ckpt"


def resume_path(cfg: DictConfig, out: Path) -> str | None:
    """``resume=PATH``; ``resume=auto``: the newer of the run directory's last checkpoint and
    its preemption checkpoint, if any. A requeued SLURM job (``SLURM_RESTART_COUNT`` set)
    without ``resume`` is ``resume=auto``: it goes on where it stopped, in the same run
    directory, instead of starting over there."""
    preempted = preemption_checkpoint(out)
    restarted = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    if not cfg.get("resume") and not restarted:
        return None
    if not cfg.get("resume") or cfg.resume == "auto":
        found = [p for p in (out / "checkpoints" / "last.ckpt", preempted) if p.is_file()]
        if not found and cfg.get("resume") == "auto" and not restarted:
            print(f"note: resume=auto found no checkpoint in {out / 'checkpoints'}; this is "
                  f"a new run")
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
    ckpt = load_checkpoint(cfg.resume, cfg.task)  # fail early with a clear message
    if "pytorch-lightning_version" not in ckpt:
        raise UserError(f"resume={cfg.resume} holds weights only, no training state; expected "
                        f"a run's last.ckpt (init_from= starts a new run from these weights)")
    return str(cfg.resume)


def start_meta(cfg: DictConfig, out: Path, task: str) -> tuple[str, dict] | None:
    """(path, attnkit metadata) of the ``task`` checkpoint this run resumes (``resume``) or
    starts from (``init_from=FILE``); None for a new run or for weights of another toolkit
    (a timm, OpenCLIP or Hugging Face file, which carries no vocabulary of ours).

    The vocabularies in that metadata (tokenizer, class names) say what the checkpoint's
    embedding and output rows stand for, so a run that continues from it reads its data
    with them rather than with ones derived anew from the config."""
    path = resume_path(cfg, out)
    if path is not None:
        return path, load_checkpoint(path, task)[CKPT_KEY]
    if not cfg.get("init_from"):
        return None
    src = Path(str(cfg.init_from)).expanduser()
    if src.is_dir():
        return None
    obj = load_weights_file(src, f"an attnkit {task} checkpoint")
    if not (isinstance(obj, dict) and CKPT_KEY in obj):
        return None
    return str(src), checked_checkpoint(obj, src, task)[CKPT_KEY]


# Settings a resume keeps: they decide the batches to come (order, size, content) or the
# state that continues (the optimizer's, the weight average). Lightning restores the saved
# data position and optimizer state whatever this run's values say, so a change would be
# silently ignored, or skip or repeat data.
RESUME_SETTINGS = ("seed", "data.batch_size", "data.context", "data.max_tokens",
                   "data.max_frames_per_batch", "data.questions_per_image",
                   "trainer.accumulate_grad_batches", "trainer.ema_decay", "optimizer")


def resume_settings(cfg: DictConfig) -> dict:
    """``RESUME_SETTINGS`` of ``cfg`` as flat plain values, for ``meta["resume_settings"]``
    (``optimizer.fused``/``foreach`` are left out: they change the kernel, not the state)."""
    from omegaconf import OmegaConf
    out = {}
    for key in RESUME_SETTINGS:
        value = OmegaConf.select(cfg, key, default=None)
        value = OmegaConf.to_container(value, resolve=True) if isinstance(
            value, (DictConfig, ListConfig)) else value
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            if sub not in ("fused", "foreach", "_partial_"):
                out[f"{key}.{sub}" if sub else key] = v
    return out


def _optimizer_group(target) -> str | None:
    """The ``conf/optimizer`` group whose ``_target_`` is ``target`` (``adamw``), if any."""
    from omegaconf import OmegaConf

    from .config import CONF_DIR
    for path in sorted((CONF_DIR / "optimizer").glob("*.yaml")):
        if OmegaConf.load(path).get("_target_") == target:
            return path.stem
    return None


def check_resume_fits(module: torch.nn.Module, path: str, task: str,
                      optimization: dict | None = None, names: Iterable[str] = (),
                      max_steps: int | None = None) -> None:
    """``resume=`` a checkpoint of other model settings is one error naming a tensor; one
    whose optimizer had other parameter groups (``optimizer.embedding_lr_scale``,
    ``optimizer.embedding_weight_decay``) is one error naming those settings; one whose
    metadata ``names`` (the class names or answers its output rows stand for) differ from
    the module's is one error naming the first difference; so is one trained on another
    split (``split_digest``, kept by the tasks that split their data by seed, and by the LM
    for its training and held-out text).
    ``optimization``: a throwaway ``{"optimizer", "lr_scheduler"}`` of this run's settings,
    into which the saved training state is loaded first (``check_training_state``)."""
    ckpt = load_checkpoint(path, task)
    for key in names:
        theirs, ours = ckpt[CKPT_KEY].get(key), module.meta.get(key)
        if theirs is not None and ours is not None and list(theirs) != list(ours):
            first = next((f"{a!r} vs {b!r}" for a, b in zip(theirs, ours) if a != b),
                         f"{len(theirs)} vs {len(ours)} of them")
            raise UserError(f"resume={path} was trained on other {key} than this run's data "
                            f"gives ({first}); expected the data of the run it came from "
                            f"(init_from= starts a new run from its weights)")
    state = ckpt["state_dict"]
    own = module.state_dict()
    wrong = shape_mismatches(state, own)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if wrong or missing or unexpected:
        detail = (f"{len(wrong)} tensors differ in shape (checkpoint vs model), e.g. {wrong[0]}"
                  if wrong else f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
        raise UserError(f"resume={path} does not fit this model: {detail}; expected the "
                        f"model settings of the run it came from")
    theirs, ours = ckpt[CKPT_KEY].get("split_digest"), module.meta.get("split_digest")
    if theirs is not None and ours is not None and theirs != ours:
        raise UserError(f"resume={path} was trained on another split of the data than this "
                        f"run makes (the seed, the split settings or the data differ), so it "
                        f"would test on items it trained on; expected the seed and data of the "
                        f"run it came from (init_from= starts a new run from its weights)")
    theirs, ours = ckpt[CKPT_KEY].get("resume_settings"), module.meta.get("resume_settings")
    if isinstance(theirs, dict) and ours is not None:  # kept since December 2026
        for key in sorted(set(theirs) | set(ours)):
            if key == "processes" and key in theirs and theirs[key] != ours.get(key):
                raise UserError(f"resume={path} was trained in {theirs[key]} processes (trainer."
                                f"devices x trainer.num_nodes), this run has {ours.get(key)}; its "
                                f"data position counts steps of data.batch_size from each, so "
                                f"expected {theirs[key]} processes (init_from= starts a new run "
                                f"from its weights)")
            if key == "optimizer._target_" and theirs.get(key) != ours.get(key):
                group = _optimizer_group(theirs.get(key))
                raise UserError(f"resume={path} was trained with the optimizer "
                                f"{theirs.get(key)}, this run has {ours.get(key)}; expected "
                                f"the optimizer of the run it came from"
                                + (f" (optimizer={group})" if group else ""))
            if key != "processes" and theirs.get(key) != ours.get(key):
                raise UserError(f"resume={path} was trained with {key}={theirs.get(key)!r}, "
                                f"this run has {ours.get(key)!r}; a resume continues the run as "
                                f"it was saved (its data position and optimizer state), so "
                                f"expected {key}={theirs.get(key)!r} (init_from= starts a new "
                                f"run from its weights)")
    step = ckpt.get("global_step")
    if max_steps is not None and isinstance(step, int) and max_steps < step:
        raise UserError(f"trainer.max_steps={max_steps} is below step {step}, where resume="
                        f"{path} stopped; expected trainer.max_steps of at least {step}")
    if optimization is not None:
        check_training_state(ckpt, path, optimization["optimizer"],
                             optimization["lr_scheduler"]["scheduler"])


def check_training_state(ckpt: dict, path: str, optimizer: torch.optim.Optimizer,
                         scheduler) -> None:
    """The optimizer, scheduler and loop states Lightning will restore, checked and loaded
    into this run's (throwaway) optimizer and scheduler first. A file whose training state
    was cut or edited (a moment buffer of another shape, a parameter group without its
    learning rate, no scheduler state) is one error; Lightning would raise deep inside, or
    the fused AdamW step would read past a buffer's end. What torch itself accepts from an
    older file (a ``step`` stored as a number, a group without a newer AdamW setting such
    as ``decoupled_weight_decay``) is accepted."""
    def bad(what: str, why: str) -> UserError:
        return UserError(f"resume={path}: its {what} cannot be restored ({why}); expected a "
                         f"checkpoint as a run of these settings saved it")
    saved, scheds = ckpt.get("optimizer_states"), ckpt.get("lr_schedulers")
    for what, got in (("optimizer state", saved), ("scheduler state", scheds)):
        if not (isinstance(got, list) and len(got) == 1 and isinstance(got[0], dict)):
            found = f"a list of {len(got)}" if isinstance(got, list) else type(got).__name__
            raise bad(what, f"{found}; expected a list of one")
    saved, params = saved[0], [p for g in optimizer.param_groups for p in g["params"]]
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not isinstance(saved.get("state"), dict):
        raise bad("optimizer state", "no 'state' and 'param_groups'")
    theirs = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if theirs != ours:
        raise UserError(f"resume={path} was trained with optimizer parameter groups of "
                        f"{theirs} tensors, these settings make {ours}; expected the "
                        f"settings of the run it came from (the optimizer group, "
                        f"optimizer.embedding_lr_scale, optimizer.embedding_weight_decay and "
                        f"the objectives trained)")
    # parameters are matched by position, whatever their ids (indices; names under FSDP)
    try:
        index = {pid: n for n, pid in enumerate(pid for g in groups for pid in g["params"])}
    except TypeError as exc:
        raise bad("optimizer state", f"parameter ids that are not indices: {exc}") from None
    for i, s in saved["state"].items():
        if i not in index or not isinstance(s, dict):
            raise bad("optimizer state", f"an entry {i!r} for no parameter")
        shape = tuple(params[index[i]].shape)
        for k, v in s.items():
            if not (v is None or torch.is_tensor(v) or type(v) in (int, float)):
                raise bad("optimizer state", f"{k} of parameter {i} is a {type(v).__name__}")
            if torch.is_tensor(v) and v.ndim and tuple(v.shape) != shape:
                raise bad("optimizer state", f"{k} of parameter {i} has shape "
                          f"{tuple(v.shape)}, the parameter {shape}")
    settings = [set(g) for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)  # fills in settings newer than the file (torch's own)
        scheduler.load_state_dict(dict(scheds[0]))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise bad("optimizer or scheduler state", f"{type(exc).__name__}: {exc}") from None
    for i, (want, g) in enumerate(zip(settings, optimizer.param_groups)):
        if want - set(g):
            raise bad("optimizer state", f"parameter group {i} has no {sorted(want - set(g))}")
    loops = ckpt.get("loops")
    if loops is not None and not (isinstance(loops, dict)
                                  and all(isinstance(v, dict) for v in loops.values())):
        raise bad("loop state", "'loops' is not a mapping of loop states")
    callbacks = ckpt.get("callbacks") or {}
    if not isinstance(callbacks, dict):
        raise bad("callback state", f"'callbacks' is a {type(callbacks).__name__}")
    if callbacks.get("RNGState"):
        try:
            RNGState.check(callbacks["RNGState"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError,
                RuntimeError) as exc:
            raise bad("random state", f"{type(exc).__name__}: {exc}") from None
    rows = (callbacks.get("History") or {}).get("rows", [])
    if not (isinstance(rows, list) and all(isinstance(r, dict) and isinstance(r.get("step"), int)
                                           for r in rows)):
        raise bad("history of curves", "rows that are not {'step': int, ...} records")


class RNGState(Callback):
    """Saves the Python, NumPy and torch (CPU and CUDA) random states in every checkpoint
    and restores them on resume, so dropout, DropPath, MixUp/CutMix and augmentation go on
    exactly as in an uninterrupted run. (Batch order and DataLoader worker seeds come from
    the resumable loader's own seeded generators, not from these states.)"""

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        state = {
            "python": list(random.getstate()[1]) + [random.getstate()[2]],
            "python_version": random.getstate()[0],
            "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                      "has_gauss": np_state[3], "cached_gaussian": np_state[4]},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def _python(state: dict) -> tuple:
        py = state["python"]
        return state["python_version"], tuple(py[:-1]), py[-1]

    @staticmethod
    def _numpy(state: dict) -> tuple:
        n = state["numpy"]
        return ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                n["cached_gaussian"])

    @classmethod
    def check(cls, state: dict) -> None:
        """Restore ``state`` into fresh generators: raises on a cut or edited state, and
        leaves the process's own random states alone."""
        random.Random().setstate(cls._python(state))
        np.random.RandomState().set_state(cls._numpy(state))
        torch.Generator().set_state(state["torch"])

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        random.setstate(self._python(state))
        np.random.set_state(self._numpy(state))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
