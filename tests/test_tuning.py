"""MetaSchedule tuning: tune, resume after an interrupt, apply the records at build time."""

import base64
import json
import shutil

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir import dlight as dl

import tvmq.tuning
import tvmq.tuning_database
import tvmq.tuning_measure
from tvmq.build import BuildInfo, build, build_with_info, fuse_to_tir
from tvmq.cpu_schedule import CPUDefaultSchedule
from tvmq.errors import TvmqError
from tvmq.targets import get_target
from tvmq.tuning import (
    RECORD_FILE,
    WORKLOAD_FILE,
    TuningFailed,
    open_tuning_logs,
    repair,
    tune,
)

TRIALS = 6
BATCH = 3


def _weight(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((64, 32)).astype(np.float32)


def _tiny_model(seed: int = 0) -> tvm.IRModule:
    """relu(x @ W): one kernel to tune, with a constant weight as a real model has."""
    x = relax.Var("x", relax.TensorType((8, 64), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.matmul(x, relax.const(_weight(seed)))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _record_lines(folder) -> list[str]:
    return (folder / RECORD_FILE).read_text().splitlines()


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory):
    """A record folder: a tune interrupted after its first batch, then resumed to TRIALS.

    Yields (folder, lines after the interrupt, report of the resumed run).
    """
    work_dir = tmp_path_factory.mktemp("tuning") / "host"
    mod = _tiny_model()
    original = tvmq.tuning_measure.Progress.update

    def interrupt_after_first_batch(self, run_secs):
        original(self, run_secs)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tvmq.tuning_measure.Progress, "update", interrupt_after_first_batch)
        with pytest.raises(KeyboardInterrupt):
            tune(
                mod,
                "host",
                work_dir=work_dir,
                trials=TRIALS,
                trials_per_batch=BATCH,
                seed=0,
                measure_default=False,  # only searched schedules: they must change the kernel
            )
    after_interrupt = _record_lines(work_dir)
    report = tune(
        mod, "host", work_dir=work_dir, trials=TRIALS, trials_per_batch=BATCH, progress=False
    )
    return work_dir, after_interrupt, report


@pytest.mark.slow
@pytest.mark.tuning
def test_interrupted_tune_keeps_its_records_and_resumes(tuned_dir):
    work_dir, after_interrupt, report = tuned_dir
    # The first batch was saved before the interrupt (the database appends per record).
    assert len(after_interrupt) == BATCH
    assert (work_dir / WORKLOAD_FILE).is_file()
    lines = _record_lines(work_dir)
    assert lines[: len(after_interrupt)] == after_interrupt  # earlier records kept as they were
    [task] = report.tasks
    assert task.trials == len(lines) == TRIALS  # earlier records counted against the budget
    assert task.new_trials == TRIALS - BATCH
    assert task.best_ms is not None and task.best_ms > 0
    assert report.tuned == 1 and "1/1 kernels tuned" in report.summary()

    # A third run finds the budget spent: nothing is measured, nothing is written.
    again = tune(_tiny_model(), "host", work_dir=work_dir, trials=TRIALS, progress=False)
    assert again.new_trials == 0 and again.tasks[0].skipped
    assert _record_lines(work_dir) == lines


@pytest.mark.slow
@pytest.mark.tuning
def test_default_schedule_is_the_first_record(tmp_path):
    # A kernel's first candidate is tvmq's default schedule: with one trial it is the only
    # record, and building with the log gives exactly the untuned kernel, never a worse one.
    work_dir = tmp_path / "host"
    report = tune(_tiny_model(), "host", work_dir=work_dir, trials=1, progress=False)
    [task] = report.tasks
    assert task.trials == task.new_trials == 1 and task.best_ms is not None
    preset = get_target("host")
    database, _ = open_tuning_logs(work_dir, preset)
    fused = fuse_to_tir(_tiny_model(), preset)
    with preset.tvm_target(), database:
        tuned = relax.transform.MetaScheduleApplyDatabase()(fused)
    with preset.tvm_target():
        default = dl.ApplyDefaultSchedule(CPUDefaultSchedule())(fused)
    [name] = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert tvm_ffi.structural_equal(tuned[name].body, default[name].body)


@pytest.mark.slow
@pytest.mark.tuning
def test_records_change_the_kernel_and_results_stay_exact(tuned_dir):
    work_dir, _, _ = tuned_dir
    # Other weights, same shapes: records are keyed on the kernel, not on weight values.
    mod = _tiny_model(seed=1)
    preset = get_target("host")
    target = preset.tvm_target()
    database, folders = open_tuning_logs(work_dir, preset)
    assert folders == [work_dir]

    fused = fuse_to_tir(mod, preset)
    [name] = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    with target, database:
        tuned = relax.transform.MetaScheduleApplyDatabase()(fused)
    with target:
        default = dl.ApplyDefaultSchedule(CPUDefaultSchedule())(fused)
    assert tuned[name].attrs["tirx.is_scheduled"]
    assert not tvm_ffi.structural_equal(tuned[name], default[name])

    ex, info = build_with_info(mod, preset, tuning_logs=work_dir)
    assert info == BuildInfo(tuned=(name,), default=(), tuning_logs=(str(work_dir),))
    assert info.summary() == "1 tuned, 0 default"
    _, untuned_info = build_with_info(mod, preset, tuning_logs=None)
    assert untuned_info.summary() == "0 tuned, 1 default"

    vm = relax.VirtualMachine(ex, tvm.cpu())
    w = _weight(seed=1)
    rng = np.random.default_rng(2)
    for _ in range(3):
        x = rng.standard_normal((8, 64)).astype(np.float32)
        out = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(out, np.maximum(x @ w, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.tuning
def test_records_for_another_cpu_are_not_applied(tuned_dir, tmp_path):
    work_dir, _, _ = tuned_dir
    # The records were tuned for this machine's CPU ("host"); x86-avx2 is a Haswell.
    _, info = build_with_info(_tiny_model(), "x86-avx2", tuning_logs=work_dir)
    assert info.tuned == () and len(info.default) == 1

    # "auto" finds ./tuning_logs/<preset>/ in the current directory.
    folder = tmp_path / "tuning_logs" / "host"
    shutil.copytree(work_dir, folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        _, info = build_with_info(_tiny_model(), "host", tuning_logs="auto")
    assert len(info.tuned) == 1 and str(folder) in info.tuning_logs


def test_no_logs_means_no_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_tuning_logs(None, "host") == (None, [])
    # rasp4b ships no logs and ./tuning_logs does not exist.
    assert open_tuning_logs("auto", "rasp4b") == (None, [])
    with pytest.raises(TvmqError, match="not a tuning log folder"):
        open_tuning_logs(tmp_path / "missing", "host")


def test_plain_build_reports_default_kernels():
    ex, info = build_with_info(_tiny_model(), "host", tuning_logs=None)
    assert info.tuned == () and len(info.default) == 1
    assert json.loads(json.dumps(info.to_json()))["default"] == list(info.default)
    assert isinstance(build(_tiny_model(), "host"), type(ex))


def test_bad_budget_is_an_error(tmp_path):
    with pytest.raises(TvmqError, match="positive"):
        tune(_tiny_model(), "host", work_dir=tmp_path, trials=0)


def test_a_kernel_metaschedule_cannot_tune_is_reported_and_skipped(tmp_path, monkeypatch):
    # e.g. TVM 0.27's flop estimator has no rule for some vector expressions.
    def fail(context, *args):
        raise RuntimeError("InternalError: Do not have a default for prim.Broadcast")

    monkeypatch.setattr(tvmq.tuning_measure, "run_one", fail)
    # The only kernel failed: the run tuned nothing, which is an error, not a report.
    with pytest.raises(TuningFailed, match="all 1 kernel.* failed.*prim.Broadcast") as failed:
        tune(_tiny_model(), "host", work_dir=tmp_path / "host", trials=2, progress=False)
    report = failed.value.report
    [task] = report.tasks
    assert task.best_ms is None and "prim.Broadcast" in task.error
    assert "not tuned: RuntimeError" in report.summary()
    assert report.tuned == 0 and "kernels tuned" not in report.summary()
    assert "no kernel tuned" in report.summary()


def test_hand_scheduled_kernels_are_not_tasks():
    # An int8 matmul becomes tvmq's VNNI kernel (tirx.is_scheduled): nothing to tune there.
    # Compiled for the VNNI preset, not "host": nothing runs, and an AVX2-only host has no
    # VNNI kernel to find.
    x = relax.Var("x", relax.TensorType((8, 64), "uint8"))
    w = np.random.default_rng(5).integers(-127, 128, (64, 48), dtype=np.int8)
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.matmul(x, relax.const(w), out_dtype="int32"))
            out = bb.emit_output(relax.op.nn.relu(relax.op.astype(acc, "float32")))
        bb.emit_func_output(out)
    preset = get_target("x86-avx512-vnni")
    fused = fuse_to_tir(bb.get(), preset)
    kernels = [
        gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    ]
    assert any(k.startswith("tvmq_int8_dense_vnni") for k in kernels)
    names = [t.task_name for t in tvmq.tuning.tunable_tasks(fused, preset.tvm_target())]
    assert names and not any("vnni" in n for n in names)


# --------------------------------------------------------------------------------------
# Damaged record folders, up-front failures, honest reports


def _copy(folder, tmp_path):
    copy = tmp_path / "records"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(".tvmq-tune.lock"))
    return copy


def _tear_last_line(folder) -> None:
    """What a crash or a full disk leaves: half of a last record line, no newline."""
    path = folder / RECORD_FILE
    last = path.read_text().splitlines()[-1]
    with open(path, "a") as f:
        f.write(last[: len(last) // 2])


@pytest.mark.slow
@pytest.mark.tuning
def test_a_torn_line_is_skipped_at_build_refused_by_tune_and_repaired(tuned_dir, tmp_path, caplog):
    folder = _copy(tuned_dir[0], tmp_path)
    _tear_last_line(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    with caplog.at_level("WARNING", logger="tvmq"):
        database, _ = open_tuning_logs(folder, "host")
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(folder) in warning and "1 damaged" in warning
    assert f"tvmq tune --repair --work-dir {folder}" in warning
    assert len(database.get_all_tuning_records()) == 1  # the kernel's fastest record

    with pytest.raises(TvmqError, match="1 damaged line.*tvmq tune --repair"):
        tune(_tiny_model(), "host", work_dir=folder, trials=TRIALS + 2, progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing appended

    report = repair(folder)
    assert (report.records_kept, report.records_dropped) == (TRIALS, 1)
    assert report.rewritten and "dropped 1 records" in report.summary()
    assert (folder / (RECORD_FILE + ".bak")).read_bytes() == before[RECORD_FILE]
    assert _record_lines(folder) == _record_lines(tuned_dir[0])  # the good lines, unchanged
    # MetaSchedule's own reader accepts it again, and a resumed tune finds its budget spent.
    from tvm.s_tir import meta_schedule as ms

    assert len(ms.database.JSONDatabase(work_dir=str(folder), allow_missing=False)) == TRIALS
    again = tune(_tiny_model(), "host", work_dir=folder, trials=TRIALS, progress=False)
    assert again.tasks[0].skipped and again.tasks[0].trials == TRIALS
    assert repair(folder).rewritten is False


@pytest.mark.slow
@pytest.mark.tuning
def test_records_on_a_missing_or_wrong_kernel_are_dropped(tuned_dir, tmp_path, caplog):
    folder = _copy(tuned_dir[0], tmp_path)
    record = _record_lines(folder)[0]
    assert record.startswith("[0,")
    # A kernel of another model (from the logs shipped with tvmq) and a record of ours
    # pointing at it (as two writers on one folder made), and one at a kernel not there.
    shipped = tvmq.tuning_database.shipped_dir("x86-avx512-vnni")
    # A kernel with no matmul block, so that our matmul's trace cannot replay on it.
    foreign = next(
        line
        for line in (shipped / WORKLOAD_FILE).read_text().splitlines()
        if b'"matmul"' not in base64.b64decode(json.loads(line)[1])
    )
    with open(folder / WORKLOAD_FILE, "a") as f:
        f.write(foreign + "\n")
    with open(folder / RECORD_FILE, "a") as f:
        f.write("[1," + record[3:] + "\n")
        f.write("[7," + record[3:] + "\n")

    with caplog.at_level("WARNING", logger="tvmq"):
        database, _ = open_tuning_logs(folder, "host")
    # Index 7 points nowhere; the record on kernel 1 does not replay on it.
    assert database is not None and f"{folder}: skipped 2 damaged" in caplog.text
    with pytest.raises(TvmqError, match="damaged"):
        tune(_tiny_model(), "host", work_dir=folder, trials=TRIALS + 2, progress=False)

    report = repair(folder)
    assert (report.records_kept, report.records_dropped) == (TRIALS, 2)
    assert (report.workloads_kept, report.workloads_dropped) == (1, 1)
    assert _record_lines(folder) == _record_lines(tuned_dir[0])
    assert (folder / WORKLOAD_FILE).read_text() == (tuned_dir[0] / WORKLOAD_FILE).read_text()


@pytest.mark.slow
@pytest.mark.tuning
def test_the_build_reader_picks_the_record_metaschedule_would(tuned_dir):
    from tvm.s_tir import meta_schedule as ms

    folder = tuned_dir[0]
    database, _ = open_tuning_logs(folder, "host")
    [ours] = database.get_all_tuning_records()
    theirs = ms.database.JSONDatabase(work_dir=str(folder), allow_missing=False)
    [workload] = {r.workload for r in theirs.get_all_tuning_records()}
    [best] = theirs.get_top_k(workload, 1)
    assert json.dumps(ours.as_json()) == json.dumps(best.as_json())


def test_a_missing_cost_model_package_fails_before_anything(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "xgboost", None)  # import xgboost raises ImportError
    with pytest.raises(TvmqError, match="xgboost.*--cost-model random"):
        tune(_tiny_model(), "host", work_dir=tmp_path / "host", trials=2, cost_model="xgb")
    assert not (tmp_path / "host").exists()


def test_a_builder_that_cannot_build_fails_before_anything(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("cannot find the linker")

    monkeypatch.setattr(tvmq.tuning_measure, "build_candidate", broken)
    with pytest.raises(TvmqError, match="cannot build kernels.*cannot find the linker"):
        tune(_tiny_model(), "host", work_dir=tmp_path / "host", trials=2, cost_model="random")
    assert not (tmp_path / "host").exists()


def test_a_kernel_whose_candidates_all_failed_is_not_counted_as_tuned():
    from pathlib import Path

    from tvmq.tuning import TaskReport, TuneReport

    failed = TaskReport("fused_matmul", 2, 2, None, failed_trials=2, failure="LLVM ERROR: x")
    ok = TaskReport("fused_add", 3, 3, 0.5, failed_trials=1)
    report = TuneReport("host", Path("d"), [failed, ok], planned_trials=5)
    assert failed.failed and not ok.failed and report.tuned == 1
    summary = report.summary()
    assert "1/2 kernels tuned" in summary and "5 new trials (3 failed)" in summary
    assert "not tuned: every candidate failed: LLVM ERROR: x" in summary
    assert "1 kernel(s) failed" in summary
    report.tasks = [failed]
    assert "no kernel tuned" in report.summary() and "kernels tuned" not in report.summary()
    assert "fused_matmul" in str(TuningFailed(report))
