"""The command line: ``python -m tasks.<name> key=value ...``, through Hydra.

The error boundary: a ``UserError`` anywhere, in composing the config or deep inside
training, ends the run with one line ``error: ...`` on stderr and exit status 2, and no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from omegaconf import DictConfig

from .config import CONF_DIR, check_command_line
from .errors import UserError


def guarded(fn: Callable[[], object]) -> None:
    try:
        fn()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def main(config_name: str, run: Callable[[DictConfig], dict]) -> None:
    """Run ``run(cfg)`` on the config Hydra composes from ``conf/<config_name>.yaml`` and
    the command line."""
    import hydra

    guarded(lambda: check_command_line(config_name, sys.argv[1:]))

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        guarded(lambda: run(cfg))

    _main()
