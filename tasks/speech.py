"""Speech encoding: ``python -m tasks.speech`` trains a speech encoder for recognition with
CTC (characters or sentencepiece pieces), or for keyword spotting (``experiment=kws``);
``mode=transcribe`` transcribes WAV files with a checkpoint.

    python -m tasks.speech                                   # synthetic English speech, CPU
    python -m tasks.speech experiment=kws                    # 20 keywords
    python -m tasks.speech data.train=my/train.jsonl data.val=my/dev.jsonl data.test='{mine: my/test.jsonl}'
    python -m tasks.speech mode=transcribe ckpt=outputs/speech/X/checkpoints/best.ckpt audio='clips/*.wav'
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import torchmetrics
from omegaconf import DictConfig

from data.batching import bucketed_loader, length_batches, pad_items
from data.cache import cache_dir
from data.errors import read_lines
from data.speech import (
    CHARSET,
    NORMALIZER,
    load_audio,
    narrowband,
    normalize_text,
    read_manifest,
)
from data.text import (
    Tokenizer,
    digest,
    read_each,
    tokenizer_for_run,
    train_or_load_tokenizer,
)
from modules.ctc import LMFusion, beam_decode, greedy_decode
from modules.ngram import CharNgramLM
from modules.speech import LogMel

from .framework import entry, training
from .framework.checkpoints import start_meta
from .framework.config import require
from .framework.errors import UserError
from .framework.module import TaskModule
from .framework.reporting import plot_confusion
from .framework.runtime import is_rank_zero


# --------------------------------------------------------------------------- labels
class Labels:
    """Transcripts <-> label ids. CTC: characters (blank 0, then ``CHARSET``) or
    sentencepiece pieces (its pad id 0 is the blank); keyword spotting: class indices."""

    def __init__(self, kind: str, *, classes: list[str] | None = None,
                 spm: bytes | None = None):
        self.kind, self.classes = kind, classes
        self.tok = Tokenizer(spm) if spm else None
        if kind == "chars":
            self.size = 1 + len(CHARSET)
        elif kind == "sentencepiece":
            self.size = self.tok.vocab_size
        else:
            self.size = len(classes)

    def encode(self, text: str):
        if self.kind == "chars":
            return [1 + CHARSET.index(c) for c in normalize_text(text)]
        if self.kind == "sentencepiece":
            return self.tok.encode(normalize_text(text))
        return self.classes.index(text)

    def decode(self, ids) -> str:
        """The transcript of CTC label ids, its whitespace collapsed as ``normalize_text``
        leaves the references: a leading, trailing or doubled space is not an error."""
        text = ("".join(CHARSET[i - 1] for i in ids if i > 0) if self.kind == "chars"
                else self.tok.decode(ids))
        return " ".join(text.split())

    def pieces(self) -> list[str]:
        """The text each CTC label id adds to a transcript, for the language model: its
        character, or its sentencepiece piece with the word-start space; empty for the
        blank, control and unknown ids and for byte pieces outside printable ASCII (which no
        normalised transcript holds). A transcript's ids joined this way spell it (with a
        leading space for sentencepiece)."""
        if self.kind == "chars":
            return ["", *CHARSET]
        sp, out = self.tok.sp, []
        for i in range(self.size):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                c = chr(int(piece[3:5], 16))
                out.append(c if " " <= c <= "~" else "")
            elif sp.is_control(i) or sp.is_unknown(i) or i == Tokenizer.NL:
                out.append("")
            else:
                out.append(piece.replace("\u2581", " "))
        return out

    def meta(self) -> dict:
        return {"labels": self.kind, "classes": self.classes,
                "spm": self.tok.proto if self.tok else None}


def lm_sentences(texts) -> str:
    """The distinct normalised transcripts, one a line: the text a checkpoint keeps for its
    language model."""
    return "\n".join(sorted({normalize_text(t) for t in texts} - {""}))


def lm_text_file(decode: DictConfig) -> Path | None:
    """``decode.lm_text``, checked to be a file; None when not given."""
    if not decode.lm_text:
        return None
    path = Path(str(decode.lm_text)).expanduser()
    if not path.is_file():
        raise UserError(f"decode.lm_text={decode.lm_text} is not a file; expected a UTF-8 "
                        f"text file, one sentence a line")
    if not any(normalize_text(t) for t in read_lines(path, "decode.lm_text")):
        raise UserError(f"decode.lm_text={decode.lm_text} holds no words (letters and "
                        f"apostrophes, once normalised); expected a UTF-8 text file, one "
                        f"sentence a line")
    return path


LM_BYTES = 100  # memory per character and order of n-gram text, an upper bound of measured 30-60


def available_memory() -> int:
    """Bytes of memory free for new allocations (Linux ``MemAvailable``); 0 if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def language_model(labels: Labels, transcripts: str | None,
                   decode: DictConfig) -> LMFusion | None:
    """The character n-gram of ``decode.lm_order`` over a checkpoint's training transcripts
    (``lm_sentences``) and the lines of ``decode.lm_text``, ready to fuse into the beam
    search; None when it is off, the beam is 1 or there is no text."""
    if not decode.lm_order or decode.beam_size < 2:
        return None
    lines = set(transcripts.split("\n")) if transcripts else set()
    path = lm_text_file(decode)
    if path is not None:
        lines |= {normalize_text(t) for t in read_lines(path, "decode.lm_text")}
    lines.discard("")
    if not lines:
        return None
    pieces = labels.pieces()
    texts = ["".join(pieces[i] for i in labels.encode(t)) for t in sorted(lines)]
    chars = sum(map(len, texts))
    need, free = chars * decode.lm_order * LM_BYTES, available_memory()
    if free and need > free / 2:
        raise UserError(f"decode.lm_order={decode.lm_order} over {chars:,} characters of "
                        f"transcripts and decode.lm_text needs about {need / 2**30:.1f} GiB, "
                        f"more than half the {free / 2**30:.1f} GiB free; expected a lower "
                        f"order, less text, or decode.lm_order=0")
    return LMFusion(CharNgramLM(texts, order=decode.lm_order, alphabet="".join(pieces)),
                    pieces, weight=decode.lm_weight, bonus=decode.lm_bonus)


