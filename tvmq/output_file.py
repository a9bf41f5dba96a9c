"""Single output files (``tvmq run -o outputs.npz``, ``tvmq report -o``): checked before any
work, written atomically.

Only a missing file or one tvmq could have written is ever replaced (by default an ``.npz``
archive; a caller names what else it recognises as its own, e.g. a tvmq report). The new file is written to a
hidden temp file beside it (``.NAME.tmp-PID-*``) and moved into place with ``os.replace``;
temp files of killed runs are removed by the next write to the same path, as output
folders' leftovers are (:mod:`tvmq.output`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tvmq.errors import TvmqError
from tvmq.output import leftovers

__all__ = ["check_output_file", "write_file_atomically"]


def check_output_file(
    path: os.PathLike,
    *,
    replaceable: Callable[[Path], bool] | None = None,
    kind: str = ".npz file",
) -> Path:
    """Check before any work that ``path`` can take a new ``.npz`` file.

    ``replaceable`` says whether an existing file may be replaced (default: it is an
    ``.npz`` archive); ``kind`` names such files in the error.

    Raises
    ------
    TvmqError
        ``path`` is a folder, an existing file that is not replaceable, or its
        folder is missing or not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise TvmqError(f"{path}: is a directory; give a file name, e.g. {path / 'outputs.npz'}")
    parent = path.parent
    if not parent.is_dir():
        raise TvmqError(f"{path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TvmqError(f"{path}: cannot write to {parent} (permission denied)")
    if path.exists() and not (replaceable or _is_npz)(path):
        raise TvmqError(f"{path}: exists and is not a {kind}; tvmq will not overwrite it")
    return path


def _is_npz(path: Path) -> bool:
    """An ``.npz`` is a zip archive (or empty, e.g. made by ``touch``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"", b"PK\x03\x04", b"PK\x05\x06")


def write_file_atomically(
    path: os.PathLike,
    write: Callable[[BinaryIO], None],
    *,
    replaceable: Callable[[Path], bool] | None = None,
    kind: str = ".npz file",
) -> Path:
    """Write a file through a unique temp file in its folder, then ``os.replace`` it.

    Either the whole new file is at ``path`` or nothing changed; no temp file is left
    (one of a killed run is removed by the next write to the same path). ``replaceable``
    and ``kind``: as for :func:`check_output_file`.
    """
    path = check_output_file(path, replaceable=replaceable, kind=kind)
    dead = re.compile(rf"\.{re.escape(path.name)}\.(?P<kind>tmp)-(?P<pid>\d+)(-[0-9a-f]+)?")
    for stale, _ in leftovers(path.parent, dead):  # from runs that were killed
        with contextlib.suppress(OSError):
            stale.unlink()
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        # O_EXCL: never follow or reuse someone's file; mode 0o666 lets umask decide
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise TvmqError(f"{path}: writing failed ({e.strerror or e})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path
