"""One writer at a time per MetaSchedule record folder: a ``flock`` on :data:`LOCK_FILE`.

Two processes appending to one folder number their kernels independently, so their records
would point at each other's kernels. :func:`writer_lock` is held by ``tvmq tune`` and
``tvmq tune --repair`` while they write; :func:`check_not_locked` lets a reader or a new
tune fail fast with the holder's pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from tvmq.errors import TvmqError

__all__ = ["LOCK_FILE", "check_not_locked", "is_locked", "writer_lock"]

LOCK_FILE = ".tvmq-tune.lock"


@contextlib.contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's write lock (``flock`` on :data:`LOCK_FILE`) for the block.

    The lock is the kernel's: it goes away with the process, so a killed tune leaves no
    stale lock. The pid written in the file is only for the message to a second writer.
    """
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise TvmqError(f"{folder}: cannot create the lock file ({err.strerror})") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy_error(folder, fd) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def check_not_locked(folder: Path) -> None:
    """Fail now if another process holds the folder's lock (creates nothing)."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody is tuning there
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy_error(folder, fd) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_locked(folder: Path) -> bool:
    """Whether a process is tuning in the folder now."""
    try:
        check_not_locked(folder)
    except TvmqError:
        return True
    return False


def _busy_error(folder: Path, fd: int) -> TvmqError:
    os.lseek(fd, 0, os.SEEK_SET)
    pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    return TvmqError(
        f"{folder} is being tuned by another tvmq process (pid {pid}); wait or use another "
        "--work-dir"
    )
