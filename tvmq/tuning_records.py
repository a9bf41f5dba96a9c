"""Reading, checking, repairing and locking MetaSchedule record folders.

A record folder holds MetaSchedule's ``JSONDatabase``: ``database_workload.json`` (one
kernel a line: ``[structural hash, base64 JSON of the IRModule]``) and
``database_tuning_record.json`` (one measured schedule a line:
``[workload line number, [trace, run_secs, target, args_info]]``). MetaSchedule appends to
both line by line and refuses the whole folder when one line is damaged (a crash or a full
disk tears the last line). tvmq therefore reads the files itself with Python's ``json``:

* :func:`read_for_build` keeps what a build can use (the fastest working record of each
  kernel for the target), skipping damaged lines with one warning;
* :func:`check_for_tuning` refuses a damaged folder before :func:`tvmq.tuning.tune` appends
  to it (appending after a torn line would glue the next record onto it);
* :func:`repair` rewrites a folder keeping only records that replay on their kernel;
* :func:`tvmq.tuning_lock.writer_lock` lets one process at a time write a folder (two
  writers number their kernels independently, so their records point at each other's kernels).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tvmq.errors import TvmqError
from tvmq.tuning_lock import is_locked, writer_lock

if TYPE_CHECKING:
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

__all__ = ["RepairReport", "check_for_tuning", "read_for_build", "repair"]

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
"""Held (``flock``) by the process writing a folder; holds its pid, for the message only."""
FAILED_RUN_SECS = 1e9  # MetaSchedule records a failed build or run as 1e10 s

_log = logging.getLogger("tvmq.tuning")
_INDEX = re.compile(rb"^\s*\[\s*(\d+)\s*,")


# --------------------------------------------------------------------------------------
# Reading the two files


@dataclass
class _Scan:
    """The lines of a record folder, parsed but not decoded into TVM objects.

    ``workloads[i]`` is workload line ``i`` (``None`` when it does not parse);
    ``records`` holds ``(line bytes, workload index, record JSON)`` of the record lines
    that parse with an index in range; ``bad`` counts the other record and workload lines.
    """

    folder: Path
    workloads: list[list | None] = field(default_factory=list)
    workload_lines: list[bytes] = field(default_factory=list)
    records: list[tuple[bytes, int, list]] = field(default_factory=list)
    bad: int = 0
    good_lines: int = 0  # lines of either file that parse: 0 in a non-empty folder = foreign


def _lines(path: Path) -> list[bytes]:
    """The non-blank lines of a file (none if it is missing)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise TvmqError(f"{path}: cannot read it ({err.strerror})") from err
    return [line for line in data.split(b"\n") if line.strip()]


def _parse(line: bytes) -> Any:
    """One JSON line, or None when it is torn or not JSON."""
    try:
        return json.loads(line)
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError
        return None


def _is_workload(obj: Any) -> bool:
    return isinstance(obj, list) and len(obj) == 2 and all(isinstance(x, str) for x in obj)


def _is_record(obj: Any) -> bool:
    return (
        isinstance(obj, list)
        and len(obj) == 2
        and isinstance(obj[0], int)
        and isinstance(obj[1], list)
        and len(obj[1]) == 4
        and (obj[1][2] is None or isinstance(obj[1][2], dict))
    )


def _scan(folder: Path) -> _Scan:
    """Parse both files of ``folder``; count what does not parse or points nowhere."""
    scan = _Scan(folder)
    for line in _lines(folder / WORKLOAD_FILE):
        obj = _parse(line)
        ok = _is_workload(obj)
        scan.workloads.append(obj if ok else None)  # keeps the later lines' numbers
        scan.workload_lines.append(line)
        scan.bad += not ok
        scan.good_lines += ok
    for line in _lines(folder / RECORD_FILE):
        obj = _parse(line)
        if not _is_record(obj):
            scan.bad += 1
            continue
        scan.good_lines += 1
        index = obj[0]
        if not 0 <= index < len(scan.workloads) or scan.workloads[index] is None:
            scan.bad += 1
            continue
        scan.records.append((line, index, obj[1]))
    return scan


# --------------------------------------------------------------------------------------
# Targets and latencies, on the JSON form


def target_key(target: Any) -> tuple:
    """What a record's target must share with the build's: kind, arch, CPU, attributes.

    ``target`` is a ``tvm.target.Target`` or the dict a record stores (``Target.export()``),
    so records can be filtered before any TVM object is made from them.
    """
    if not isinstance(target, dict):
        target = dict(target.export())
    triple = str(target.get("mtriple", "") or "")
    return (
        str(target.get("kind", "")),
        triple.split("-", 1)[0],
        str(target.get("mcpu", "") or ""),
        str(target.get("arch", "") or ""),
        tuple(sorted(str(a) for a in target.get("mattr", []) or [])),
    )


