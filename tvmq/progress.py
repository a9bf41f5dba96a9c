"""What a long command shows while it works: phase lines with elapsed time, and TVM's
repeated native warnings collapsed to one line each.

- :func:`phases` (a context manager) starts the clock of a compile; inside it
  :func:`phase` prints ``tvmq: [  12.3 s] build`` to stderr when a phase starts, from
  whichever module runs that phase, without passing a logger around.
- :func:`collapsed_native_warnings` routes file descriptor 2 through a filter while TVM's
  C++ code runs: ``[hh:mm:ss] file.cc:N: Warning: ...`` lines are held back and shown at the
  end, one line per distinct warning with its count (a transformer compile printed the same
  "Fast mode segfaults" warning 24 times). Everything else passes through as written.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections import Counter
from contextvars import ContextVar

__all__ = ["collapsed_native_warnings", "phase", "phases"]


class _PhaseLog:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"tvmq: [{elapsed:7.1f} s] {name}", file=sys.stderr, flush=True)


_current: ContextVar[_PhaseLog | None] = ContextVar("tvmq_phase_log", default=None)


@contextlib.contextmanager
def phases(enabled: bool = True):
    """Time the phases of one command; nested uses keep the outer clock."""
    if _current.get() is not None:
        yield _current.get()
        return
    token = _current.set(_PhaseLog(enabled))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def phase(name: str, enabled: bool = True) -> None:
    """Announce that phase `name` starts (nothing outside :func:`phases` or when disabled)."""
    log = _current.get()
    if log is not None and enabled:
        log(name)


_NATIVE_WARNING = re.compile(rb"^\[\d\d:\d\d:\d\d\] [^ ]+:\d+: Warning: (.*)$")


@contextlib.contextmanager
def collapsed_native_warnings():
    """Collapse TVM's native warnings while the block runs (see module doc).

    Output written to fd 2 inside the block (Python's included) is forwarded by a thread,
    so it appears as it is written; on exit one line per distinct warning gives its count.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2: nothing to filter
        yield
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    counts: Counter[bytes] = Counter()

    def forward() -> None:
        pending = b""
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                out = []
                for line in lines:
                    m = _NATIVE_WARNING.match(line)
                    if m is not None:
                        counts[m.group(1)] += 1
                    else:
                        out.append(line + b"\n")
                if pending and not pending.startswith(b"["):  # progress bars: \r, no \n
                    out.append(pending)
                    pending = b""
                if out:
                    os.write(saved, b"".join(out))
            if pending:
                os.write(saved, pending)

    reader = threading.Thread(target=forward, name="tvmq-stderr", daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end held here: the reader sees EOF
        reader.join(timeout=5)  # a child process still holding the pipe must not hang us
        for message, n in list(counts.items()):
            times = "" if n == 1 else f" ({n} times)"
            text = message.decode(errors="replace")
            sys.stderr.write(f"tvmq: TVM warning{times}: {text}\n")
        sys.stderr.flush()
        if not reader.is_alive():
            os.close(saved)
