"""The error base classes every floor derives from.

A :class:`UserError` means "wrong input or setup": its message says what is wrong
and how to fix it, and the command line prints it and exits with
:data:`EXIT_USER_ERROR` instead of a traceback.
"""

from __future__ import annotations

#: Exit status of a command stopped by a :class:`UserError`.
EXIT_USER_ERROR = 2


class SmartcorrError(Exception):
    """Base of the project's own exceptions."""


class UserError(SmartcorrError):
    """Wrong input or setup; the message names the file, key or value and the fix."""