# --------------------------------------------------------------------------- data
def _manifests(cfg: DictConfig) -> tuple[dict[str, Path], str]:
    """{'train', 'val', and evaluation sets} -> manifest (or folder), and the source."""
    d = cfg.data
    if d.train is None:
        from data.speech import KEYWORDS, prepare_kws, prepare_speech
        if cfg.model.head == "classify":
            root = prepare_kws(gnuspeech_per_keyword=d.gnuspeech_utterances // len(KEYWORDS),
                               pico_per_keyword=d.pico_utterances // len(KEYWORDS))
            source = ("keywords spoken by espeak-ng, GnuSpeech"
                      + (" and Pico" if d.pico_utterances // len(KEYWORDS) else "")
                      + " (train), espeak-ng (val, test) and flite (flite)")
        else:
            root = prepare_speech(train_utterances=d.train_utterances,
                                  gnuspeech_utterances=d.gnuspeech_utterances,
                                  pico_utterances=d.pico_utterances,
                                  kokoro_utterances=d.kokoro_utterances,
                                  kokoro_repeats=d.kokoro_repeats)
            extra = [n for n, k in (("Pico", d.pico_utterances), ("Kokoro", d.kokoro_utterances))
                     if k]
            names = ["espeak-ng", "GnuSpeech", *extra]
            source = ("sentences spoken by " + ", ".join(names[:-1]) + f" and {names[-1]}"
                      + " (train), espeak-ng (val, test) and flite (flite)")
        sets = {name: root / f"{name}.jsonl" for name in ("train", "val", "test", "flite")}
        return {k: v for k, v in sets.items() if v.is_file()}, source
    if d.val is None:
        raise UserError("data.train is set but data.val is not; give a validation manifest "
                        "(JSONL of audio, duration, text) or a folder of x.wav + x.txt")
    sets = {"train": Path(str(d.train)), "val": Path(str(d.val))}
    tests = d.test or {}
    if not isinstance(tests, Mapping):
        raise UserError(f"data.test={tests!r} is not valid: expected named evaluation sets, "
                        f"e.g. 'data.test={{test: test.jsonl}}'")
    for name, path in tests.items():
        if str(name) in sets:
            raise UserError(f"data.test names a set {name!r}, which is data.{name}; expected "
                            f"other names, e.g. 'data.test={{test: test.jsonl}}'")
        sets[str(name)] = Path(str(path))
    return sets, str(d.train)


def _feature_chunk(args) -> list:
    """Worker: features of a chunk of files as float16 arrays (the error for a file that
    cannot be read), those marked narrow heard through ``narrowband`` first. Arrays, not
    tensors: a tensor would come back through a shared-memory file that stays open in the
    receiving process, one per utterance, until the open-file limit stops the run."""
    paths, narrow, n_mels = args
    torch.set_num_threads(1)
    fe = LogMel(n_mels=n_mels)
    out = []
    for path, nb in zip(paths, narrow):
        try:
            audio = load_audio(path)
            out.append(fe(narrowband(audio) if nb else audio).half().numpy())
        except UserError as exc:
            out.append(str(exc))
    return out


def _features(path: Path, cfg: DictConfig, narrow: float = 0.0) -> tuple[list, list, list, int]:
    """(features (T, F) float16, transcripts, voices, skipped) of a manifest, cached on disk;
    computed by ``data.num_feature_workers`` processes. A ``narrow`` share of the
    utterances, drawn by ``cfg.seed``, is heard through an 8 kHz channel first."""
    d = cfg.data
    found = read_manifest(path, on_bad_audio=d.on_bad_audio)
    utts, skipped = found.utterances, len(found.skipped)
    draw = random.Random(f"narrowband-{cfg.seed}")
    marks = [narrow > 0 and draw.random() < narrow for _ in utts]
    key = digest(str(path.resolve()), [(str(u.path), u.text, u.voice) for u in utts],
                 f"n_mels={d.n_mels}", "v2",
                 f"narrowband={float(narrow)!r},seed={cfg.seed}" if narrow else "")
    cached = cache_dir() / "speech-features" / f"{key}.pt"
    if cached.is_file():
        blob = torch.load(cached, weights_only=True)
        return blob["feats"], blob["texts"], blob["voices"], skipped + blob["skipped"]
    paths = [str(u.path) for u in utts]
    chunks = [(paths[i:i + 256], marks[i:i + 256], d.n_mels) for i in range(0, len(paths), 256)]
    workers = max(1, min(d.num_feature_workers, len(chunks)))
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:
            results = [f for part in pool.imap(_feature_chunk, chunks) for f in part]
    else:
        results = [f for c in chunks for f in _feature_chunk(c)]
    feats, texts, voices, bad = [], [], [], 0
    for u, f in zip(utts, results):
        if isinstance(f, str):
            if d.on_bad_audio == "error":
                raise UserError(f)
            bad += 1
            continue
        feats.append(torch.from_numpy(f))
        texts.append(u.text)
        voices.append(u.voice)
    if is_rank_zero():
        from data.cache import atomic_path
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp:
            torch.save({"feats": feats, "texts": texts, "voices": voices, "skipped": bad}, tmp)
    return feats, texts, voices, skipped + bad


def _labels(cfg: DictConfig, train_texts: list[str], start: tuple[str, dict] | None) -> Labels:
    """The output labels; sentencepiece pieces are those of the checkpoint the run continues
    (``start``), if it has them, as its output rows stand for them."""
    if cfg.model.head == "classify":
        return Labels("classes", classes=sorted(set(train_texts)))
    if cfg.data.units == "chars":
        return Labels("chars")
    if cfg.data.units != "sentencepiece":
        raise UserError(f"data.units={cfg.data.units!r}; expected 'chars' or 'sentencepiece'")

    def train():
        text = "\n".join(normalize_text(t) for t in train_texts)
        return train_or_load_tokenizer(text, cfg.data.vocab_size, cache_dir() / "tokenized")

    return Labels("sentencepiece", spm=tokenizer_for_run(None, start, train, key="spm").proto)


def _collate(items):
    feats = pad_items([f for f, _ in items], pad_value=0.0)
    targets = [t for _, t in items]
    if isinstance(targets[0], int):
        return feats.values.float(), feats.lengths, torch.tensor(targets), None
    labels = pad_items(targets, pad_value=0)
    return feats.values.float(), feats.lengths, labels.values, labels.lengths


def make_loader(items, max_frames_per_batch: int, *, seed: int, train: bool,
                num_workers: int = 0):
    return bucketed_loader(items, [len(f) for f, _ in items], max_frames_per_batch,
                           seed=seed, train=train, collate=_collate, num_workers=num_workers)


# --------------------------------------------------------------------------- module
class SpeechModule(TaskModule):
    """CTC loss (recognition) or cross entropy (keyword spotting) on a ``SpeechEncoder``.

    ``meta``: ``labels`` (chars | sentencepiece | classes), ``classes``, ``spm``, ``n_mels``.
    """

    task = "speech"
    meta_types = {"labels": str, "n_mels": int}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        m = self.meta
        self.labels = Labels(m["labels"], classes=m.get("classes"), spm=m.get("spm"))
        self.ctc = self.model.head_kind == "ctc"
        self.val_cer = torchmetrics.text.CharErrorRate()
        self.val_acc = torchmetrics.MeanMetric()

    def _loss(self, batch, reduction: str = "mean"):
        feats, lengths, targets, target_lengths = batch
        logits, out_lengths = self.model(feats, lengths)
        if not self.ctc:
            return F.cross_entropy(logits.float(), targets, reduction=reduction), logits, \
                out_lengths
        log_probs = logits.float().log_softmax(-1)
        loss = F.ctc_loss(log_probs.transpose(0, 1), targets, out_lengths, target_lengths,
                          blank=0, reduction="sum", zero_infinity=True)
        if reduction == "mean":  # per target label, so batches of any size weigh alike
            loss = loss / target_lengths.sum().clamp(min=1)
        return loss, log_probs, out_lengths

    def training_step(self, batch, batch_idx):
        loss, _, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, out, out_lengths = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True,
                 batch_size=int(batch[0].shape[0]))
        if self.ctc:
            hyps = [self.labels.decode(h) for h in greedy_decode(out, out_lengths)]
            refs = [self.labels.decode(t[:n].tolist()) for t, n in zip(batch[2], batch[3])]
            self.val_cer.update(hyps, refs)
        else:
            self.val_acc.update((out.argmax(-1) == batch[2]).float())

    def on_validation_epoch_end(self):
        if self.ctc:
            self.log("val/cer", self.val_cer.compute(), prog_bar=True)
            self.val_cer.reset()
        else:
            self.log("val/acc", self.val_acc.compute(), prog_bar=True)
            self.val_acc.reset()


# --------------------------------------------------------------------------- evaluation
def lm_summary(lm: LMFusion, seconds: float) -> dict:
    return {"kind": f"character {lm.lm.order}-gram, interpolated Kneser-Ney, fused into the "
                    f"beam search", "order": lm.lm.order, "weight": lm.weight,
            "bonus": lm.bonus, "sentences": lm.lm.sentences, "characters": lm.lm.characters,
            "build_seconds": round(seconds, 1)}


@torch.no_grad()
def transcribe_batches(module: SpeechModule, loader, beam_size: int,
                       lm: LMFusion | None = None) -> dict[str, list]:
    """Greedy and beam hypotheses (the beam with ``lm`` fused in; or predicted classes) and
    references of a loader."""
    module.eval()
    out = {"greedy": [], "beam": [], "refs": [], "pred": [], "true": []}
    for feats, lengths, targets, target_lengths in loader:
        logits, out_lengths = module.model(feats, lengths)
        if not module.ctc:
            out["pred"] += logits.argmax(-1).tolist()
            out["true"] += targets.tolist()
            continue
        log_probs = logits.float().log_softmax(-1)
        out["greedy"] += [module.labels.decode(h) for h in greedy_decode(log_probs, out_lengths)]
        if beam_size > 1:
            out["beam"] += [module.labels.decode(h) for h in
                            beam_decode(log_probs, out_lengths, beam_size=beam_size, lm=lm)]
        out["refs"] += [module.labels.decode(t[:n].tolist())
                        for t, n in zip(targets, target_lengths)]
    return out


def error_rates(hyps: list[str], refs: list[str]) -> dict:
    cer = torchmetrics.functional.text.char_error_rate(hyps, refs)
    wer = torchmetrics.functional.text.word_error_rate(hyps, refs)
    return {"cer": round(float(cer), 4), "wer": round(float(wer), 4)}


def _by_voice(voices: list[str], hyps: list, refs: list, score) -> dict:
    """``score(hyps, refs)`` for each voice of a set that names more than one (beam
    hypotheses where there are some), with its number of utterances; else {}."""
    if len(set(voices)) < 2 or not all(voices):
        return {}
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(voices):
        groups.setdefault(v, []).append(i)
    return {v: score([hyps[i] for i in idx], [refs[i] for i in idx]) | {"utterances": len(idx)}
            for v, idx in sorted(groups.items())}


def plot_utterance(module: SpeechModule, feats: torch.Tensor, text: str, path: Path) -> Path:
    """Log-mel spectrogram of one utterance with the CTC posteriors under it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with torch.no_grad():
        logits, _ = module.model(feats.float()[None], torch.tensor([len(feats)]))
    post = logits[0].float().softmax(-1).T.numpy()  # (V, L)
    hyp = module.labels.decode(greedy_decode(logits.log_softmax(-1), torch.tensor(
        [logits.shape[1]]))[0])
    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 5.5), dpi=110, sharex=False)
    a.imshow(feats.float().T.numpy(), origin="lower", aspect="auto", cmap="magma")
    a.set_title(f"log-mel (normalised); reference: {text!r}", fontsize=9)
    a.set_ylabel("mel bin")
    a.set_xlabel("feature frame (10 ms)")
    b.imshow(post, origin="lower", aspect="auto", cmap="Blues", interpolation="nearest")
    names = ["_"] + ([c if c != " " else "␣" for c in CHARSET] if module.labels.kind == "chars"
                     else [str(i) for i in range(1, post.shape[0])])
    if len(names) <= 40:
        b.set_yticks(range(len(names)), names, fontsize=6)
    b.set_xlabel("encoder frame (40 ms)")
    b.set_ylabel("output label")
    b.set_title(f"CTC posteriors (blank = _); greedy: {hyp!r}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class SpeechTask(training.Task):
    name, module_class = "speech", SpeechModule
    named_rows = {"head": "classes"}  # keyword spotting
    curves = [(["train/loss", "val/loss"], "loss_curves.png", "speech: loss"),
              (["val/cer"], "val_cer.png", "validation character error rate (greedy)"),
              (["val/acc"], "val_acc.png", "validation accuracy")]

    def modes(self):
        return {"transcribe": run_transcribe}

    def prepare(self, cfg: DictConfig, out: Path) -> training.Prepared:
        d = cfg.data
        require(d.max_frames_per_batch >= d.max_frames, "data.max_frames_per_batch",
                d.max_frames_per_batch, f"at least data.max_frames={d.max_frames}")
        require(cfg.model.head in ("ctc", "classify"), "model.head", cfg.model.head,
                "'ctc' or 'classify'")
        require(cfg.model.head == "ctc" or not d.kokoro_utterances, "data.kokoro_utterances",
                d.kokoro_utterances, "0 for keyword spotting (Kokoro reads sentences only)")
        for key in ("train_utterances", "gnuspeech_utterances", "pico_utterances",
                    "kokoro_utterances"):
            require(d[key] >= 0, f"data.{key}", d[key], "a count >= 0")
        nb = d.narrowband
        require(isinstance(nb, (int, float)) and not isinstance(nb, bool) and 0 <= nb <= 1,
                "data.narrowband", nb, "a share in [0, 1]")
        require(d.kokoro_repeats >= 1, "data.kokoro_repeats", d.kokoro_repeats, "a count >= 1")
        require(cfg.model.head == "ctc" or not cfg.decode.lm_text, "decode.lm_text",
                cfg.decode.lm_text, "null for keyword spotting (the n-gram reads transcripts)")
        lm_text_file(cfg.decode)
        sets, source = _manifests(cfg)
        feats, texts, voices, skipped = {}, {}, {}, {}
        for name, path in sets.items():
            feats[name], texts[name], voices[name], skipped[name] = _features(
                path, cfg, d.narrowband if name == "train" else 0.0)
            if not feats[name]:
                raise UserError(f"{path} holds no usable utterance ({skipped[name]} skipped)")
        labels = _labels(cfg, texts["train"], start_meta(cfg, out, self.name))
        if labels.kind == "classes":
            for name, path in sets.items():
                unseen = sorted(set(texts[name]) - set(labels.classes))
                if unseen:
                    raise UserError(f"{path} has the label {unseen[0]!r}, which no training "
                                    f"utterance has; expected one of {labels.classes}")
        items, item_voices, dropped, too_long = {}, {}, {}, {}
        for name in sets:
            keep = [(f, labels.encode(t), v) for f, t, v in
                    zip(feats[name], texts[name], voices[name])
                    if cfg.model.head == "classify" or normalize_text(t)]
            # Evaluation scores every utterance: one longer than the model takes counts as
            # all wrong (evaluate), one with fewer encoder frames than labels as decoded.
            too_long[name] = [(y, v) for f, y, v in keep if len(f) > d.max_frames]
            keep = [(f, y, v) for f, y, v in keep if len(f) <= d.max_frames]
            if cfg.model.head == "ctc" and name == "train":  # CTC needs a frame per label
                keep = [(f, y, v) for f, y, v in keep if (len(f) + 3) // 4 >= len(y)]
            item_voices[name] = [v for _, _, v in keep]
            keep = [(f, y) for f, y, _ in keep]
            dropped[name] = len(feats[name]) - len(keep) - len(too_long[name])
            if not keep and name in ("train", "val"):
                raise UserError(f"{sets[name]}: none of its {len(feats[name])} utterances fits "
                                f"(longer than data.max_frames={d.max_frames}, or fewer "
                                f"encoder frames than labels)")
            items[name] = keep
        model_cfg = training.model_config(cfg, num_outputs=labels.size, n_mels=d.n_mels,
                                          max_frames=d.max_frames)
        frames = sum(len(f) for f, _ in items["train"])
        return training.Prepared(
            make_loader(items["train"], d.max_frames_per_batch, seed=cfg.seed, train=True,
                        num_workers=d.num_workers),
            make_loader(items["val"], d.max_frames_per_batch, seed=cfg.seed, train=False),
            model_cfg, meta={**labels.meta(), "n_mels": d.n_mels,
                             "lm_text": (lm_sentences(texts["train"])
                                         if labels.kind != "classes" else None)},
            info={"data": source, "utterances": {k: len(v) for k, v in items.items()},
                  "train_hours": round(frames / 100 / 3600, 2),
                  "skipped_bad_audio": skipped,
                  "dropped": {"train_too_long_or_short": dropped["train"] +
                              len(too_long["train"]),
                              "empty_text": {k: v for k, v in dropped.items() if k != "train"},
                              "too_long_scored_as_errors": {k: len(v) for k, v in
                                                            too_long.items() if k != "train"}},
                  "labels": labels.kind, "text_normalizer": NORMALIZER},
            data={"items": items, "sets": sets, "texts": texts, "voices": item_voices,
                  "too_long": too_long},
            # what each set holds (transcripts and lengths): a resume on other data is refused
            split={k: [texts[k], [len(f) for f in feats[k]]] for k in sets})

    def evaluate(self, trainer, module, prep, cfg, out):
        final = trainer.validate(module, prep.val_loader, verbose=False)[0]
        if not trainer.is_global_zero:
            return {}
        module.to("cpu")
        figures, plots = {"val_loss": final["val/loss"]}, []
        t0 = time.time()
        lm = language_model(module.labels, module.meta.get("lm_text"), cfg.decode) \
            if module.ctc else None
        if lm is not None:
            figures["lm"] = lm_summary(lm, time.time() - t0)
        for name, items in prep.data["items"].items():
            too_long = prep.data["too_long"][name]
            if name == "train" or not (items or too_long):
                continue
            # Every batch, on this rank alone (a rank-split loader would give it a share).
            batches = length_batches([len(f) for f, _ in items], cfg.data.max_frames_per_batch)
            loader = (_collate([items[i] for i in b]) for b in batches)
            voices = [prep.data["voices"][name][i] for b in batches for i in b]  # batch order
            t0 = time.time()
            res = transcribe_batches(module, loader, cfg.decode.beam_size, lm)
            # Utterances longer than the model takes: no output, every label wrong.
            voices += [v for _, v in too_long]
            if module.ctc:
                res["refs"] += [module.labels.decode(y) for y, _ in too_long]
                res["greedy"] += [""] * len(too_long)
                res["beam"] += [""] * len(too_long) if res["beam"] else []
            else:
                res["true"] += [y for y, _ in too_long]
                res["pred"] += [-1] * len(too_long)
            if not module.ctc:
                acc = sum(p == t for p, t in zip(res["pred"], res["true"])) / len(res["true"])
                figures[name] = {"accuracy": round(acc, 4), "utterances": len(res["true"])}
                cm = torch.zeros(len(module.labels.classes), len(module.labels.classes),
                                 dtype=torch.long)
                for t, p in zip(res["true"], res["pred"]):
                    if p >= 0:  # not an utterance too long to classify
                        cm[t, p] += 1
                figures[name]["confusion"] = cm.tolist()  # rows: true, columns: predicted
                by = _by_voice(voices, res["pred"], res["true"],
                               lambda p, t: {"accuracy": round(
                                   sum(a == b for a, b in zip(p, t)) / len(t), 4)})
                figures[name] |= {"by_voice": by} if by else {}
                plots.append(plot_confusion(cm, module.labels.classes,
                                            out / f"confusion_{name}.png",
                                            f"{name}: confusion matrix"))
                continue
            figures[name] = {"greedy": error_rates(res["greedy"], res["refs"]),
                             "utterances": len(res["refs"]),
                             "decode_seconds": round(time.time() - t0, 1)}
            if res["beam"]:
                figures[name]["beam"] = error_rates(res["beam"], res["refs"])
            by = _by_voice(voices, res["beam"] or res["greedy"],
                           res["refs"], error_rates)
            figures[name] |= {"by_voice": by} if by else {}
            if name == "test":
                figures["examples"] = [{"ref": r, "greedy": g} for r, g in
                                       list(zip(res["refs"], res["greedy"]))[:5]]
        if module.ctc and prep.data["items"].get("test"):
            f0, _ = prep.data["items"]["test"][0]
            ref = module.labels.decode(prep.data["items"]["test"][0][1])
            plots.append(plot_utterance(module, f0, ref, out / "utterance.png"))
        self._print(figures)
        return {**figures, "beam_size": cfg.decode.beam_size, "plots": plots}

    @staticmethod
    def _print(figures: dict) -> None:
        lm = f" + {figures['lm']['order']}-gram" if "lm" in figures else ""
        for name, f in figures.items():
            if isinstance(f, dict) and "greedy" in f:
                line = (f"{name}: CER {f['greedy']['cer']:.3f} WER {f['greedy']['wer']:.3f} "
                        f"(greedy)")
                if "beam" in f:
                    line += (f", CER {f['beam']['cer']:.3f} WER {f['beam']['wer']:.3f} "
                             f"(beam{lm})")
                print(line)
            elif isinstance(f, dict) and "accuracy" in f:
                print(f"{name}: accuracy {f['accuracy']:.4f} over {f['utterances']}")
            for voice, g in (f.get("by_voice", {}) if isinstance(f, dict) else {}).items():
                score = (f"CER {g['cer']:.3f} WER {g['wer']:.3f}" if "cer" in g
                         else f"accuracy {g['accuracy']:.4f}")
                print(f"  {voice}: {score} over {g['utterances']}")


# --------------------------------------------------------------------------- transcribe
def run_transcribe(cfg: DictConfig) -> dict:
    if not cfg.ckpt:
        raise UserError("mode=transcribe needs ckpt=PATH, a checkpoint of the speech task")
    if not cfg.audio:
        raise UserError("mode=transcribe needs audio=GLOB, the WAV files to transcribe")
    module = SpeechModule.from_checkpoint(cfg.ckpt)
    require(module.ctc or not cfg.decode.lm_text, "decode.lm_text", cfg.decode.lm_text,
            "null for a keyword-spotting checkpoint (the n-gram reads transcripts)")
    lm, lm_info, t0 = None, None, time.time()
    if module.ctc:
        lm = language_model(module.labels, module.meta.get("lm_text"), cfg.decode)
        lm_info = lm_summary(lm, time.time() - t0) if lm else None
        if lm is not None:
            print(f"decoding: beam {cfg.decode.beam_size} with a character "
                  f"{lm.lm.order}-gram over {lm.lm.sentences} sentences")
        elif cfg.decode.lm_order and cfg.decode.beam_size > 1:
            print("decoding without a language model: the checkpoint keeps no transcripts "
                  "(decode.lm_text=FILE gives it sentences)")
    fe = LogMel(n_mels=module.meta["n_mels"])
    max_frames = module.model.max_frames

    def features(f):
        feats = fe(load_audio(f))
        if len(feats) > max_frames:
            raise UserError(f"audio {f} is {len(feats) / 100:.1f} s long; this model takes "
                            f"at most {max_frames / 100:.1f} s (model.max_frames)")
        return feats

    files, clips, skipped = read_each(cfg.audio, "audio", "WAV files", features,
                                      cfg.data.on_bad_audio)
    results = []
    for f, feats in zip(files, clips):
        with torch.no_grad():
            logits, n = module.model(feats[None], torch.tensor([len(feats)]))
        if module.ctc:
            lp = logits.float().log_softmax(-1)
            ids = (beam_decode(lp, n, beam_size=cfg.decode.beam_size, lm=lm)[0]
                   if cfg.decode.beam_size > 1 else greedy_decode(lp, n)[0])
            text = module.labels.decode(ids)
        else:
            text = module.labels.classes[int(logits.argmax(-1))]
        print(f"{f}: {text}")
        results.append({"file": str(f), "text": text})
    return {"transcripts": results, "skipped": skipped,
            "lm": lm_info}


TASK = SpeechTask()


def run(cfg: DictConfig) -> dict:
    """Train (or, with ``mode=transcribe``, transcribe WAV files) and return the results."""
    return training.run(TASK, cfg)


if __name__ == "__main__":
    entry.main("speech", run)
