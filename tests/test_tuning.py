"""MetaSchedule tuning: tune, resume after an interrupt, apply the records at build time."""

import json
import shutil

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir import dlight as dl

import tvmq.tuning
from tvmq.build import BuildInfo, build, build_with_info, fuse_to_tir
from tvmq.cpu_schedule import CPUDefaultSchedule
from tvmq.errors import TvmqError
from tvmq.targets import get_target
from tvmq.tuning import RECORD_FILE, WORKLOAD_FILE, open_tuning_logs, tune

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
    original = tvmq.tuning._Progress.update

    def interrupt_after_first_batch(self, run_secs):
        original(self, run_secs)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tvmq.tuning._Progress, "update", interrupt_after_first_batch)
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

    monkeypatch.setattr(tvmq.tuning, "_run_one", fail)
    report = tune(_tiny_model(), "host", work_dir=tmp_path / "host", trials=2, progress=False)
    [task] = report.tasks
    assert task.best_ms is None and "prim.Broadcast" in task.error
    assert "not tuned: RuntimeError" in report.summary()


def test_hand_scheduled_kernels_are_not_tasks():
    # An int8 matmul becomes tvmq's VNNI kernel (tirx.is_scheduled): nothing to tune there.
    x = relax.Var("x", relax.TensorType((8, 64), "uint8"))
    w = np.random.default_rng(5).integers(-127, 128, (64, 48), dtype=np.int8)
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.matmul(x, relax.const(w), out_dtype="int32"))
            out = bb.emit_output(relax.op.nn.relu(relax.op.astype(acc, "float32")))
        bb.emit_func_output(out)
    preset = get_target("host")
    fused = fuse_to_tir(bb.get(), preset)
    kernels = [
        gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    ]
    assert any(k.startswith("tvmq_int8_dense_vnni") for k in kernels)
    names = [t.task_name for t in tvmq.tuning.tunable_tasks(fused, preset.tvm_target())]
    assert names and not any("vnni" in n for n in names)
