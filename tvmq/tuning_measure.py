"""How :func:`tvmq.tuning.tune` measures candidates: builder, runner, progress, checks.

The builder builds and links each candidate schedule (with the preset's ``cc``, and without
importing TVM's tensor intrinsics in every worker); the runner measures it here or on a board
over TVM RPC; a progress bar follows the trials. :func:`check_builder` and
:func:`make_cost_model` make what cannot work fail before any measurement, and
:func:`default_schedule_context` lets tvmq's default CPU schedule be the first candidate.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import tvm

from tvmq.errors import TvmqError
from tvmq.targets import TargetPreset
from tvmq.tuning_database import FAILED_RUN_SECS

# MetaSchedule logs every batch at INFO; tvmq's progress bar says the same more briefly.
MS_LOGGER = logging.getLogger("tvmq.tuning.metaschedule")


def one_line(err: BaseException) -> str:
    """``Type: last line of the message``: TVM errors carry pages of context above it."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}".rstrip(": ")


def make_cost_model(cost_model, num_threads: int):
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
        raise TvmqError(f"cannot create the {cost_model!r} cost model: {one_line(err)}") from err


def check_builder(task, preset: TargetPreset, rpc) -> None:
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
        built = build_candidate(task.dispatched[0], task.target, None)
        path = export_candidate(built, candidate_cc(preset, rpc))
    except TvmqError:
        raise
    except Exception as err:
        raise TvmqError(
            f"cannot build kernels for target {preset.name!r}, so nothing can be tuned: "
            f"{one_line(err)}"
        ) from err
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


# --------------------------------------------------------------------------------------
# Tuning one task


def run_one(
    context, trials, per_batch, builder, runner, database, cost_model, tracker, callbacks_for=None
) -> None:
    """Tune one task for ``trials`` candidates, sharing builder, runner and cost model.

    ``callbacks_for(context, tracker)`` replaces the measure callbacks (database, cost model,
    progress): an offline round keeps the built candidates instead.
    """
    from tvm.s_tir import meta_schedule as ms

    if callbacks_for is not None:
        callbacks = callbacks_for(context, tracker)
    else:
        callbacks = [
            *ms.measure_callback.MeasureCallback.create("default"),
            _ProgressCallback(tracker),
        ]
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


def default_schedule_context(task, num_threads: int):
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
        logger=MS_LOGGER,
        num_threads=num_threads,
    ).clone()


class Progress:
    """The tqdm bar's state: trials done and each task's best latency."""

    def __init__(self, bar, reports: list) -> None:
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
        """Feeds each measured batch to a :class:`Progress` (after AddToDatabase saved it)."""

        def __init__(self, tracker: Progress) -> None:
            self.tracker = tracker

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, results):
            secs, errors = [], []
            for built, result in zip(builder_results, results, strict=False):
                values = [float(s) for s in result.run_secs or []]
                ok = result.error_msg is None and values and max(values) < FAILED_RUN_SECS
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


def _ProgressCallback(tracker: Progress):  # noqa: N802 - stands for the lazily made class
    """A MeasureCallback updating ``tracker``."""
    global _PROGRESS_CALLBACK_CLASS
    if _PROGRESS_CALLBACK_CLASS is None:
        _PROGRESS_CALLBACK_CLASS = _make_progress_callback()
    return _PROGRESS_CALLBACK_CLASS(tracker)


_PROGRESS_CALLBACK_CLASS = None


def progress_bar(total: int, name: str, enabled: bool):
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


def make_builder(preset: TargetPreset, rpc):
    """A LocalBuilder that does not import TVM's tensor intrinsics in each worker.

    MetaSchedule's default build function imports ``tvm.s_tir.tensor_intrin`` (about 35 s,
    mostly CUDA intrinsics) in every worker, so with its 30 s timeout every build can fail.
    Candidates are scheduled before they are built, so the worker needs no intrinsics.
    """
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(
        f_build=build_candidate,
        f_export=functools.partial(export_candidate, cc=candidate_cc(preset, rpc)),
        timeout_sec=120,
        max_workers=usable_cpus(),
    )


def candidate_cc(preset: TargetPreset, rpc) -> str | None:
    """The compiler that links candidates: the preset's ``cc``, or TVM's default."""
    from tvmq.toolchain import find_compiler as _find_compiler

    if preset.cc is not None:
        return _find_compiler(preset.cc, preset.name)
    if rpc is not None and preset.is_cross_compiled:
        raise TvmqError(f"target {preset.name!r} is cross-compiled but its preset has no cc")
    return None


def make_runner(rpc):
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

    from tvmq.tuning_offline import random_argument

    rng = np.random.default_rng(0)

    def fill(tensor) -> None:
        shape = tuple(int(d) for d in tensor.shape)
        tensor.copyfrom(random_argument(str(tensor.dtype), shape, rng))

    return alloc_argument_common(fill, device, args_info, alloc_repeat)


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params) -> Any:
    """Build one scheduled candidate (runs in a builder worker)."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.compile(mod, target=target)


def export_candidate(mod, cc: str | None) -> str:
    """Link a built candidate as a ``.so`` with ``cc`` (runs in a builder worker)."""
    path = os.path.join(tempfile.mkdtemp(prefix="tvmq-tune-"), "candidate.so")
    if cc is None:
        mod.export_library(path)
    else:
        mod.export_library(path, cc=cc)
    return path


def tuning_target(preset: TargetPreset, rpc) -> tvm.target.Target:
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
    return tvm.target.Target({**target.export(), "num-cores": usable_cpus()})


def register_intrinsics(preset: TargetPreset) -> None:
    """Register tvmq's tensor intrinsics the search space may tensorize with."""
    if "avx512vnni" in preset.features:
        import tvmq.kernels.vnni_intrin  # noqa: F401


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
