"""What every room of the daemon shares about failing in front of the user.

A command's work lives with its concern (offline, control, integrations, the runner), not in the
CLI; it raises :class:`UserError` for a failure the user can fix, and the CLI prints the message
as one line (``streamv2v: error: ...``, exit code 2, no traceback).
"""

from __future__ import annotations

#: The command's name: the prefix of every line printed for the user.
PROG = "streamv2v"


class UserError(Exception):
    """An expected failure; its message names the problem and the fix, in one line."""
