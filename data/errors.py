"""``UserError``: a problem the user can fix (a missing file, a bad value, a corrupt input),
raised with one sentence that names the bad value and what is expected. Every layer above
``modules/`` raises it; the command line prints it as one line and exits with status 2."""


class UserError(Exception):
    """A problem with the user's input; reported as one line, exit status 2."""


def read_utf8(path, what: str) -> str:
    """The text of ``path``, without the byte-order mark some editors write first; a file
    that is not UTF-8 is a ``UserError`` naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        f"convert it to UTF-8") from None


def split_lines(text: str) -> list[str]:
    r"""``text`` split at its line ends only, so that line N of a file is item N - 1.
    ``str.splitlines`` also splits at form feeds, U+2028 and other separators that may stand
    inside a sentence or a JSON string; text read in Python's universal-newline mode has
    ``\n`` for every ``\r\n`` and ``\r``."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def read_lines(path, what: str) -> list[str]:
    """The lines of the UTF-8 text file ``path`` (``read_utf8``, ``split_lines``)."""
    return split_lines(read_utf8(path, what))
