"""User-facing errors.

A :class:`SqueezeError` is a user mistake or bad input: the CLI prints its one-line message and
exits with code 2, never a traceback. Anything else is a bug and keeps its traceback.
"""


class SqueezeError(Exception):
    """A problem with what the user asked for or gave us; the message says what and what to do."""

    exit_code = 2
