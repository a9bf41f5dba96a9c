"""Atomic output folders: tvmq replaces only files it wrote, and never half of a build.

A folder is a tvmq build when its ``model.json`` parses as a tvmq manifest; the
manifest lists the files tvmq wrote (``"files"``). Everything else in the folder is the
user's and is never touched. A build is written into a staging folder first, then
committed:

- ``-o`` missing: the staging folder (a hidden sibling) is renamed into place;
- ``-o`` holds only a tvmq build: the two folders are swapped in one step
  (``renameat2(RENAME_EXCHANGE)`` on Linux; two renames elsewhere);
- ``-o`` also holds the user's files, is empty, or is the working directory: each of
  tvmq's files is moved in with ``os.replace`` (atomic per file), ``model.json`` last.

A process killed midway leaves hidden folders tagged with its pid (``.NAME.tmp-PID-*``,
``.NAME.old-PID`` beside ``-o``; ``.tvmq-tmp-PID-*`` inside it). The next write to the
same folder cleans up those of dead processes, restoring an ``.old`` build where ``-o``
went missing and finishing a per-file commit that was cut short.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tvmq.errors import TvmqError
from tvmq.manifest import FORMAT, LIBRARY, MANIFEST

INSIDE_PREFIX = ".tvmq-tmp-"  # staging folders inside an output folder
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


# --------------------------------------------------------------------------------------
# What a folder holds


def build_files(folder: Path) -> list[str] | None:
    """The files of the tvmq build in ``folder``, or None when it holds no tvmq build.

    Only a ``model.json`` that parses as a tvmq manifest makes a build: any other file
    of that name is the user's. Manifests written before ``"files"`` was recorded list
    ``model.json`` and their library.
    """
    try:
        d = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        return None
    files = d.get("files")
    if files is None:
        library = d.get("library")
        lib = library.get("file", LIBRARY) if isinstance(library, dict) else LIBRARY
        files = [MANIFEST, lib]
    if not isinstance(files, list) or not all(_is_plain_name(f) for f in files):
        return None  # a crafted list must not reach outside the folder
    return sorted(set(files) | {MANIFEST})


def _is_plain_name(name) -> bool:
    """A file name without any directory part."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and os.sep not in name
        and (os.altsep is None or os.altsep not in name)
    )


