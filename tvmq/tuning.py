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

import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import tvm

from tvmq import tuning_records
from tvmq.errors import TvmqError
from tvmq.targets import TargetPreset, get_target
from tvmq.tuning_records import RECORD_FILE, WORKLOAD_FILE, RepairReport, repair

if TYPE_CHECKING:
    from tvm.s_tir.meta_schedule import CostModel, Database

    from tvmq.frontends import ImportedModel

__all__ = [
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

LOG_FOLDER = "tuning_logs"
"""The folder (in the current directory) where :func:`tune` writes records by default."""

_log = logging.getLogger(__name__)
# MetaSchedule logs every batch at INFO; tvmq's progress bar says the same more briefly.
_MS_LOGGER = logging.getLogger("tvmq.tuning.metaschedule")
_FAILED_RUN_SECS = 1e9  # MetaSchedule records a failed build or run as 1e10 s


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


def default_work_dir(target: str | TargetPreset) -> Path:
    """``./tuning_logs/<preset name>``: where :func:`tune` writes and ``compile`` looks."""
    return Path.cwd() / LOG_FOLDER / get_target(target).name


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
        :func:`tvmq.tuning_records.writer_lock`), or its records are damaged. A damaged
        folder is refused, not repaired on the fly: repairing drops records, which
        :func:`repair` (``tvmq tune --repair``) does on request and with a backup.
    tvmq.rpc.BoardError
        Over RPC, when the tracker or the boards fail, or no board is left to measure on;
        the records measured so far stay in ``work_dir``.
    KeyboardInterrupt
        On Ctrl-C, after the records measured so far are safely in ``work_dir``.
    """

    from tvmq.lowering import fuse_to_tir

    started = time.perf_counter()
    preset = get_target(target)
    if trials < 1 or (trials_per_task is not None and trials_per_task < 1):
        raise TvmqError("trials and trials_per_task must be positive")
    if trials_per_batch < 1:
        raise TvmqError("trials_per_batch must be positive")
    mod = model if isinstance(model, tvm.IRModule) else model.mod
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir(preset)
    tvm_target = _tuning_target(preset, rpc)
    num_threads = _usable_cpus()
    # Everything that can fail without measuring fails here, before minutes of work.
    _check_folder(work_dir)
    cost_model = _make_cost_model(cost_model, num_threads)

    _register_intrinsics(preset)
    fused = fuse_to_tir(mod, preset)
    tasks = tunable_tasks(fused, tvm_target)
    if not tasks:
        raise TvmqError(f"the model has no kernel to tune for target {preset.name!r}")
    per_task = trials_per_task if trials_per_task is not None else math.ceil(trials / len(tasks))
    builder = _builder(preset, rpc)
    _check_builder(tasks[0], preset, rpc)
    _make_folder(work_dir)
    with tuning_records.writer_lock(work_dir):
        database = _open_database(work_dir)
        earlier = [_task_records(database, t.dispatched[0], tvm_target) for t in tasks]
        plan = _plan([len(records) for records in earlier], trials, per_task)
        reports = [
            TaskReport(t.task_name, len(records), 0, _best_ms(records), skipped=(todo == 0))
            for t, records, todo in zip(tasks, earlier, plan, strict=True)
        ]
        report = TuneReport(preset.name, work_dir, reports, planned_trials=sum(plan))
        if sum(plan):
            _tune_tasks(
                tasks, plan, [len(r) for r in earlier], report, database, builder,
                _runner(rpc), cost_model, progress, seed, measure_default, num_threads,
                trials_per_batch,
            )  # fmt: skip
        for task, task_report in zip(tasks, reports, strict=True):
            records = _task_records(database, task.dispatched[0], tvm_target)
            task_report.trials, task_report.best_ms = len(records), _best_ms(records)
    report.seconds = time.perf_counter() - started
    if report.planned_trials and all(t.failed for t in report.tasks if not t.skipped):
        raise TuningFailed(report)
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
    measure_default, num_threads, per_batch,
) -> None:  # fmt: skip
    """Tune each task for its planned trials; a kernel MetaSchedule cannot handle is skipped."""
    from tvm.s_tir import meta_schedule as ms

    from tvmq.rpc import BoardError

    reports = report.tasks
    bar = _progress_bar(sum(plan), report.target, progress)
    tracker = _Progress(bar, reports)
    try:
        for index, (task, todo) in enumerate(zip(tasks, plan, strict=True)):
            if todo == 0:
                continue
            tracker.current = index
            try:
                if measure_default and done[index] == 0 and task.target.kind.name == "llvm":
                    default = _default_schedule_context(task, num_threads)
                    _run_one(default, 1, 1, builder, runner, database, cost_model, tracker)
                    todo -= 1
                    if todo == 0:
                        continue
                context = ms.TuneContext(
                    mod=task.dispatched[0],
                    target=task.target,
                    space_generator="post-order-apply",
                    search_strategy="evolutionary",
                    task_name=task.task_name,
                    logger=_MS_LOGGER,
                    rand_state=-1 if seed is None else seed + index,
                    num_threads=num_threads,
                ).clone()
                _run_one(
                    context, todo, per_batch, builder, runner, database,
                    cost_model, tracker,
                )  # fmt: skip
            except KeyboardInterrupt:
                raise
            except BoardError as err:  # no board left to measure on: stop, keep records
                raise BoardError(
                    f"{err}; tuning stopped, the records measured so far are in "
                    f"{report.work_dir} (rerun to resume)"
                ) from None
            except Exception as err:  # one kernel MetaSchedule cannot handle: go on
                reports[index].error = _one_line(err)
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


def _one_line(err: BaseException) -> str:
    """``Type: last line of the message``: TVM errors carry pages of context above it."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------------------
