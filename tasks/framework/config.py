"""Checks on the configuration: the command line before anything runs, and the mode."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# conf/<task>.yaml's hydra.run.dir is run_dir= when given (not a second folder under
# outputs/), and a mode's record of its config does not replace a training run's .hydra
OmegaConf.register_new_resolver("or_else", lambda value, default: value or default,
                                replace=True)
OmegaConf.register_new_resolver(
    "config_record", lambda mode: ".hydra" if mode == "train" else f".hydra-{mode}",
    replace=True)


def _leaves(cfg, prefix=""):
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], cfg


def _one_line(exc: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line composition errors as one sentence."""
    parts = []
    for e in (exc, exc.__cause__):
        if e is None:
            continue
        for line in str(e).splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            if line and not line.startswith(("full_key:", "object_type", "reference_type",
                                             "Set the environment")) and line not in parts:
                parts.append(line)
    return "; ".join(parts).replace(":; ", ": ") or type(exc).__name__


# Lightning's Trainer settings that take more than one type: 8 or "auto" devices, 250 steps
# or 0.5 of an epoch, "bf16-mixed" or 16
UNION_TYPES = {
    "trainer.devices": (int, str, list),
    "trainer.precision": (int, str),
    "trainer.val_check_interval": (int, float, str),
    "trainer.limit_val_batches": (int, float),
    "trainer.limit_train_batches": (int, float),
    "trainer.gradient_clip_val": (int, float),
    "trainer.max_time": (str, dict),
}

# Switches where null has a meaning of its own (fused: torch's default for the device)
NULLABLE_BOOLS = {"optimizer.fused"}


def _type_errors(cfg: dict, defaults: DictConfig) -> None:
    """An override whose type differs from the default's (``trainer.max_steps=abc``); a
    default that interpolates another key (``${data.img_size}``) has that key's type, and
    a list default takes a list or one string (``data.train_files=a.txt``)."""
    actual = dict(_leaves(cfg))
    for key, default in _leaves(OmegaConf.to_container(defaults, resolve=False)):
        if key not in actual or default is None or key.startswith("hydra."):
            continue
        value = actual[key]
        if value is None and type(default) is bool and key not in NULLABLE_BOOLS \
                and not key.startswith("trainer."):  # Lightning's own: null is its default
            raise UserError(f"{key}=null is not valid: expected true or false")
        if value is None or isinstance(value, str) and value.startswith("${"):
            continue
        if key in UNION_TYPES:
            if not isinstance(value, UNION_TYPES[key]) or isinstance(value, bool):
                names = " or ".join(t.__name__ for t in UNION_TYPES[key])
                raise UserError(f"{key}={value!r} is not valid: expected {names}")
            continue
        if isinstance(default, str) and default.startswith("${"):
            try:
                default = OmegaConf.select(defaults, key)
            except Exception:  # a resolver that needs Hydra's runtime (${now:...})
                continue
            if default is None or isinstance(default, (DictConfig, ListConfig)):
                continue
        numbers = isinstance(default, list) and default and all(
            isinstance(v, (int, float)) for v in default)
        ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,),
              list: (list,) if numbers else (list, str)}.get(type(default))
        if ok is None or isinstance(value, ok) and not (type(default) is int and
                                                         isinstance(value, bool)):
            continue
        hint = (f" (text that reads as a number goes in quotes: '{key}=\"{value}\"')"
                if isinstance(default, str) and isinstance(value, (int, float)) else "")
        raise UserError(f"{key}={value!r} is not valid: expected {type(default).__name__} "
                        f"like the default {default!r}{hint}")


def _is_group(key: str) -> bool:
    """``model`` or ``hydra/launcher`` (a config group), not ``seed`` (a value)."""
    return "/" in key or (CONF_DIR / key).is_dir()


def _unknown_keys(defaults: DictConfig, overrides: list[str]) -> None:
    """``data.pico_utterance=5``: a key the task does not have, with the nearest it has."""
    import difflib
    absent = object()
    for o in overrides:
        key = o.split("=")[0]
        if (key.startswith("~") and not _is_group(key[1:])
                and OmegaConf.select(defaults, key[1:], default=absent) is not absent):
            raise UserError(f"{o} removes the setting {key[1:]}, which the task reads; "
                            f"expected {key[1:]}=VALUE (null where the setting allows it)")
        if ("=" not in o or key.startswith(("+", "~", "hydra.")) or _is_group(key)
                or OmegaConf.select(defaults, key, default=absent) is not absent):
            continue
        known = [k for k, _ in _leaves(OmegaConf.to_container(defaults, resolve=False))]
        groups = [d.name for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "hydra"]
        near = difflib.get_close_matches(key, known + groups, n=1, cutoff=0.6)
        raise UserError(f"{key} is not a setting of this task; expected "
                        + (f"{near[0]}" if near else "a key of conf/ (print them with --cfg job)")
                        + f", or +{key}=... to add a new one")


