"""Parallel corpora for translation: preparation into a plain TSV (source TAB target), fixed
seeded dev/test splits, and batches of sentence pairs (length-bucketed by ``data.batching``).

Defaults, prepared once:
- ``bible.en-es.tsv``: the King James Version (Debian ``sword-text-kjv``) aligned verse by
  verse with the Reina-Valera 1909 (``sword-text-sparv``), both public domain, read with
  ``pysword``; both modules use KJV versification, so verse keys align 1:1.
- ``ding.de-en.tsv``: sentence-like German-English example pairs from Ding's dictionary
  (Debian ``trans-de-en``, GPL-2+).

A user's data is a TSV (``source<TAB>target`` per line) or two line-aligned text files.
"""

from __future__ import annotations

import functools
import random
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .batching import pad_items
from .cache import DataError, atomic_write_text, cache_dir, prepare_lock
from .errors import read_lines

_CAPS_START = re.compile(r"^([A-ZÁÉÍÓÚÑÜ])([A-ZÁÉÍÓÚÑÜ]+)(?=\s+[a-záéíóúñü])")


def apt_extract(packages: list[str], dest: Path, *,
                instead: str = "give data.train_file with your own TSV") -> Path:
    """``apt-get download`` Debian packages and unpack them (no root, no install);
    ``instead`` ends the error line: what to do where that is not possible."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DataError(f"apt-get and dpkg-deb are needed once to fetch {packages}; on a "
                        f"non-Debian system {instead}")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["apt-get", "download", *packages], cwd=tmp, capture_output=True,
                              text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or len(debs) < len(packages):
            raise DataError(f"apt-get download {' '.join(packages)} failed "
                            f"({proc.stderr.strip().splitlines()[-1:] or 'no output'}); run "
                            f"'apt-get update' first or {instead}")
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return dest


def _clean(text: str) -> str:
    text = re.sub(r"<[GH]\d+>", "", text).replace("¶", " ")
    return re.sub(r"\s+", " ", text).strip()


def prepare_bible(root: Path | None = None) -> Path:
    """English (KJV) - Spanish (RV 1909) verse pairs as ``bible.en-es.tsv``."""
    base = root or cache_dir()
    root, tsv = base / "bible", base / "bible" / "bible.en-es.tsv"
    if tsv.is_file():
        return tsv
    with prepare_lock("bible", base):
        if not tsv.is_file():  # else another process prepared it while this one waited
            _write_bible(root, tsv)
    return tsv


def _write_bible(root: Path, tsv: Path) -> None:
    try:
        from pysword.modules import SwordModules
    except ImportError:
        raise DataError("the pysword package is needed to read the Bible modules; "
                        "pip install pysword") from None
    sword = apt_extract(["sword-text-kjv", "sword-text-sparv"], root / "deb") / "usr/share/sword"
    mods = SwordModules(str(sword))
    mods.parse_modules()
    texts = {}
    for name in ("engKJV2006eb", "spaRV1909eb"):
        bible = mods.get_bible_from_module(name)
        # pysword decompresses a verse's whole compressed block (a chapter or more) for
        # every verse it reads; verses are read in order, so keeping the last few blocks
        # takes preparation from about a minute to seconds.
        bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
        books = bible.get_structure().get_books()
        verses = {}
        for testament in ("ot", "nt"):
            for book in books[testament]:
                for c in range(1, book.num_chapters + 1):
                    for v, text in enumerate(bible.get_iter(books=[book.osis_name],
                                                            chapters=[c]), 1):
                        verses[(book.osis_name, c, v)] = _clean(text)
        texts[name] = verses
    en, es = texts["engKJV2006eb"], texts["spaRV1909eb"]
    lines = []
    for key in en:  # canonical order
        src, tgt = en[key], es.get(key, "")
        if src and tgt:
            # RV 1909 capitalises a chapter's first word ("EN el principio").
            tgt = _CAPS_START.sub(lambda m: m[1] + m[2].lower(), tgt)
            lines.append(f"{src}\t{tgt}")
    atomic_write_text(tsv, "\n".join(lines) + "\n")
    shutil.rmtree(root / "deb", ignore_errors=True)


_ANNOT = re.compile(r"\{[^}]*\}|\[[^\]]*\]|\([^)]*\)")


def prepare_ding(root: Path | None = None) -> Path:
    """German-English sentence-like example pairs (>= 5 English words, ending in .?!)."""
    base = root or cache_dir()
    root, tsv = base / "ding", base / "ding" / "ding.de-en.tsv"
    if tsv.is_file():
        return tsv
    with prepare_lock("ding", base):
        if not tsv.is_file():  # else another process prepared it while this one waited
            _write_ding(root, tsv)
    return tsv


def _write_ding(root: Path, tsv: Path) -> None:
    src = apt_extract(["trans-de-en"], root / "deb") / "usr/share/trans/de-en"
    lines, seen = [], set()
    for line in src.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("#") or " :: " not in line:
            continue
        de_all, en_all = line.split(" :: ", 1)
        for de, en in zip(de_all.split(" | "), en_all.split(" | ")):
            de = re.sub(r"\s+", " ", _ANNOT.sub("", de)).strip(" ;,")
            en = re.sub(r"\s+", " ", _ANNOT.sub("", en)).strip(" ;,")
            if len(en.split()) >= 5 and en[-1:] in ".?!" and de and (de, en) not in seen:
                seen.add((de, en))
                lines.append(f"{de}\t{en}")
    atomic_write_text(tsv, "\n".join(lines) + "\n")
    shutil.rmtree(root / "deb", ignore_errors=True)


def read_pairs(*, tsv: str | Path | None = None, source: str | Path | None = None,
               target: str | Path | None = None) -> list[tuple[str, str]]:
    """Sentence pairs from a TSV or two aligned files; blank pairs are dropped."""
    if tsv is not None and (source is not None or target is not None):
        raise DataError(f"data.train_file={str(tsv)!r} and data.source_file / "
                        f"data.target_file are both given; expected one TSV or two files")
    if tsv is not None:
        path = Path(tsv).expanduser()
        if not path.is_file():
            raise DataError(f"data.train_file={str(path)!r} does not exist; expected a TSV of "
                            f"source<TAB>target lines")
        pairs = []
        for n, line in enumerate(read_lines(path, "data.train_file"), 1):
            if not line.strip():
                continue
            fields = line.rstrip().split("\t")  # a trailing TAB ends the target
            if len(fields) != 2:
                found = "no TAB" if len(fields) == 1 else f"{len(fields)} TAB-separated fields"
                raise DataError(f"{path} line {n} has {found}; expected source<TAB>target")
            s, t = fields
            pairs.append((s.strip(), t.strip()))
    else:
        if source is None or target is None:
            raise DataError("give data.train_file (TSV) or both data.source_file and "
                            "data.target_file")
        paths = [Path(source).expanduser(), Path(target).expanduser()]
        for p in paths:
            if not p.is_file():
                raise DataError(f"{p} does not exist; expected a text file, one sentence a line")
        src, tgt = (read_lines(p, "data file") for p in paths)
        if len(src) != len(tgt):
            raise DataError(f"{paths[0]} has {len(src)} lines but {paths[1]} has {len(tgt)}; "
                            f"the two files must be line-aligned")
        pairs = list(zip((s.strip() for s in src), (t.strip() for t in tgt)))
    pairs = [(s, t) for s, t in pairs if s and t]
    if len(pairs) < 3:
        raise DataError(f"only {len(pairs)} non-empty sentence pairs; a corpus needs more")
    return pairs


def split_pairs(pairs, *, dev: int, test: int, seed: int) -> dict[str, list]:
    """Seeded dev / test / train split."""
    if dev < 1 or test < 1:
        raise DataError(f"data.dev_size={dev}, data.test_size={test}: expected at least one "
                        f"pair in each")
    if dev + test >= len(pairs):
        raise DataError(f"data.dev_size + data.test_size = {dev + test} leaves no training "
                        f"pairs out of {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    return {"dev": [pairs[i] for i in order[:dev]],
            "test": [pairs[i] for i in order[dev:dev + test]],
            "train": [pairs[i] for i in order[dev + test:]]}


def write_tsv(pairs, path: Path) -> None:
    atomic_write_text(path, "".join(f"{s}\t{t}\n" for s, t in pairs))


# --------------------------------------------------------------------------- batching
def pad(seqs: list[list[int]], value: int = 0) -> torch.Tensor:
    """Token id lists -> (B, T) long, right-padded with ``value``."""
    return pad_items(seqs, pad_value=value).values