def _own_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` apart from tvmq staging folders of other runs."""
    return [n for n in os.listdir(folder) if not n.startswith(INSIDE_PREFIX)]


@dataclass(frozen=True)
class FolderState:
    """What an existing (or missing) output folder holds."""

    exists: bool
    build: list[str] | None  # tvmq's files, when it holds a tvmq build
    others: list[str]  # the user's entries (everything not tvmq's)

    @property
    def only_build(self) -> bool:
        return self.build is not None and not self.others


def inspect_folder(folder: Path) -> FolderState:
    """Classify ``folder``: missing, empty, a tvmq build (with or without user files), foreign."""
    if not folder.exists():
        return FolderState(False, None, [])
    if not folder.is_dir():
        raise TvmqError(f"{folder}: exists and is not a directory")
    build = build_files(folder)
    entries = _own_entries(folder)
    others = sorted(n for n in entries if build is None or n not in build)
    return FolderState(True, build, others)


# --------------------------------------------------------------------------------------
# Leftovers of killed runs


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate it on Windows: never judge there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, OSError):
        return False  # no such pid can exist
    return True


def leftovers(parent: Path, pattern: re.Pattern) -> list[tuple[Path, str]]:
    """(path, kind) of entries of ``parent`` matching ``pattern`` whose process is dead."""
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            m = pattern.fullmatch(name)
            if m and not pid_alive(int(m["pid"])):
                found.append((parent / name, m["kind"]))
    return found


def _sibling_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.(?P<kind>tmp|old)-(?P<pid>\d+)(-[0-9a-f]+)?")


_INSIDE_PATTERN = re.compile(rf"{re.escape(INSIDE_PREFIX)}(?P<kind>)(?P<pid>\d+)(-[0-9a-f]+)?")


def recover(out: Path) -> None:
    """Clean up what dead tvmq processes left around ``out``; restore or finish their builds.

    An ``.old`` build comes back when ``out`` is missing (a crash between the two renames
    of the fallback swap); a per-file commit that was cut short is finished, so that
    ``out`` never keeps a library that does not match its manifest. Leftovers of live
    processes (a concurrent compile) are left alone.
    """
    siblings = leftovers(out.parent, _sibling_pattern(out.name))
    olds = sorted((p for p, kind in siblings if kind == "old"), key=_mtime, reverse=True)
    if olds and not out.exists():
        with contextlib.suppress(OSError):
            olds[0].rename(out)
    stages = [p for p, kind in siblings if kind == "tmp"]
    if out.is_dir():
        stages += [p for p, _ in leftovers(out, _INSIDE_PATTERN)]
    for stage in stages:
        if _commit_was_cut_short(stage, out):
            with contextlib.suppress(OSError, TvmqError):
                _commit_files(stage, out, build_files(out) or [])
    for path in [p for p in olds if p.exists()] + stages:
        shutil.rmtree(path, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _commit_was_cut_short(stage: Path, out: Path) -> bool:
    """A per-file commit started: some of the staged build's files already moved to ``out``.

    The manifest moves last, so a staging folder still holding it but missing other files
    it lists was interrupted mid-commit. One holding every file never started (or, after
    a folder swap, holds the old build): it is discarded.
    """
    files = build_files(stage)
    if files is None or not out.is_dir():
        return False
    moved = [f for f in files if not (stage / f).exists()]
    return bool(moved) and all((out / f).exists() for f in moved)


# --------------------------------------------------------------------------------------
# Writing a build


@dataclass
class OutputFolder:
    """An output folder checked for writing; ``stage()`` writes a build into it atomically.

    Parameters
    ----------
    path : Path
        The output folder, resolved.
    overwrite : bool
        Whether an existing tvmq build there may be replaced.
    """

    path: Path
    overwrite: bool = True

    @classmethod
    def open(cls, path: os.PathLike, overwrite: bool = True) -> OutputFolder:
        """Check ``path`` before any work: clean up leftovers, refuse a folder that is not ours.

        Raises
        ------
        TvmqError
            ``path`` is a file; a non-empty folder without a tvmq build; a tvmq build with
            ``overwrite=False``; or a place this user cannot write.
        """
        folder = cls(Path(path).resolve(), overwrite)
        recover(folder.path)
        folder._check(inspect_folder(folder.path))
        _check_writable(folder.path)
        return folder

    def _check(self, state: FolderState) -> None:
        if state.build is None and state.others:
            why = (
                f"its {MANIFEST} is not a tvmq manifest"
                if MANIFEST in state.others
                else "it holds no tvmq build"
            )
            raise TvmqError(
                f"{self.path}: not empty and not a tvmq output ({why}); choose another directory"
            )
        if state.build is not None and not self.overwrite:
            raise TvmqError(f"{self.path}: already holds a compiled model (pass overwrite=True)")

    @contextlib.contextmanager
    def stage(self) -> Iterator[Path]:
        """A fresh staging folder to write the build into; committed when the block ends.

        The block must write ``model.json`` (with its ``"files"``) last. On an exception
        the staging folder is removed and ``path`` is left as it was.
        """
        stage = self._make_stage()
        try:
            yield stage
            self._commit(stage)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def _make_stage(self) -> Path:
        """A staging folder beside ``path`` when a folder swap can be used, else inside it."""
        out = self.path
        state = inspect_folder(out)
        inside = state.exists and not (state.only_build and _swappable(out))
        parent = out if inside else out.parent
        prefix = INSIDE_PREFIX if inside else f".{out.name}.tmp-"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            return _make_unique_dir(parent, f"{prefix}{os.getpid()}-")
        except OSError as e:
            raise TvmqError(f"{out}: cannot write here ({e.strerror})") from None

    def _commit(self, stage: Path) -> None:
        """Move the staged build to ``path``, looking again at what it holds now."""
        out = self.path
        new_files = build_files(stage)
        if new_files is None:
            raise RuntimeError(f"{stage}: the staged build has no valid {MANIFEST}")
        state = inspect_folder(out)
        self._check(state)  # the folder may have changed during the build
        try:
            if not state.exists and stage.parent == out.parent:
                stage.rename(out)
            elif state.only_build and stage.parent == out.parent:
                _copy_mode(out, stage)
                swap_dirs(stage, out)
                shutil.rmtree(stage, ignore_errors=True)  # now the old build
            else:
                out.mkdir(exist_ok=True)
                _commit_files(stage, out, state.build or [])
                shutil.rmtree(stage, ignore_errors=True)
        except OSError as e:
            raise TvmqError(f"{out}: writing the build failed ({e.strerror or e})") from None


def _swappable(out: Path) -> bool:
    """Whether ``out`` may be replaced as a whole folder.

    Not the working directory (the shell would be left in a deleted folder) and not a
    mount point (its sibling is on another file system).
    """
    with contextlib.suppress(OSError):
        if os.path.samefile(out, os.getcwd()):
            return False
    return not os.path.ismount(out) and os.access(out.parent, os.W_OK | os.X_OK)


def _make_unique_dir(parent: Path, prefix: str) -> Path:
    """``mkdir`` a new folder with the default mode (umask applies; mkdtemp's is 0700)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _copy_mode(src: Path, dst: Path) -> None:
    """Give the new folder the old one's permissions: a swap must not change them."""
    with contextlib.suppress(OSError):
        os.chmod(dst, src.stat().st_mode & 0o7777)


def _check_writable(out: Path) -> None:
    """Fail before a long build when neither ``out`` nor its nearest existing parent is writable."""
    place = out
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise TvmqError(f"{out}: {place} is not a directory")
    if not os.access(place, os.W_OK | os.X_OK):
        raise TvmqError(f"{out}: cannot write to {place} (permission denied)")


def _commit_files(stage: Path, out: Path, old_files: list[str]) -> None:
    """Move each staged file into ``out`` (manifest last), then drop tvmq's stale files."""
    new_files = build_files(stage)
    if new_files is None:
        raise TvmqError(f"{stage}: no staged {MANIFEST}")
    for name in new_files:
        target = out / name
        if name not in old_files and (target.exists() or target.is_symlink()):
            raise TvmqError(f"{target}: a file tvmq did not write is in the way; move it")
        if target.is_dir() and not target.is_symlink():
            raise TvmqError(f"{target}: is a directory, tvmq would write a file there")
    # model.json last: until it moves, the folder's manifest still names the old build
    for name in sorted(new_files, key=lambda n: n == MANIFEST):
        if (stage / name).exists():
            os.replace(stage / name, out / name)
    for name in set(old_files) - set(new_files):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


def swap_dirs(a: Path, b: Path) -> None:
    """Exchange two folders: in one step with ``renameat2``, else with two renames.

    With two renames a crash between them leaves ``b`` missing and its content in a
    ``.NAME.old-PID`` folder, which :func:`recover` puts back.
    """
    if _exchange(a, b):
        return
    old = b.parent / f".{b.name}.old-{os.getpid()}"
    b.rename(old)
    try:
        a.rename(b)
    except BaseException:
        old.rename(b)
        raise
    old.rename(a)


def _exchange(a: Path, b: Path) -> bool:
    """``renameat2(a, b, RENAME_EXCHANGE)``; False where the system does not offer it."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # old kernel, or a file system without exchange
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _renameat2():
    """libc's ``renameat2``, or None (not Linux, or glibc older than 2.28)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn
