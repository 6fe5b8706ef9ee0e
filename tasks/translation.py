"""Translation: ``python -m tasks.translation`` trains an encoder-decoder transformer, then
scores beam-search output on the test split with sacreBLEU; ``mode=translate`` translates
a file (or stdin) line by line.

    python -m tasks.translation                                  # KJV -> Reina-Valera, en-es
    python -m tasks.translation data=ding                        # German -> English
    python -m tasks.translation data.train_file=my.tsv data.src_lang=fr data.tgt_lang=en
    python -m tasks.translation mode=translate ckpt=outputs/translation/X/checkpoints/best.ckpt input=in.txt
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torchmetrics
from omegaconf import DictConfig, OmegaConf

from data.batching import bucketed_loader
from data.cache import cache_dir
from data.errors import read_lines, split_lines
from data.parallel import pad, prepare_bible, prepare_ding, read_pairs, split_pairs, write_tsv
from data.text import Tokenizer, tokenizer_for_run, train_or_load_tokenizer
from modules.losses import head_cross_entropy

from .framework import entry, training
from .framework.checkpoints import start_meta
from .framework.config import require
from .framework.errors import UserError
from .framework.module import TaskModule
from .framework.runtime import is_rank_zero

DEFAULTS = {"bible": prepare_bible, "ding": prepare_ding}


def load_corpus(cfg: DictConfig, out: Path):
    """Pairs -> fixed splits (saved) -> joint tokenizer (the checkpoint's when the run
    continues one) -> id lists."""
    d = cfg.data
    if d.train_file is None and d.source_file is None:
        if d.name not in DEFAULTS:
            raise UserError(f"data.name={d.name!r} has no default corpus; expected one of "
                            f"{sorted(DEFAULTS)} or data.train_file")
        pairs = read_pairs(tsv=DEFAULTS[d.name]())
        source = f"{d.name} ({d.src_lang}-{d.tgt_lang})"
    else:
        pairs = read_pairs(tsv=d.train_file, source=d.source_file, target=d.target_file)
        source = str(d.train_file or f"{d.source_file} + {d.target_file}")
    if d.max_pairs:
        pairs = pairs[:d.max_pairs]
    split = split_pairs(pairs, dev=d.dev_size, test=d.test_size, seed=d.split_seed)
    if is_rank_zero():
        for name, part in split.items():
            write_tsv(part, out / f"{name}.tsv")

    def train():
        text = "\n".join(s for pair in split["train"] for s in pair)
        return train_or_load_tokenizer(text, d.vocab_size, cache_dir() / "tokenized")

    tok = tokenizer_for_run(d.tokenizer, start_meta(cfg, out, "translation"), train)
    return split, tok, source


def encode_pairs(tok: Tokenizer, pairs, max_len: int):
    src = [tok.encode(s)[:max_len - 1] + [tok.EOS] for s, _ in pairs]
    tgt = [[tok.BOS] + tok.encode(t)[:max_len - 2] + [tok.EOS] for _, t in pairs]
    return src, tgt


def make_loader(src, tgt, max_tokens: int, *, seed: int, train: bool, num_workers: int = 0):
    # One budget for both sides: neither padded side of a batch exceeds max_tokens.
    return bucketed_loader(list(zip(src, tgt)), [max(len(s), len(t)) for s, t in zip(src, tgt)],
                           max_tokens, seed=seed, train=train, num_workers=num_workers,
                           collate=lambda b: (pad([s for s, _ in b]), pad([t for _, t in b])))


class TranslationModule(TaskModule):
    """Label-smoothed cross entropy on a ``Seq2SeqTransformer``.

    ``meta``: ``tokenizer`` (the joint sentencepiece model) and ``langs``.
    """

    task = "translation"
    meta_types = {"tokenizer": bytes, "langs": list}

    def __init__(self, *, label_smoothing: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.label_smoothing = label_smoothing
        self.val_nll = torchmetrics.SumMetric()
        self.val_tokens = torchmetrics.SumMetric()

    def _loss(self, batch, smoothing: float, reduction: str = "mean"):
        src, tgt = batch
        hidden = self.model(src, tgt[:, :-1], head=False)
        return head_cross_entropy(hidden, self.model.lm_head, tgt[:, 1:],
                                  ignore_index=self.model.pad_id, label_smoothing=smoothing,
                                  reduction=reduction), (tgt[:, 1:] != self.model.pad_id).sum()

    def training_step(self, batch, batch_idx):
        loss, n = self._loss(batch, self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", n.float(), reduce_fx="sum")
        return loss

    def validation_step(self, batch, batch_idx):
        nll, n = self._loss(batch, 0.0, reduction="sum")
        self.val_nll.update(nll)
        self.val_tokens.update(n)

    def on_validation_epoch_end(self):
        loss = self.val_nll.compute() / self.val_tokens.compute().clamp(min=1)
        self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True)
        self.val_nll.reset()
        self.val_tokens.reset()


def one_line(text: str) -> str:
    """``text`` with its lines (as ``str.splitlines`` breaks them) joined by spaces, so each
    translation stays one line of the output (an undertrained model, decoding byte
    pieces, can emit a form feed or a newline)."""
    return " ".join(text.splitlines())


def check_decode(d: DictConfig) -> None:
    """The decoding settings, checked before training as well as before decoding."""
    require(d.beam_size >= 1, "decode.beam_size", d.beam_size, "at least 1")
    require(d.batch_size >= 1, "decode.batch_size", d.batch_size, "at least 1")
    require(d.no_repeat_ngram_size >= 0, "decode.no_repeat_ngram_size", d.no_repeat_ngram_size,
            "0 (off) or a positive n-gram length")
    require(d.max_len_a > 0 or d.max_len_b >= 1, "decode.max_len_b", d.max_len_b,
            "at least 1 with decode.max_len_a=0 (at most a * source length + b tokens)")


def translate_lines(model, tok: Tokenizer, lines: list[str], cfg: DictConfig) -> list[str]:
    """Beam search over lines, batched by length; detokenized output in input order, one
    line each."""
    d = cfg.decode
    check_decode(d)
    model.eval()
    ids = [tok.encode(s)[:model.max_seq_len - 1] + [tok.EOS] for s in lines]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [""] * len(ids)
    for start in range(0, len(order), d.batch_size):
        chunk = order[start:start + d.batch_size]
        src = pad([ids[i] for i in chunk])
        if d.beam_size == 1:
            hyps = model.greedy(src, max_len_a=d.max_len_a, max_len_b=d.max_len_b,
                                use_cache=d.use_cache,
                                no_repeat_ngram_size=d.no_repeat_ngram_size)
        else:
            hyps = model.beam_search(src, beam_size=d.beam_size,
                                     length_penalty=d.length_penalty, max_len_a=d.max_len_a,
                                     max_len_b=d.max_len_b, use_cache=d.use_cache,
                                     no_repeat_ngram_size=d.no_repeat_ngram_size)
        for i, h in zip(chunk, hyps):
            out[i] = one_line(tok.decode(h))
    return out


def score(hyps: list[str], refs: list[str]) -> dict:
    """sacreBLEU's BLEU and chrF, the length ratio, and ``long_share``: the share of
    hypotheses with more than 1.5x their reference's words (runaway repetition)."""
    import sacrebleu
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    long = sum(len(h.split()) > 1.5 * len(r.split()) for h, r in zip(hyps, refs))
    return {"bleu": b.score, "chrf": c.score, "length_ratio": b.sys_len / max(b.ref_len, 1),
            "long_share": long / max(len(hyps), 1),
            "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


class TranslationTask(training.Task):
    name, module_class = "translation", TranslationModule
    curves = [(["train/loss", "val/loss"], "loss_curves.png", "translation: loss (nats/token)")]

    def modes(self):
        return {"translate": run_translate}

    def prepare(self, cfg: DictConfig, out: Path) -> training.Prepared:
        d = cfg.data
        check_decode(cfg.decode)  # the closing test translation must not fail after training
        require(d.max_tokens >= cfg.model.max_seq_len, "data.max_tokens", d.max_tokens,
                f"at least model.max_seq_len={cfg.model.max_seq_len} (one longest pair)")
        split, tok, source = load_corpus(cfg, out)
        train = encode_pairs(tok, split["train"], cfg.model.max_seq_len)
        dev = encode_pairs(tok, split["dev"], cfg.model.max_seq_len)
        if is_rank_zero():
            tok.save(out / "tokenizer.model")
        model_cfg = training.model_config(cfg, vocab_size=tok.vocab_size, pad_id=tok.PAD,
                                          bos_id=tok.BOS, eos_id=tok.EOS)
        return training.Prepared(
            make_loader(*train, d.max_tokens, seed=cfg.seed, train=True,
                        num_workers=d.num_workers),
            make_loader(*dev, d.max_tokens, seed=cfg.seed, train=False), model_cfg,
            meta={"tokenizer": tok.proto, "langs": [d.src_lang, d.tgt_lang]},
            options={"label_smoothing": cfg.label_smoothing},
            info={"data": source, "pairs": {k: len(v) for k, v in split.items()},
                  "vocab_size": tok.vocab_size},
            data={"split": split, "tokenizer": tok}, split=split)

    def evaluate(self, trainer, module, prep, cfg, out):
        if not trainer.is_global_zero:
            return {}
        module.to("cpu")
        t_dec = time.time()
        test_src = [s for s, _ in prep.data["split"]["test"]]
        refs = [t for _, t in prep.data["split"]["test"]]
        hyps = translate_lines(module.model, prep.data["tokenizer"], test_src, cfg)
        decode_seconds = time.time() - t_dec
        (out / "test.hyp").write_text("\n".join(hyps) + "\n", encoding="utf-8")
        (out / "test.ref").write_text("\n".join(refs) + "\n", encoding="utf-8")
        scores = score(hyps, refs)
        print(f"\n{scores['bleu_signature']}\nBLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}  "
              f"length ratio {scores['length_ratio']:.3f}  over 1.5x the reference "
              f"{scores['long_share']:.1%}")
        examples = list(zip(test_src, hyps, refs))[:cfg.show_examples]
        for s, h, r in examples:
            print(f"\nsrc: {s}\nhyp: {h}\nref: {r}")
        return {"val_loss": float(trainer.checkpoint_callback.best_model_score or float("nan")),
                **scores, "decode": OmegaConf.to_container(cfg.decode),
                "test_sentences_per_second": len(hyps) / max(decode_seconds, 1e-9),
                "examples": [{"src": s, "hyp": h, "ref": r} for s, h, r in examples]}


def run_translate(cfg: DictConfig) -> dict:
    if not cfg.ckpt:
        raise UserError("mode=translate needs ckpt=PATH, a checkpoint of the translation task")
    if not cfg.input:
        raise UserError("mode=translate needs input=FILE (or input=- for stdin)")
    module = TranslationModule.from_checkpoint(cfg.ckpt)
    tok = Tokenizer(module.meta["tokenizer"])
    if cfg.input == "-":
        # stdin is read as bytes (its text layer may carry undecodable bytes through as
        # surrogates); its CR LF and CR ends become LF here
        try:
            text = sys.stdin.buffer.read().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UserError(f"input=- (stdin) is not UTF-8 text ({exc.reason} at byte "
                            f"{exc.start}); convert it to UTF-8") from None
        lines = split_lines(text.replace("\r\n", "\n").replace("\r", "\n"))
    else:
        path = Path(str(cfg.input)).expanduser()
        if path.is_dir():
            raise UserError(f"input={str(path)!r} is a folder; expected a text file, one "
                            f"sentence a line (or - for stdin)")
        if not path.is_file():
            raise UserError(f"input={str(path)!r} does not exist; expected a text file, one "
                            f"sentence a line (or - for stdin)")
        lines = read_lines(path, "input")
    hyps = translate_lines(module.model, tok, lines, cfg)
    for h in hyps:
        print(h)
    limit = module.model.max_seq_len - 1  # translate_lines cuts the source to it
    cut = [n for n, line in enumerate(lines, 1) if len(tok.encode(line)) > limit]
    if cut:  # stdout holds the translations alone, line for line
        shown = ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else "")
        print(f"note: {len(cut)} input line(s) have more than the model's {limit} source "
              f"tokens and were translated from their first {limit} only (line {shown}); "
              f"split them into sentences", file=sys.stderr)
    return {"translations": hyps, "langs": module.meta["langs"], "cut_lines": cut}


TASK = TranslationTask()


def run(cfg: DictConfig) -> dict:
    """Train (or, with ``mode=translate``, translate a file) and return the results dict."""
    return training.run(TASK, cfg)


if __name__ == "__main__":
    entry.main("translation", run)