def mean_secs(run_secs: Any) -> float | None:
    """The mean of a record's run times; None for a failed or unmeasured candidate."""
    try:
        secs = [float(s) for s in run_secs or []]
    except (TypeError, ValueError):
        return None
    if not secs or max(secs) >= FAILED_RUN_SECS:
        return None
    return sum(secs) / len(secs)


# --------------------------------------------------------------------------------------
# Decoding into TVM objects


class _Decoder:
    """Decodes a scan's workloads on demand (once each) and its records against them."""

    def __init__(self, scan: _Scan) -> None:
        self.scan = scan
        self.cache: dict[int, Workload | None] = {}

    def workload(self, index: int) -> Workload | None:
        """Workload ``index``, or None when its IRModule does not load."""
        from tvm.s_tir import meta_schedule as ms

        if index not in self.cache:
            try:
                self.cache[index] = ms.database.Workload.from_json(self.scan.workloads[index])
            except Exception:  # TVM raises several types for a damaged module
                self.cache[index] = None
        return self.cache[index]

    def record(self, index: int, record: list) -> TuningRecord | None:
        """The record on workload ``index``, or None when it does not decode.

        ``TuningRecord.from_json`` replays the trace on the workload's module, so a
        record pointing at the wrong kernel fails here.
        """
        from tvm.s_tir import meta_schedule as ms

        workload = self.workload(index)
        if workload is None:
            return None
        try:
            return ms.database.TuningRecord.from_json(record, workload)
        except Exception:  # a trace that does not replay on the module
            return None


# --------------------------------------------------------------------------------------
# For a build


def read_for_build(folder: Path, want: tuple) -> tuple[list[TuningRecord], int, int]:
    """The records of a folder a build can use, decoded.

    Only the fastest working record of each kernel for the target ``want`` (a
    :func:`target_key`) is decoded: it is the one MetaSchedule applies, and decoding
    (which replays the trace) is what makes reading a large log slow. When it does not
    decode, the next fastest is tried.

    Returns
    -------
    (records, other_target, damaged)
        The records; how many records are for another target; how many lines are damaged
        (torn, not JSON, pointing at a missing kernel, or not replaying).
    """
    scan = _scan(folder)
    by_workload: dict[int, list[tuple[float, list]]] = {}
    other_target = 0
    for _line, index, record in scan.records:
        if target_key(record[2] or {}) != want:
            other_target += 1
            continue
        secs = mean_secs(record[1])
        if secs is not None:
            by_workload.setdefault(index, []).append((secs, record))
    decoder = _Decoder(scan)
    damaged = scan.bad
    kept = []
    for index, candidates in by_workload.items():
        for _secs, record in sorted(candidates, key=lambda c: c[0]):
            decoded = decoder.record(index, record)
            if decoded is not None:
                kept.append(decoded)
                break
            damaged += 1
    return kept, other_target, damaged


def warn_damaged(folder: Path, damaged: int) -> None:
    """One warning line for the damaged lines of a folder a build read.

    While a tune is writing the folder, its last line may be half written: that is not
    damage, so it is only logged at INFO then.
    """
    if is_locked(folder):
        _log.info("%s: skipped %d line(s) a running tune is writing", folder, damaged)
        return
    _log.warning(
        "%s: skipped %d damaged tuning record line(s); fix it with `tvmq tune --repair "
        "--work-dir %s` (or compile with --no-tuning-logs)",
        folder,
        damaged,
        folder,
    )


# --------------------------------------------------------------------------------------
# For tuning


