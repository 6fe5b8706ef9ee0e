"""``UserError``: a problem the user can fix (a missing file, a bad value, a corrupt input),
raised with one sentence that names the bad value and what is expected. Every layer above
``modules/`` raises it; the command line prints it as one line and exits with status 2."""


class UserError(Exception):
    """A problem with the user's input; reported as one line, exit status 2."""


def read_utf8(path, what: str) -> str:
    """The text of ``path``; a file that is not UTF-8 is a ``UserError`` naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        f"convert it to UTF-8") from None
