"""MetaSchedule tuning: search for fast kernel schedules, keep them in a log, build with them.

:func:`tune` measures candidate schedules of every kernel (TIR function) a model builds
into, on this machine or on a board over TVM RPC, and appends each measurement to a
MetaSchedule ``JSONDatabase`` in ``work_dir`` (``tuning_logs/<preset>/`` by default).
:func:`tvmq.compile` (through :func:`tvmq.build.build_with_info`) then gives every kernel
with a record its best tuned schedule; kernels without one keep tvmq's default schedule.

What is tuned is what is built: the tasks come from :func:`tvmq.build.fuse_to_tir`, the
first phase of :func:`tvmq.build.build`, so give :func:`tune` the model exactly as it will
be built (after quantization or pruning). Kernels a tvmq pass already scheduled (marked
``tirx.is_scheduled``, e.g. the VNNI int8 dense) are not tuned.

Resuming
    Every measured candidate is appended to ``database_tuning_record.json`` as soon as its
    batch is measured, so an interrupted run (Ctrl-C) loses at most the batch in flight. A
    rerun counts the records each task already has against its budget: tasks with enough are
    skipped, the others continue from their best schedules so far.

Damaged folders and concurrent runs
    One process at a time tunes in a folder (a lock file, ``.tvmq-tune.lock``); a second
    one is refused. A torn line (a crash or full disk) or a record pointing at a missing
    kernel is skipped with a warning when a build reads the folder, refused by :func:`tune`,
    and removed by :func:`repair` (``tvmq tune --repair --work-dir DIR``).

Records and targets
    A record belongs to a kernel (its TIR, compared structurally, so it is independent of the
    weights' values) and a target. :func:`open_tuning_logs` only applies records whose target
    has the same kind, CPU (``mcpu``, or ``arch`` for CUDA), architecture and ``mattr`` as the
    preset's: logs tuned for the ``host`` preset on one CPU are ignored on another.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import tvm

from tvmq import tuning_lock, tuning_records
from tvmq import tuning_measure as measure
from tvmq.errors import TvmqError
from tvmq.lowering import fuse_to_tir
from tvmq.rpc_session import BoardError
from tvmq.targets import TargetPreset, get_target
from tvmq.tuning_database import (
    best_ms,
    default_work_dir,
    open_database,
    open_tuning_logs,
    task_records,
)
from tvmq.tuning_offline import OfflineRound, check_new_folder
from tvmq.tuning_records import RECORD_FILE, WORKLOAD_FILE, RepairReport, repair

if TYPE_CHECKING:
    from tvm.s_tir.meta_schedule import CostModel

    from tvmq.frontends import ImportedModel

__all__ = [
    "RECORD_FILE",
    "WORKLOAD_FILE",
    "RepairReport",
    "TaskReport",
    "TuningFailed",
    "TuneReport",
    "default_work_dir",
    "open_tuning_logs",
    "repair",
    "tunable_tasks",
    "tune",
]

_log = logging.getLogger(__name__)


@dataclass
class TaskReport:
    """What tuning one kernel produced.

    ``trials`` counts all records of the kernel in the database (earlier runs included),
    ``new_trials`` those measured by this run, ``failed_trials`` those of them that did not
    build or run (``failure`` says why the first did); ``best_ms`` is the fastest working
    schedule on record (None when none built and ran); ``skipped`` says the kernel already
    had its budget; ``error`` why MetaSchedule could not tune it (it keeps its default).
    """

    name: str
    trials: int
    new_trials: int
    best_ms: float | None
    skipped: bool = False
    error: str | None = None
    failed_trials: int = 0
    failure: str | None = None

    @property
    def failed(self) -> bool:
        """Whether this run got nothing from the kernel: an error, or only failed candidates."""
        return self.error is not None or (
            self.new_trials > 0 and self.failed_trials == self.new_trials
        )

    @property
    def reason(self) -> str | None:
        """Why the kernel failed this run (None when it did not)."""
        if not self.failed:
            return None
        return self.error or f"every candidate failed: {self.failure or 'no error message'}"


@dataclass
class TuneReport:
    """The result of :func:`tune`: the record folder and one :class:`TaskReport` per kernel.

    ``planned_trials`` is what this run set out to measure (0 when every kernel already had
    its budget).
    """

    target: str
    work_dir: Path
    tasks: list[TaskReport] = field(default_factory=list)
    seconds: float = 0.0
    planned_trials: int = 0
    offline: Path | None = None  # where an offline round wrote its candidates

    @property
    def new_trials(self) -> int:
        """Candidates measured by this run."""
        return sum(t.new_trials for t in self.tasks)

    @property
    def tuned(self) -> int:
        """Kernels with at least one working tuned schedule in the database."""
        return sum(t.best_ms is not None for t in self.tasks)

    @property
    def failed(self) -> list[TaskReport]:
        """Kernels this run tried to tune and got nothing from."""
        return [t for t in self.tasks if t.failed]

    def summary(self) -> str:
        """A small table, one kernel a line, and a last line that counts only what worked."""
        width = max([len(t.name) for t in self.tasks] + [6])
        lines = [f"{'kernel':<{width}}  trials  new  best ms"]
        for t in self.tasks:
            best = "-" if t.best_ms is None else f"{t.best_ms:.4g}"
            note = f"  not tuned: {t.reason}" if t.failed else ""
            lines.append(f"{t.name:<{width}}  {t.trials:>6}  {t.new_trials:>3}  {best:>7}{note}")
        tuned = f"{self.tuned}/{len(self.tasks)} kernels tuned" if self.tuned else "no kernel tuned"
        failed_trials = sum(t.failed_trials for t in self.tasks)
        bad = f" ({failed_trials} failed)" if failed_trials else ""
        last = (
            f"{tuned} for {self.target!r}, {self.new_trials} new trials{bad} in "
            f"{self.seconds:.0f} s; records in {self.work_dir}"
        )
        if self.offline is not None:
            last = (
                f"{self.new_trials} candidates{bad} written to {self.offline} in "
                f"{self.seconds:.0f} s: time them on the device with python BUNDLE/run.py "
                f"measure {self.offline}, then tvmq tune --import {self.offline}"
            )
        if self.failed:
            last += f"; {len(self.failed)} kernel(s) failed, first: {self.failed[0].reason}"
        lines.append(last)
        return "\n".join(lines)


class TuningFailed(TvmqError):
    """Every kernel :func:`tune` set out to tune failed; ``report`` says how."""

    def __init__(self, report: TuneReport) -> None:
        self.report = report
        first = report.failed[0]
        super().__init__(
            f"tuning failed: all {len(report.failed)} kernel(s) to tune failed, no new "
            f"working schedule in {report.work_dir} (first, {first.name}: {first.reason})"
        )


def tunable_tasks(fused: tvm.IRModule, target: tvm.target.Target) -> list:
    """MetaSchedule's tasks of a fused module, less the kernels a tvmq pass already
    scheduled by hand (``tirx.is_scheduled`` on the PrimFunc, e.g. the VNNI int8 kernels)."""
    from tvm.s_tir import meta_schedule as ms

    def prescheduled(task) -> bool:
        funcs = task.dispatched[0].functions.values()
        return any(
            isinstance(f, tvm.tirx.PrimFunc)
            and f.attrs is not None
            and bool(f.attrs.get("tirx.is_scheduled", False))
            for f in funcs
        )

    return [t for t in ms.relax_integration.extract_tasks(fused, target) if not prescheduled(t)]


def tune(
    model: ImportedModel | tvm.IRModule,
    target: str | TargetPreset = "host",
    *,
    work_dir: str | os.PathLike | None = None,
    trials: int = 512,
    trials_per_task: int | None = None,
    rpc: tuple[str, int, str] | None = None,
    progress: bool = True,
    cost_model: Literal["xgb", "random"] | CostModel = "xgb",
    trials_per_batch: int = 16,
    seed: int | None = None,
    measure_default: bool = True,
    offline: str | os.PathLike | None = None,
) -> TuneReport:
    """Tune a model's kernels for a target with MetaSchedule and log the results.

    Parameters
    ----------
    model : ImportedModel or tvm.IRModule
        The Relax model as it will be built (after any quantization or pruning).
    target : str or TargetPreset
        The preset to tune for (anything :func:`tvmq.targets.get_target` takes).
    work_dir : path, optional
        The record folder (created if missing; existing records are kept and reused).
        Default: ``./tuning_logs/<preset name>``, where :func:`tvmq.compile` looks.
    trials : int
        The total number of candidates to measure over all kernels, records from earlier
        runs included (so rerunning the same command resumes and then stops).
    trials_per_task : int, optional
        The most candidates per kernel, earlier records included. Default: ``trials``
        shared evenly among the kernels.
    rpc : (host, port, key) or (host, port, key, timeout), optional
        Measure on a board through the TVM RPC tracker at ``host:port``, on a device
        registered under ``key``; candidates are linked with the preset's ``cc``.
        ``timeout`` (default 60 s) bounds each wait for the tracker and a free board.
        Default: measure here.
    progress : bool
        Show a progress bar over the trials, with each kernel's best latency so far.
    cost_model : "xgb", "random" or a MetaSchedule CostModel
        What ranks the candidates before they are measured.
    trials_per_batch : int
        Candidates built and measured together; an interrupt loses at most one batch.
    seed : int, optional
        Seed of the search, for repeatable runs.
    measure_default : bool
        On CPU targets, measure tvmq's default schedule of each kernel as its first candidate
        (when the kernel has no record yet), so that the best record is never slower than
        the schedule the kernel gets without tuning; it counts as one of the kernel's trials.
    offline : path, optional
        Measure nothing: build the candidates into this new folder for a device this
        machine cannot reach (:mod:`tvmq.tuning_offline`); the search starts from the
        records in ``work_dir``, which ``tvmq tune --import`` adds the timings to.

    Returns
    -------
    TuneReport

    Raises
    ------
    TuningFailed
        When every kernel to tune failed (an error, or no candidate built and ran); its
        ``report`` has the details. A run that tuned some kernels returns its report.
    TvmqError
        Before anything is measured: when the model has no kernel to tune, arguments are
        invalid, the cost model or the builder cannot work, ``work_dir`` is a file or not
        writable, another process is tuning in it (one writer at a time, see
        :func:`tvmq.tuning_lock.writer_lock`), or its records are damaged. A damaged
        folder is refused, not repaired on the fly: repairing drops records, which
        :func:`repair` (``tvmq tune --repair``) does on request and with a backup.
    tvmq.rpc.BoardError
        Over RPC, when the tracker or the boards fail, or no board is left to measure on;
        the records measured so far stay in ``work_dir``.
    KeyboardInterrupt
        On Ctrl-C, after the records measured so far are safely in ``work_dir``.
    """
    started = time.perf_counter()
    preset = get_target(target)
    if trials < 1 or (trials_per_task is not None and trials_per_task < 1):
        raise TvmqError("trials and trials_per_task must be positive")
    if trials_per_batch < 1:
        raise TvmqError("trials_per_batch must be positive")
    mod = model if isinstance(model, tvm.IRModule) else model.mod
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir(preset)
    tvm_target = measure.tuning_target(preset, rpc)
    num_threads = measure.usable_cpus()
    # Everything that can fail without measuring fails here, before minutes of work.
    _check_folder(work_dir)
    if offline is not None:
        if rpc is not None:
            raise TvmqError("an offline round measures nothing: drop the RPC tracker")
        check_new_folder(Path(offline))
    cost_model = measure.make_cost_model(cost_model, num_threads)

    measure.register_intrinsics(preset)
    fused = fuse_to_tir(mod, preset)
    tasks = tunable_tasks(fused, tvm_target)
    if not tasks:
        raise TvmqError(f"the model has no kernel to tune for target {preset.name!r}")
    per_task = trials_per_task if trials_per_task is not None else math.ceil(trials / len(tasks))
    builder = measure.make_builder(preset, rpc)
    measure.check_builder(tasks[0], preset, rpc)
    _make_folder(work_dir)
    offline_round = None
    if offline is not None:
        offline_round = OfflineRound(Path(offline), preset.name, preset.kind)
    try:
        report = _tune_and_report(
            tasks, trials, per_task, work_dir, preset, tvm_target, builder, rpc, cost_model,
            progress, seed, measure_default, num_threads, trials_per_batch, offline_round,
        )  # fmt: skip
        if offline_round is not None:
            offline_round.commit()
            report.offline = offline_round.folder
    finally:
        if offline_round is not None:
            offline_round.discard()
    report.seconds = time.perf_counter() - started
    if report.planned_trials and all(t.failed for t in report.tasks if not t.skipped):
        raise TuningFailed(report)
    return report


def _tune_and_report(
    tasks, trials, per_task, work_dir, preset, tvm_target, builder, rpc, cost_model, progress,
    seed, measure_default, num_threads, trials_per_batch, offline_round,
) -> TuneReport:  # fmt: skip
    """Plan the trials from the records in ``work_dir``, tune, and report each kernel."""
    with tuning_lock.writer_lock(work_dir):
        database = open_database(work_dir)
        earlier = [task_records(database, t.dispatched[0], tvm_target) for t in tasks]
        plan = _plan([len(records) for records in earlier], trials, per_task)
        reports = [
            TaskReport(t.task_name, len(records), 0, best_ms(records), skipped=(todo == 0))
            for t, records, todo in zip(tasks, earlier, plan, strict=True)
        ]
        report = TuneReport(preset.name, work_dir, reports, planned_trials=sum(plan))
        if sum(plan):
            runner = offline_round.runner() if offline_round else measure.make_runner(rpc)
            _tune_tasks(
                tasks, plan, [len(r) for r in earlier], report, database, builder,
                runner, cost_model, progress, seed, measure_default,
                num_threads, trials_per_batch, offline_round and offline_round.callbacks,
            )  # fmt: skip
        for task, task_report in zip(tasks, reports, strict=True):
            records = task_records(database, task.dispatched[0], tvm_target)
            task_report.trials, task_report.best_ms = len(records), best_ms(records)
    return report


def _plan(done: list[int], trials: int, per_task: int) -> list[int]:
    """Trials to measure per task: up to ``per_task`` each, ``trials`` in all."""
    budget_left = max(trials - sum(done), 0)
    plan = []
    for count in done:
        n = min(max(per_task - count, 0), budget_left)
        budget_left -= n
        plan.append(n)
    return plan


def _tune_tasks(
    tasks, plan, done, report, database, builder, runner, cost_model, progress, seed,
    measure_default, num_threads, per_batch, callbacks_for=None,
) -> None:  # fmt: skip
    """Tune each task for its planned trials; a kernel MetaSchedule cannot handle is skipped."""
    from tvm.s_tir import meta_schedule as ms

    reports = report.tasks
    bar = measure.progress_bar(sum(plan), report.target, progress)
    tracker = measure.Progress(bar, reports)
    try:
        for index, (task, todo) in enumerate(zip(tasks, plan, strict=True)):
            if todo == 0:
                continue
            tracker.current = index
            try:
                if measure_default and done[index] == 0 and task.target.kind.name == "llvm":
                    default = measure.default_schedule_context(task, num_threads)
                    measure.run_one(
                        default, 1, 1, builder, runner, database, cost_model, tracker,
                        callbacks_for,
                    )  # fmt: skip
                    todo -= 1
                    if todo == 0:
                        continue
                context = ms.TuneContext(
                    mod=task.dispatched[0],
                    target=task.target,
                    space_generator="post-order-apply",
                    search_strategy="evolutionary",
                    task_name=task.task_name,
                    logger=measure.MS_LOGGER,
                    rand_state=-1 if seed is None else seed + index,
                    num_threads=num_threads,
                ).clone()
                measure.run_one(
                    context, todo, per_batch, builder, runner, database,
                    cost_model, tracker, callbacks_for,
                )  # fmt: skip
            except KeyboardInterrupt:
                raise
            except BoardError as err:  # no board left to measure on: stop, keep records
                raise BoardError(
                    f"{err}; tuning stopped, the records measured so far are in "
                    f"{report.work_dir} (rerun to resume)"
                ) from None
            except Exception as err:  # one kernel MetaSchedule cannot handle: go on
                reports[index].error = measure.one_line(err)
                # The summary lists it; a warning per kernel would break the one-line errors.
                _log.info("kernel %s not tuned: %s", task.task_name, reports[index].error)
    except KeyboardInterrupt:
        bar.close()
        _log.warning(
            "tuning interrupted: the records measured so far are in %s; rerun to resume",
            report.work_dir,
        )
        raise
    bar.close()


# --------------------------------------------------------------------------------------
# Checks before tuning


def _check_folder(work_dir: Path) -> None:
    """Refuse a work dir that is a file, unwritable, being tuned, or damaged."""
    tuning_records.check_work_dir(work_dir)
    tuning_lock.check_not_locked(work_dir)
    tuning_records.check_for_tuning(work_dir)


def _make_folder(work_dir: Path) -> None:
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TvmqError(f"--work-dir {work_dir}: cannot create it ({err.strerror})") from err
