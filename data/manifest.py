"""JSONL manifests, the plain format of a user's own data: one JSON object a line, paths
relative to the manifest's folder (speech: audio + transcript; fusion: image + caption)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import UserError, read_lines


def jsonl_objects(path: Path, required: Sequence[str], fmt: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-empty line of ``path``.

    A line that is not JSON, or not an object holding every key of ``required`` (not null), is a
    ``UserError`` naming the file, the line and the keys missing, with ``fmt`` (the expected
    line) as the example.
    """
    for n, line in enumerate(read_lines(path, "manifest"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {n} is not JSON ({exc.msg}); expected one object "
                            f"a line: {fmt}") from None
        missing = [k for k in required if not isinstance(item, dict) or item.get(k) is None]
        if missing:
            raise UserError(f"{path} line {n} lacks {' and '.join(repr(k) for k in missing)}; "
                            f"expected {fmt}")
        yield n, item


def as_text(value, where: str, key: str, booleans: bool = False, numbers: bool = True) -> str:
    """A manifest value that should be text: a string, with ``numbers`` a number written as
    one (an answer of 3), and with ``booleans`` true/false as "true"/"false" (a label such
    as ``{"smiling": true}``); a list, an object or null (or a number or true/false where
    not allowed) is a ``UserError`` naming ``key`` at ``where`` (the file and line), not
    text made of its Python form."""
    if isinstance(value, str):
        return value
    if booleans and isinstance(value, bool):
        return str(value).lower()
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{where} has {key}={json.dumps(value)[:60]}; expected "
                    + ("text" if numbers else "a file path (a JSON string)"))


def as_path(value, where: str, key: str) -> str:
    """A manifest value naming a file: a JSON string only (``as_text`` without numbers)."""
    return as_text(value, where, key, numbers=False)
