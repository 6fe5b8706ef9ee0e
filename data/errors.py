"""``UserError``: a problem the user can fix (a missing file, a bad value, a corrupt input),
raised with one sentence that names the bad value and what is expected. Every layer above
``modules/`` raises it; the command line prints it as one line and exits with status 2."""


class UserError(Exception):
    """A problem with the user's input; reported as one line, exit status 2."""
