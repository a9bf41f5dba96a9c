"""Errors tvmq raises for bad input: one clear sentence, shown without a traceback by the CLI."""


class TvmqError(Exception):
    """A user-facing error: what went wrong, where, and what to do.

    The CLI prints ``tvmq: error: <message>`` and exits with status 2; the Python API
    lets it propagate. Anything that is not a ``TvmqError`` is a bug in tvmq.
    """


class UnsupportedOperatorError(TvmqError):
    """A model uses an operator a frontend or pass cannot handle."""


class InputMismatchError(TvmqError):
    """Inputs given at run time do not match the compiled model's manifest."""
