"""Tuning record folders as MetaSchedule databases: what a build applies, what tune counts.

:func:`open_tuning_logs` gives :func:`tvmq.build.build_with_info` one database of the records
for its target (from ``./tuning_logs/<preset>/``, the logs shipped with tvmq, or folders the
user names); :func:`task_records` and :func:`best_ms` are how :func:`tvmq.tuning.tune` counts
what a kernel already has. Reading, locking and repairing a folder's files is
:mod:`tvmq.tuning_records`; measuring new candidates is :mod:`tvmq.tuning_measure`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tvm

from tvmq import tuning_records
from tvmq.errors import TvmqError
from tvmq.targets import TargetPreset, get_target
from tvmq.tuning_records import RECORD_FILE, WORKLOAD_FILE

if TYPE_CHECKING:
    from tvm.s_tir.meta_schedule import Database

LOG_FOLDER = "tuning_logs"
"""The folder (in the current directory) where :func:`tvmq.tuning.tune` writes by default."""

_log = logging.getLogger("tvmq.tuning")
FAILED_RUN_SECS = 1e9  # MetaSchedule records a failed build or run as 1e10 s


def default_work_dir(target: str | TargetPreset) -> Path:
    """``./tuning_logs/<preset name>``: where :func:`tune` writes and ``compile`` looks."""
    return Path.cwd() / LOG_FOLDER / get_target(target).name


def open_tuning_logs(logs: Any, target: str | TargetPreset) -> tuple[Database | None, list[Path]]:
    """Open tuning records for a build: one in-memory database of the records for the target.

    Parameters
    ----------
    logs : "auto", path, Database, a sequence of them, or None
        ``"auto"``: ``./tuning_logs/<preset>/`` and the logs shipped with tvmq
        (``tvmq._tuning_logs/<preset>/``), those that exist. A path: a record folder, which
        must hold ``database_workload.json`` and ``database_tuning_record.json``. A
        MetaSchedule Database is used as it is (no target filter). None: no records.
    target : str or TargetPreset
        Records for other targets (see the module docstring) are left out.

    Returns
    -------
    (Database or None, list of Path)
        The database (None when there are no records) and the folders read.

    Notes
    -----
    A folder is read by tvmq (:func:`tvmq.tuning_records.read_for_build`), not by
    MetaSchedule's ``JSONDatabase``: records for other targets are dropped before any is
    decoded, only each kernel's fastest record is decoded (the one a build applies), and
    damaged lines (a torn last line after a crash, records pointing at a missing kernel)
    are skipped with one warning naming the folder instead of failing the build.
    """
    from tvm.s_tir import meta_schedule as ms

    if logs is None:
        return None, []
    preset = get_target(target)
    if isinstance(logs, str) and logs == "auto":
        candidates = [default_work_dir(preset), shipped_dir(preset.name)]
        folders = []
        for folder in candidates:
            if folder is None or not (folder / RECORD_FILE).is_file():
                continue
            if all(folder.resolve() != seen.resolve() for seen in folders):
                folders.append(folder)
        sources: list = folders
    elif isinstance(logs, str | os.PathLike | ms.Database):
        sources = [logs]
    elif isinstance(logs, Sequence):
        sources = list(logs)
    else:
        raise TvmqError(f"tuning_logs must be 'auto', a folder or a database, not {logs!r}")

    databases, folders, records = [], [], []
    want = tuning_records.target_key(preset.tvm_target())
    for source in sources:
        if isinstance(source, ms.Database):
            databases.append(source)
            continue
        folder = Path(source)
        if not (folder / WORKLOAD_FILE).is_file() or not (folder / RECORD_FILE).is_file():
            raise TvmqError(
                f"{folder}: not a tuning log folder (needs {WORKLOAD_FILE} and {RECORD_FILE})"
            )
        kept, other_target, damaged = tuning_records.read_for_build(folder, want)
        if damaged:
            tuning_records.warn_damaged(folder, damaged)
        if other_target:
            _log.info(
                "%s: %d records are for another target than %r and are not used",
                folder,
                other_target,
                preset.name,
            )
        folders.append(folder)
        records.extend(kept)
    if records:
        memory = ms.database.MemoryDatabase()
        for record in records:
            workload = memory.commit_workload(record.workload.mod)
            memory.commit_tuning_record(
                ms.database.TuningRecord(
                    record.trace, workload, record.run_secs, record.target, record.args_info
                )
            )
        databases.insert(0, memory)
    if not databases:
        return None, folders
    if len(databases) == 1:
        return databases[0], folders
    return ms.database.UnionDatabase(*databases), folders


def open_database(work_dir: Path) -> Database:
    """MetaSchedule's JSONDatabase of the folder, which tuning appends to.

    Parsing was checked before (``tuning_records.check_for_tuning``); MetaSchedule also
    replays every record's trace, so a record pointing at the wrong kernel fails here.
    """
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.database.JSONDatabase(work_dir=str(work_dir))
    except Exception as err:  # TVM raises several types for a damaged log
        _log.debug("JSONDatabase(%s) failed: %s", work_dir, err)
        raise tuning_records.damaged_error(
            work_dir, tuning_records.count_damaged(work_dir)
        ) from None


def task_records(database: Database, mod: tvm.IRModule, target: tvm.target.Target) -> list:
    """The records of one workload for the target, failed ones included (the target compared
    by :func:`tvmq.tuning_records.target_key`)."""
    if not database.has_workload(mod):
        return []
    workload = database.commit_workload(mod)  # the stored one: its records share it
    key = tuning_records.target_key(target)
    return [
        r
        for r in database.get_all_tuning_records()
        if r.workload.same_as(workload) and tuning_records.target_key(r.target) == key
    ]


def best_ms(records: list) -> float | None:
    """The fastest latency among records, in ms (None if none built and ran)."""
    best = None
    for record in records:
        secs = [float(s) for s in record.run_secs or []]
        if secs and max(secs) < FAILED_RUN_SECS:
            ms = sum(secs) / len(secs) * 1e3
            best = ms if best is None else min(best, ms)
    return best


def shipped_dir(name: str) -> Path | None:
    """The folder of the logs shipped with tvmq for a preset, if any."""
    try:
        folder = files("tvmq._tuning_logs") / name
    except ModuleNotFoundError:
        return None
    return Path(str(folder)) if folder.is_dir() else None
