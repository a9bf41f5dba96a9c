"""Errors tvmq raises for bad input: one clear sentence, shown without a traceback by the CLI.

Each class is registered with TVM's FFI: an error raised inside a pass that TVM runs
would otherwise come back out of C++ as a plain ``RuntimeError``.
"""

import tvm_ffi


@tvm_ffi.register_error
class TvmqError(Exception):
    """A user-facing error: what went wrong, where, and what to do.

    The CLI prints ``tvmq: error: <message>`` and exits with status 2; the Python API
    lets it propagate. Anything that is not a ``TvmqError`` is a bug in tvmq.
    """


@tvm_ffi.register_error
class UnsupportedOperatorError(TvmqError):
    """A model uses an operator a frontend or pass cannot handle."""


@tvm_ffi.register_error
class InputMismatchError(TvmqError):
    """Inputs given at run time do not match the compiled model's manifest."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name if it has none)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