def check_work_dir(folder: Path) -> None:
    """Refuse a work dir that is a file, lies under a file, or cannot be written."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise TvmqError(f"--work-dir {folder}: {parent} is a file, not a folder")
            if not os.access(parent, os.R_OK | os.W_OK | os.X_OK):
                raise TvmqError(f"--work-dir {folder}: {parent} is not writable by this user")
            return


def check_for_tuning(folder: Path) -> None:
    """Refuse a record folder MetaSchedule should not append to.

    A damaged folder is refused rather than repaired on the fly: repairing drops records,
    which the user should ask for (``tvmq tune --repair`` keeps a backup). Only parsing
    is checked here (fast); a record that parses but does not replay makes MetaSchedule's
    own loading fail, which :func:`tvmq.tuning.tune` reports the same way.
    """
    if not folder.exists():
        return
    scan = _scan(folder)
    if scan.bad and not scan.good_lines:
        raise TvmqError(
            f"{folder}: not a MetaSchedule tuning record folder ({WORKLOAD_FILE} and "
            f"{RECORD_FILE} hold no record); use another --work-dir"
        )
    if scan.bad:
        raise damaged_error(folder, scan.bad)


def damaged_error(folder: Path, count: int | None) -> TvmqError:
    """The one-line error for a damaged folder, with the command that repairs it."""
    what = f"{count} damaged line(s)" if count else "damaged records"
    return TvmqError(
        f"{folder}: the tuning records have {what}; run `tvmq tune --repair --work-dir "
        f"{folder}` first (it keeps a backup)"
    )


def count_damaged(folder: Path) -> int:
    """Damaged lines of a folder, decoding every record (slow: for error messages)."""
    scan = _scan(folder)
    decoder = _Decoder(scan)
    return scan.bad + sum(decoder.record(i, r) is None for _line, i, r in scan.records)


# --------------------------------------------------------------------------------------
# Repair


@dataclass
class RepairReport:
    """What :func:`repair` kept and dropped; ``backups`` are the originals' copies."""

    folder: Path
    records_kept: int
    records_dropped: int
    workloads_kept: int
    workloads_dropped: int
    backups: list[Path] = field(default_factory=list)
    rewritten: bool = False

    def summary(self) -> str:
        """One line for the user."""
        if not self.rewritten:
            return (
                f"{self.folder}: nothing to repair ({self.records_kept} records on "
                f"{self.workloads_kept} kernels, all good)"
            )
        backups = ", ".join(str(b) for b in self.backups) or "kept from an earlier repair"
        return (
            f"{self.folder}: kept {self.records_kept} records on {self.workloads_kept} "
            f"kernels, dropped {self.records_dropped} records and {self.workloads_dropped} "
            f"kernel lines; originals in {backups}"
        )


def repair(folder: str | os.PathLike) -> RepairReport:
    """Rewrite a record folder keeping only records that replay on their kernel.

    A record is kept when it parses, its workload line exists and loads, and its trace
    replays on that workload's module. Kernels without a kept record are dropped, the
    rest renumbered. The new files are written beside the old ones and moved into place
    (``os.replace``); the first repair keeps the originals as ``*.bak``.

    Parameters
    ----------
    folder : path
        The record folder (what ``tvmq tune --work-dir`` names).

    Returns
    -------
    RepairReport

    Raises
    ------
    TvmqError
        When the folder is not a record folder, or another process is tuning in it.
    """
    folder = Path(folder)
    check_work_dir(folder)
    if not (folder / WORKLOAD_FILE).is_file() and not (folder / RECORD_FILE).is_file():
        raise TvmqError(f"{folder}: not a tuning record folder (no {WORKLOAD_FILE})")
    with writer_lock(folder):
        scan = _scan(folder)
        decoder = _Decoder(scan)
        renumber: dict[int, int] = {}
        records: list[bytes] = []
        for line, index, record in scan.records:
            if decoder.record(index, record) is None:
                continue
            new = renumber.setdefault(index, len(renumber))
            records.append(_INDEX.sub(b"[%d," % new, line, count=1))
        workloads = [scan.workload_lines[old] for old in sorted(renumber, key=renumber.get)]
        total_records = len(_lines(folder / RECORD_FILE))
        report = RepairReport(
            folder,
            records_kept=len(records),
            records_dropped=total_records - len(records),
            workloads_kept=len(workloads),
            workloads_dropped=len(scan.workload_lines) - len(workloads),
        )
        changed = (
            report.records_dropped
            or report.workloads_dropped
            or any(old != new for old, new in renumber.items())
        )
        if changed:
            report.backups = _rewrite(folder, workloads, records)
            report.rewritten = True
    return report


def _rewrite(folder: Path, workloads: list[bytes], records: list[bytes]) -> list[Path]:
    """Replace both files with the given lines; back up the originals the first time."""
    new = {WORKLOAD_FILE: workloads, RECORD_FILE: records}
    for name, lines in new.items():
        tmp = folder / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(line + b"\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
    backups = []
    for name in new:
        original, backup = folder / name, folder / (name + ".bak")
        if original.exists() and not backup.exists():
            original.replace(backup)  # the original's bytes, moved aside (no copy needed)
            backups.append(backup)
    # Records first: until the workload file is in place, records point at old numbers,
    # and a crash in between leaves the *.bak files to start over from.
    for name in (RECORD_FILE, WORKLOAD_FILE):
        os.replace(folder / (name + ".tmp"), folder / name)
    return backups