# Checks before tuning


def _check_folder(work_dir: Path) -> None:
    """Refuse a work dir that is a file, unwritable, being tuned, or damaged."""
    tuning_records.check_work_dir(work_dir)
    tuning_records.check_not_locked(work_dir)
    tuning_records.check_for_tuning(work_dir)


def _make_folder(work_dir: Path) -> None:
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TvmqError(f"--work-dir {work_dir}: cannot create it ({err.strerror})") from err


def _open_database(work_dir: Path) -> Database:
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


def _make_cost_model(cost_model, num_threads: int):
    """The cost model, created now so that one that cannot work fails before any task."""
    from tvm.s_tir import meta_schedule as ms

    if isinstance(cost_model, ms.CostModel):
        return cost_model
    if cost_model == "xgb":
        try:
            import xgboost  # noqa: F401 - MetaSchedule imports it only when a task starts
        except ImportError as err:
            raise TvmqError(
                f"the 'xgb' cost model needs xgboost, which does not import ({err}): "
                "pip install xgboost-cpu, or use --cost-model random"
            ) from err
    try:
        return ms.CostModel.create(cost_model, num_tuning_cores=num_threads)
    except Exception as err:
        raise TvmqError(f"cannot create the {cost_model!r} cost model: {_one_line(err)}") from err


def _check_builder(task, preset: TargetPreset, rpc) -> None:
    """Build and link one candidate here, so that a builder that cannot work fails now.

    MetaSchedule turns a failed build into a failed candidate, so a broken builder
    (missing compiler, missing worker packages) would otherwise measure nothing, slowly.
    Only CPU kernels are tried: an unscheduled GPU kernel does not build by design.
    """
    import importlib
    import shutil

    for name in ("psutil", "cloudpickle"):  # the builder's and runner's worker pools
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise TvmqError(f"tuning needs the {name} package: pip install {name}") from err
    if task.target.kind.name != "llvm":
        return
    try:
        built = _build_candidate(task.dispatched[0], task.target, None)
        path = _export_candidate(built, _candidate_cc(preset, rpc))
    except TvmqError:
        raise
    except Exception as err:
        raise TvmqError(
            f"cannot build kernels for target {preset.name!r}, so nothing can be tuned: "
            f"{_one_line(err)}"
        ) from err
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


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
        candidates = [default_work_dir(preset), _shipped_dir(preset.name)]
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
    want = _target_key(preset.tvm_target())
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


# --------------------------------------------------------------------------------------
# Tuning one task


def _run_one(context, trials, per_batch, builder, runner, database, cost_model, tracker) -> None:
    """Tune one task for ``trials`` candidates, sharing builder, runner and cost model."""
    from tvm.s_tir import meta_schedule as ms

    callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _ProgressCallback(tracker)]
    scheduler = ms.task_scheduler.RoundRobin()
    try:
        scheduler.tune(
            tasks=[context],
            task_weights=[1.0],
            max_trials_global=trials,
            max_trials_per_task=trials,
            num_trials_per_iter=min(per_batch, trials),
            builder=builder,
            runner=runner,
            measure_callbacks=callbacks,
            database=database,
            cost_model=cost_model,
        )
    except KeyboardInterrupt:
        raise
    except Exception as err:
        # A Ctrl-C inside a callback crosses TVM's C++ and comes back as another error type.
        if "KeyboardInterrupt" in f"{type(err).__name__}: {err}" or tracker.interrupted:
            raise KeyboardInterrupt from err
        raise


