"""Errors: a user's (a bad config or input, reported as one line before any work starts), and how
any failure is summed up in a record (``error_summary``: for the run record and an export's part of it)."""

import traceback


class ConfigError(ValueError):
    """The run cannot start as configured; the message names the problem and the valid choices."""


def error_summary(error: BaseException) -> dict:
    """A record's ``error``: type, message, the traceback's tail (call inside the ``except``)."""
    return {"type": type(error).__name__, "message": str(error)[:2000], "traceback": traceback.format_exc()[-4000:]}