def _sweep_jobs(args: list[str]) -> list[list[str]]:
    """The command lines of a multirun sweep (``-m optimizer.lr=1e-3,3e-3 model=a,b``) that
    together hold every swept value once: the first value of each sweep, then each other
    value in turn with the rest at their first. A glob over a config group
    (``model=glob(lm_*)``) takes the group's files in ``conf/`` it matches; a sweep only a
    sweeper plugin can list (``interval(0,1)`` for Optuna) is left to that sweeper."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    options = []
    for o in OverridesParser.create().parse_overrides(args):
        if not o.is_sweep_override():
            options.append([o.input_line])
        elif isinstance(o.value(), Glob):
            folder = CONF_DIR / o.key_or_group
            names = sorted(f.stem for f in folder.glob("*.yaml")) if folder.is_dir() else []
            options.append([f"{o.get_key_element()}={v}" for v in o.value().filter(names)])
        elif o.is_discrete_sweep():
            options.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            options.append([])
    first = [vals[:1] for vals in options]
    jobs = [sum(first, [])]
    for i, vals in enumerate(options):
        jobs += [sum(first[:i] + [[v]] + first[i + 1:], []) for v in vals[1:]]
    return jobs


def check_command_line(config_name: str, overrides: list[str]) -> None:
    """Compose the config the command line asks for before Hydra runs it: a misspelled key,
    an unknown config group option, a value of the wrong type or out of its range
    (``SHARED_RANGES``) is one UserError. A multirun (``-m``) checks every value its
    sweeps take; command lines with other flags (``--help``, ``--cfg``) are left to Hydra."""
    flags = {a for a in overrides if a.startswith("-")}
    if flags - {"-m", "--multirun"}:
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException
    args = [a for a in overrides if a not in flags]
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        OverridesParser.create().parse_overrides(args)
    except OverrideParseException as exc:
        reason = str(exc).splitlines()[0].split(":")[0]
        raise UserError(f"{exc.override} cannot be read as an override ({reason}); expected "
                        f"key=value, with a value that holds brackets, commas, quotes or "
                        f"non-ASCII letters in quotes: 'key=\"...\"'") from None
    defaults_of: dict[tuple, DictConfig] = {}  # per choice of config groups
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            for job in _sweep_jobs(args) if flags else [args]:
                groups = tuple(o for o in job
                               if "=" in o and _is_group(o.split("=")[0].lstrip("+~")))
                if groups not in defaults_of:
                    defaults_of[groups] = compose(config_name, overrides=list(groups))
                _unknown_keys(defaults_of[groups], job)
                cfg = compose(config_name, overrides=job, return_hydra_config=True)
                _type_errors(OmegaConf.to_container(cfg, resolve=False), defaults_of[groups])
                check_shared_ranges(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UserError(_one_line(exc)) from None


def _finite_nonnegative(v: float) -> bool:
    return 0 <= v < math.inf


# Settings with a range, in whichever task has them: (key, valid, what is expected). Checked
# once for every mode, before any work.
SHARED_RANGES = (
    ("data.batch_size", lambda v: v >= 1, "a positive batch size"),
    ("data.num_workers", lambda v: v >= 0, "a count of loader processes >= 0"),
    ("trainer.val_check_interval", lambda v: v > 0,
     "a positive number of steps (or, with trainer.check_val_every_n_epoch set, a fraction "
     "of an epoch in (0, 1])"),
    ("trainer.limit_val_batches", lambda v: v > 0,
     "a number of batches or a fraction > 0 (null: all); the best checkpoint is chosen on "
     "validation"),
    ("label_smoothing", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("top_k", lambda v: v >= 1, "a count >= 1"),
    ("decode.beam_size", lambda v: v >= 1, "a beam size >= 1 (1: greedy)"),
    ("decode.lm_order", lambda v: 0 <= v <= 16, "an n-gram order in 0..16 (0: no LM)"),
    ("decode.lm_weight", _finite_nonnegative, "a finite weight >= 0"),
    ("decode.lm_bonus", math.isfinite, "a finite number"),
    ("generate.max_new_tokens", lambda v: v >= 1, "a count >= 1"),
    ("generate.temperature", lambda v: v >= 0, "a temperature >= 0 (0: greedy)"),
    ("generate.top_k", lambda v: v >= 0, "a count >= 0 (0: off)"),
    ("generate.top_p", lambda v: 0 < v <= 1, "a probability in (0, 1]"),
    ("data.img_size", lambda v: v >= 1, "a size in pixels >= 1"),
    ("data.channels", lambda v: v in (1, 3), "1 (grey) or 3 (RGB)"),
    ("data.n_mels", lambda v: v >= 1, "a number of mel bins >= 1"),
    ("data.max_text_len", lambda v: v >= 2, "a length in tokens >= 2"),
    ("data.questions_per_image", lambda v: v >= 1, "a count >= 1 (null: all)"),
    ("eval.rerank_k", lambda v: v >= 1, "a count >= 1"),
    ("data.table_lr_scale", lambda v: v > 0,
     "a number > 0 (optimizer.embedding_lr_scale follows it; 1: the token table at optimizer.lr)"),
    ("data.augment.mix_prob", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("data.augment.mixup_alpha", _finite_nonnegative, "a Beta concentration >= 0 (0: off)"),
    ("data.augment.cutmix_alpha", _finite_nonnegative, "a Beta concentration >= 0 (0: off)"),
    ("data.augment.num_ops", lambda v: v >= 0, "a count of operations >= 0"),
    ("data.augment.magnitude", lambda v: 0 <= v <= 30, "a RandAugment magnitude in 0..30"),
    ("data.shift", lambda v: v >= 0, "a shift in pixels >= 0 (0: off)"),
    ("model.freq_masks", lambda v: v >= 0, "a count of masks >= 0 (0: off)"),
    ("model.time_masks", lambda v: v >= 0, "a count of masks >= 0 (0: off)"),
    ("model.freq_width", lambda v: v >= 0, "a mask width in mel bins >= 0"),
    ("model.time_width", lambda v: v >= 0, "a mask width in frames >= 0"),
    ("model.patch_size", lambda v: v >= 1, "a patch size in pixels >= 1"),
    ("model.vision.patch_size", lambda v: v >= 1, "a patch size in pixels >= 1"),
    ("loss.contrastive", _finite_nonnegative, "a finite weight >= 0"),
    ("loss.match", _finite_nonnegative, "a finite weight >= 0"),
    ("loss.answer", _finite_nonnegative, "a finite weight >= 0"),
    ("model.sentence_weight", _finite_nonnegative,
     "a finite weight >= 0 of the sentence head's cosine beside the text encoder's"),
    ("eval.rerank_alpha", _finite_nonnegative,
     "a finite weight >= 0 of the contrastive logit beside the match logit"),
    ("eval.memory.max_pairs", lambda v: v >= 1, "a count of training pairs >= 1"),
    ("eval.memory.neighbours", lambda v: v >= 1, "a count of training pairs >= 1"),
    ("eval.memory.temperature", lambda v: 0 < v < math.inf, "a finite temperature > 0"),
    ("eval.memory.text_weight", _finite_nonnegative, "a finite weight >= 0"),
    ("eval.memory.image_weight", _finite_nonnegative, "a finite weight >= 0"),
    ("eval.memory.hubness", lambda v: v >= 0, "a count of scores >= 0 (0: none)"),
    ("decode.length_penalty", math.isfinite,
     "a finite exponent of the length normalisation (0: none; < 0 favours shorter output)"),
    ("decode.max_len_a", _finite_nonnegative, "a finite number >= 0 (tokens per source token)"),
    ("decode.max_len_b", lambda v: v >= 0, "a number of tokens >= 0"),
)


# Settings that take one of a few words, in whichever task has them.
SHARED_CHOICES = (
    ("data.on_bad_image", ("skip", "error")),
    ("data.on_bad_audio", ("skip", "error")),
)


def check_shared_ranges(cfg: DictConfig) -> None:
    """A setting outside its range (``top_k=-1``) or its choices is one ``UserError``."""
    for key, valid, expected in SHARED_RANGES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and "null" not in expected and OmegaConf.select(
                cfg, key, default="absent") != "absent":  # present, and set to null
            raise UserError(f"{key}=null is not valid: expected {expected}")
        if isinstance(value, int | float) and not isinstance(value, bool) and not valid(value):
            raise UserError(f"{key}={value!r} is not valid: expected {expected}")
    for key, choices in SHARED_CHOICES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in choices:
            raise UserError(f"{key}={value!r} is not valid: expected one of {list(choices)}")
    every = OmegaConf.select(cfg, "trainer.check_val_every_n_epoch", default=None)
    interval = OmegaConf.select(cfg, "trainer.val_check_interval", default=None)
    if isinstance(interval, float) and (every is None or interval > 1):
        why = (" (a fraction of an epoch needs trainer.check_val_every_n_epoch=N, here null: "
               "the runs count steps, not epochs)" if every is None
               else " or a fraction of an epoch in (0, 1]")
        raise UserError(f"trainer.val_check_interval={interval!r} is not valid: expected a "
                        f"whole number of steps{why}")


def select_mode(cfg: DictConfig, task: str, modes: dict[str, Callable]) -> Callable:
    """The entry point for ``cfg.mode``; an unknown mode or a shared setting out of its range
    is a one-line error."""
    check_shared_ranges(cfg)
    if cfg.mode not in modes:
        raise UserError(f"mode={cfg.mode!r} is not a mode of the {task} task; expected one of "
                        f"{sorted(modes)}")
    return modes[cfg.mode]


def require(ok: bool, key: str, value, expected: str) -> None:
    """A config value outside its range: ``require(ctx > 0, "data.context", ctx, "> 0")``."""
    if not ok:
        raise UserError(f"{key}={value!r} is not valid: expected {expected}")