def _default_schedule_context(task, num_threads: int):
    """A TuneContext whose only candidate is tvmq's default CPU schedule of ``task``."""
    from tvm.s_tir import meta_schedule as ms

    from tvmq.cpu_schedule import CPUDefaultSchedule

    rule, target = CPUDefaultSchedule(), task.target

    def default_space(sch):
        scheduled = rule.apply(sch.mod["main"], target, False)
        return [scheduled if scheduled is not None else sch]  # its trace replays on the task

    space = ms.space_generator.ScheduleFn(
        default_space, sch_rules=[], postprocs=[], mutator_probs={}
    )
    return ms.TuneContext(
        mod=task.dispatched[0],
        target=target,
        space_generator=space,
        search_strategy="replay-trace",
        task_name=task.task_name,
        logger=_MS_LOGGER,
        num_threads=num_threads,
    ).clone()


class _Progress:
    """The tqdm bar's state: trials done and each task's best latency."""

    def __init__(self, bar, reports: list[TaskReport]) -> None:
        self.bar = bar
        self.reports = reports
        self.current = 0
        self.interrupted = False

    def note_failures(self, errors: Sequence[str | None]) -> None:
        """Keep the current task's first failed candidate's message (for the summary)."""
        report = self.reports[self.current]
        if report.failure is None:
            report.failure = next((e for e in errors if e), None)

    def update(self, run_secs: list[float | None]) -> None:
        """Count one measured batch of the current task; None marks a failed candidate."""
        report = self.reports[self.current]
        report.new_trials += len(run_secs)
        report.failed_trials += sum(secs is None for secs in run_secs)
        for secs in run_secs:
            if secs is not None and (report.best_ms is None or secs * 1e3 < report.best_ms):
                report.best_ms = secs * 1e3
        self.bar.update(len(run_secs))
        self.bar.set_postfix_str(
            "  ".join(
                f"{_short(r.name)} {_ms(r.best_ms)}" for r in self.reports if r.best_ms is not None
            ),
            refresh=False,
        )


def _make_progress_callback():
    """The MeasureCallback class (defined lazily: importing MetaSchedule is slow)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        """Feeds each measured batch to a :class:`_Progress` (after AddToDatabase saved it)."""

        def __init__(self, tracker: _Progress) -> None:
            self.tracker = tracker

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, results):
            secs, errors = [], []
            for built, result in zip(builder_results, results, strict=False):
                values = [float(s) for s in result.run_secs or []]
                ok = result.error_msg is None and values and max(values) < _FAILED_RUN_SECS
                secs.append(sum(values) / len(values) if ok else None)
                if not ok:
                    errors.append(_error_line(built.error_msg or result.error_msg))
            self.tracker.note_failures(errors)
            try:
                self.tracker.update(secs)
            except KeyboardInterrupt:
                self.tracker.interrupted = True
                raise

    return ProgressCallback


def _error_line(message: str | None) -> str | None:
    """The last non-empty line of a builder's or runner's error message: they are
    tracebacks, whose last line is the exception."""
    for line in reversed((message or "").splitlines()):
        if line.strip():
            return line.strip()[:300]
    return None


def _ProgressCallback(tracker: _Progress):  # noqa: N802 - stands for the lazily made class
    """A MeasureCallback updating ``tracker``."""
    global _PROGRESS_CALLBACK_CLASS
    if _PROGRESS_CALLBACK_CLASS is None:
        _PROGRESS_CALLBACK_CLASS = _make_progress_callback()
    return _PROGRESS_CALLBACK_CLASS(tracker)


_PROGRESS_CALLBACK_CLASS = None


def _progress_bar(total: int, name: str, enabled: bool):
    """A tqdm bar over trials (a silent one when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"tuning for {name}", unit="trial", disable=not enabled)


def _ms(value: float) -> str:
    """A latency for the progress bar: ms, or µs below 0.1 ms."""
    return f"{value:.3g}ms" if value >= 0.1 else f"{value * 1e3:.3g}µs"


def _short(name: str) -> str:
    """A task name shortened for the progress bar."""
    name = name.removeprefix("fused_")
    return name if len(name) <= 20 else name[:19] + "…"


# --------------------------------------------------------------------------------------
# Builder and runner


def _builder(preset: TargetPreset, rpc):
    """A LocalBuilder that does not import TVM's tensor intrinsics in each worker.

    MetaSchedule's default build function imports ``tvm.s_tir.tensor_intrin`` (about 35 s,
    mostly CUDA intrinsics) in every worker, so with its 30 s timeout every build can fail.
    Candidates are scheduled before they are built, so the worker needs no intrinsics.
    """
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(
        f_build=_build_candidate,
        f_export=functools.partial(_export_candidate, cc=_candidate_cc(preset, rpc)),
        timeout_sec=120,
        max_workers=_usable_cpus(),
    )


def _candidate_cc(preset: TargetPreset, rpc) -> str | None:
    """The compiler that links candidates: the preset's ``cc``, or TVM's default."""
    from tvmq.toolchain import find_compiler as _find_compiler

    if preset.cc is not None:
        return _find_compiler(preset.cc, preset.name)
    if rpc is not None and preset.is_cross_compiled:
        raise TvmqError(f"target {preset.name!r} is cross-compiled but its preset has no cc")
    return None


