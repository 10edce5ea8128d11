"""The errors a user fixes, as opposed to bugs in covidscan.

Everything raised for bad input derives from :class:`UserError`: a config value
(:class:`covidscan.config.ConfigError`), a data file (:class:`covidscan.data.DataError`), an option
or argument (:class:`UsageError`), a missing optional dependency
(:class:`covidscan.optional.MissingExtraError`). The message names the file, key or option and the
fix. The CLI prints these as one line (exit 2) and anything else as a bug (exit 1, traceback with
``-v``), so an internal error never hides behind a "bad input" line.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; the message says what and how."""


class UsageError(UserError, ValueError):
    """An option or argument out of range, unknown or contradictory; the message lists what is allowed."""
