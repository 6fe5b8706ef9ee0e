"""``python -m tasks.<name> ARGS`` for the tests, without paying for the imports each time.

Each run is a child forked from one server process (multiprocessing's forkserver) that has
imported torch, Lightning, Hydra and matplotlib once; the child sets its working directory
and environment, sends its stdout and stderr to files and runs the module as ``python -m``
does (``runpy``, as ``__main__``). What a test checks is what a separate process gives:
the exit status (``sys.exit(2)`` is 2, an uncaught exception 1 with its traceback on
stderr), both streams, and the files written; no state passes from one run to the next.
A run that stops at a bad setting takes about 0.2 s instead of 4.4 s as a new process
(2-core Intel Xeon): most of a new process's time is these imports.

Runs that read stdin, or that start processes of their own (DDP, SLURM), use
``subprocess`` as before; so do a few tests, so that the real command stays covered.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ["torch", "lightning.pytorch", "hydra", "omegaconf", "matplotlib", "rich",
           "torchmetrics"]
_ctx = multiprocessing.get_context("forkserver")
_ctx.set_forkserver_preload(PRELOAD)


def _child(module: str, args: list[str], env: dict[str, str], cwd: str, out: str,
           err: str) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.stdout.flush()
    sys.stderr.flush()
    for path, fd in ((out, 1), (err, 2)):
        f = os.open(path, os.O_WRONLY)
        os.dup2(f, fd)
        os.close(f)
    sys.path.insert(0, cwd)  # as `python -m` puts the working directory first
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def run_task(module: str, args: list[str], *, env: dict[str, str] | None = None,
             cwd: str | Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """What ``subprocess.run([python, "-m", module, *args], cwd=cwd, env=env,
    capture_output=True, text=True, timeout=timeout)`` returns, from a forked child."""
    cmd = [sys.executable, "-m", module, *args]
    env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        out.touch()
        err.touch()
        proc = _ctx.Process(target=_child, args=(module, list(args), env, str(cwd),
                                                 str(out), str(err)))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(cmd, proc.exitcode, out.read_text(encoding="utf-8"),
                                           err.read_text(encoding="utf-8"))