def _runner(rpc):
    """A LocalRunner, or an RPCRunner for ``(host, port, key[, timeout])``.

    Over RPC, a candidate that cannot get a board within ``timeout`` (tracker gone, no
    board left) ends the tune with a :class:`~tvmq.rpc.BoardError`
    (:func:`tvmq.rpc.tuning_runner`) instead of waiting forever.
    """
    from tvm.s_tir import meta_schedule as ms

    from tvmq import rpc as board_rpc

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40)
    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=60, evaluator_config=evaluator)
    host, port, key, *rest = rpc
    timeout = float(rest[0]) if rest else board_rpc.DEFAULT_TIMEOUT_S
    runner = ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(
            tracker_host=host,
            tracker_port=int(port),
            tracker_key=key,
            session_timeout_sec=120,
        ),
        evaluator_config=evaluator,
        f_create_session=functools.partial(board_rpc.tuning_session, timeout=timeout),
        f_alloc_argument=_alloc_arguments_on_board,
        max_workers=1,
    )
    return board_rpc.tuning_runner(runner)


def _alloc_arguments_on_board(session, device, args_info, alloc_repeat: int) -> list:
    """RPCRunner's argument allocation, with the random data made here and copied over.

    MetaSchedule's default fills arguments with ``tvm.contrib.random.random_fill_for_measure``
    on the board, which a board running the ``apache-tvm`` wheel's RPC server does not have
    (every candidate then fails).
    """
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    rng = np.random.default_rng(0)

    def fill(tensor) -> None:
        dtype = np.dtype(str(tensor.dtype))
        shape = tuple(int(d) for d in tensor.shape)
        if dtype.kind == "f":
            data = rng.uniform(-1.0, 1.0, shape).astype(dtype)
        elif dtype.kind == "b":
            data = rng.integers(0, 2, shape).astype(dtype)
        else:  # small integers: valid as indices and in range for every integer type
            data = rng.integers(0, 8, shape).astype(dtype)
        tensor.copyfrom(data)

    return alloc_argument_common(fill, device, args_info, alloc_repeat)


def _build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params) -> Any:
    """Build one scheduled candidate (runs in a builder worker)."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.compile(mod, target=target)


def _export_candidate(mod, cc: str | None) -> str:
    """Link a built candidate as a ``.so`` with ``cc`` (runs in a builder worker)."""
    path = os.path.join(tempfile.mkdtemp(prefix="tvmq-tune-"), "candidate.so")
    if cc is None:
        mod.export_library(path)
    else:
        mod.export_library(path, cc=cc)
    return path


def _tuning_target(preset: TargetPreset, rpc) -> tvm.target.Target:
    """The preset's target, with the ``num-cores`` MetaSchedule requires of CPU targets."""
    target = preset.tvm_target()
    if target.kind.name != "llvm" or "num-cores" in target.attrs:
        return target
    if rpc is not None:
        raise TvmqError(
            f'target {preset.name!r} has no "num-cores", which MetaSchedule needs: add the '
            "board's core count to the preset's target"
        )
    # Measured here, so tuned for this machine's cores; records match any core count.
    return tvm.target.Target({**target.export(), "num-cores": _usable_cpus()})


def _register_intrinsics(preset: TargetPreset) -> None:
    """Register tvmq's tensor intrinsics the search space may tensorize with."""
    if "avx512vnni" in preset.features:
        import tvmq.kernels.vnni_intrin  # noqa: F401


# --------------------------------------------------------------------------------------
# Records


def _task_records(database: Database, mod: tvm.IRModule, target: tvm.target.Target) -> list:
    """The records of one workload for the target (see _target_key), failed ones included."""
    if not database.has_workload(mod):
        return []
    workload = database.commit_workload(mod)  # the stored one: its records share it
    key = _target_key(target)
    return [
        r
        for r in database.get_all_tuning_records()
        if r.workload.same_as(workload) and _target_key(r.target) == key
    ]


def _best_ms(records: list) -> float | None:
    """The fastest latency among records, in ms (None if none built and ran)."""
    best = None
    for record in records:
        secs = [float(s) for s in record.run_secs or []]
        if secs and max(secs) < _FAILED_RUN_SECS:
            ms = sum(secs) / len(secs) * 1e3
            best = ms if best is None else min(best, ms)
    return best


def _target_key(target: tvm.target.Target) -> tuple:
    """What a record's target must share with the build's: kind, arch, CPU, attributes."""
    return tuning_records.target_key(target)


def _shipped_dir(name: str) -> Path | None:
    """The folder of the logs shipped with tvmq for a preset, if any."""
    try:
        folder = files("tvmq._tuning_logs") / name
    except ModuleNotFoundError:
        return None
    return Path(str(folder)) if folder.is_dir() else None


def _usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
