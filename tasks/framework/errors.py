"""The one exception type for problems with the user's input (a bad path, value, file or
setting). The entry point prints it as ``error: <message>`` and exits with status 2."""

from data.errors import UserError

__all__ = ["UserError"]
