"""Bad tuning folders: damaged records, two writers, a file as --work-dir, a tune that tunes nothing.

The record folder used is a copy of the logs shipped for ``x86-avx512-vnni`` (real
MetaSchedule records); the model is a tiny Linear+ReLU saved with ``torch.export``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import tvmq.tuning
import tvmq.tuning_database
import tvmq.tuning_measure
from tvmq.tuning import RECORD_FILE, WORKLOAD_FILE
from tvmq.tuning_lock import LOCK_FILE, writer_lock

TARGET = "x86-avx512-vnni"  # a fixed CPU: the shipped records apply on any machine


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """relu(x @ W.T + b) for x of shape [4, 32], saved with torch.export."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU()).eval()
    path = tmp_path_factory.mktemp("model") / "m.pt2"
    torch.export.save(torch.export.export(module, (torch.zeros(4, 32),)), path)
    return path


@pytest.fixture
def records(tmp_path):
    """A writable copy of a real record folder."""
    folder = tmp_path / "records"
    shutil.copytree(tvmq.tuning_database.shipped_dir(TARGET), folder)
    return folder


def _lines(path) -> list[str]:
    return path.read_text().splitlines()


def _compile(cli, model_file, folder, out):
    return cli(["compile", model_file, "-t", TARGET, "-o", out, "--tuning-logs", folder])


@pytest.mark.slow
def test_torn_last_line_compile_warns_tune_refuses_repair_fixes(
    cli, expect_user_error, model_file, records, tmp_path, caplog
):
    good = _lines(records / RECORD_FILE)
    with open(records / RECORD_FILE, "a") as f:
        f.write(good[-1][:200])  # a crash mid-write: half a line, no newline

    # The warning is a logging record (stderr through logging's last-resort handler in the
    # CLI; pytest's log capture takes it here).
    with caplog.at_level("WARNING", logger="tvmq"):
        status, out, err = _compile(cli, model_file, records, tmp_path / "out")
    assert status == 0 and "Traceback" not in err, err
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{records}: skipped 1 damaged" in warning
    assert f"tvmq tune --repair --work-dir {records}" in warning
    assert (tmp_path / "out" / "model.so").is_file()

    tune = ["tune", model_file, "-t", TARGET, "--work-dir", records, "--trials", "1"]
    expect_user_error(tune, watch=[records], contains="--repair")

    status, out, err = cli(["tune", "--repair", "--work-dir", records])
    assert status == 0, err
    assert f"kept {len(good)} records" in out and "dropped 1 records" in out
    assert _lines(records / RECORD_FILE) == good
    assert (records / (RECORD_FILE + ".bak")).is_file()

    caplog.clear()
    with caplog.at_level("WARNING", logger="tvmq"):
        status, _, err = _compile(cli, model_file, records, tmp_path / "out2")
    assert status == 0 and not [r for r in caplog.records if r.levelname == "WARNING"]


def test_records_pointing_at_a_missing_kernel(cli, expect_user_error, model_file, records):
    good = _lines(records / RECORD_FILE)
    kernels = len(_lines(records / WORKLOAD_FILE))
    index, rest = good[0][1:].split(",", 1)
    with open(records / RECORD_FILE, "a") as f:
        f.write(f"[{kernels + 3},{rest}\n")

    tune = ["tune", model_file, "-t", TARGET, "--work-dir", records, "--trials", "1"]
    expect_user_error(tune, watch=[records], contains="1 damaged line")

    status, out, err = cli(["tune", "--repair", "--work-dir", records])
    assert status == 0, err
    assert f"kept {len(good)} records" in out and "dropped 1 records" in out
    assert _lines(records / RECORD_FILE) == good


def _hold_lock_in_another_process(folder):
    """A process that takes the folder's write lock like a running tune, and sleeps."""
    code = textwrap.dedent(
        f"""
        import fcntl, os, sys, time
        fd = os.open({str(folder / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_gets_one_line_and_a_dead_ones_lock_does_not_block(
    expect_user_error, model_file, records
):
    holder = _hold_lock_in_another_process(records)
    try:
        tune = ["tune", model_file, "-t", TARGET, "--work-dir", records, "--trials", "1"]
        expect_user_error(
            tune,
            watch=[records],
            contains=f"is being tuned by another tvmq process (pid {holder.pid}); wait",
        )
        expect_user_error(
            ["tune", "--repair", "--work-dir", records], watch=[records], contains="pid"
        )
    finally:
        holder.kill()
        holder.wait()
    # Killed: the kernel dropped its lock; the file with its pid is left and harmless.
    assert (records / LOCK_FILE).read_text() == str(holder.pid)
    with writer_lock(records):
        assert (records / LOCK_FILE).read_text().strip() == str(os.getpid())
        fd = os.open(records / LOCK_FILE, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # held while the block runs
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_work_dir_that_is_a_file(expect_user_error, model_file, tmp_path, where):
    afile = tmp_path / "notes.txt"
    afile.write_text("not a folder\n")
    work_dir = afile if where == "file" else afile / "host"
    tune = ["tune", model_file, "--work-dir", work_dir, "--trials", "1"]
    expect_user_error(tune, watch=[tmp_path], contains=f"{afile} is a file, not a folder")
    expect_user_error(
        ["tune", "--repair", "--work-dir", work_dir], watch=[tmp_path], contains="is a file"
    )


def test_a_foreign_folder_is_not_tuned_into(expect_user_error, model_file, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / WORKLOAD_FILE).write_text('{"name": "my own json"}\n')
    tune = ["tune", model_file, "--work-dir", folder, "--trials", "1"]
    expect_user_error(tune, watch=[tmp_path], contains="not a MetaSchedule tuning record folder")
    expect_user_error(
        ["tune", "--repair", "--work-dir", tmp_path / "nothing-here"],
        watch=[tmp_path],
        contains="not a tuning record folder",
    )


def test_repair_takes_no_model(expect_user_error, model_file, tmp_path):
    expect_user_error(["tune", model_file, "--repair"], watch=[tmp_path], contains="--repair")
    expect_user_error(["tune"], watch=[tmp_path], contains="model file")


def test_missing_xgboost_fails_before_any_kernel(
    expect_user_error, model_file, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "xgboost", None)  # import xgboost raises ImportError
    tune = ["tune", model_file, "--work-dir", tmp_path / "host", "--trials", "2"]
    expect_user_error(tune, watch=[tmp_path], contains="xgboost")
    assert not (tmp_path / "host").exists()


@pytest.mark.slow
def test_a_tune_that_tuned_nothing_exits_2(cli, model_file, tmp_path, monkeypatch):
    def fail(context, *args):
        raise RuntimeError("InternalError: Do not have a default for prim.Broadcast")

    monkeypatch.setattr(tvmq.tuning_measure, "run_one", fail)
    work_dir = tmp_path / "host"
    status, out, err = cli(["tune", model_file, "--work-dir", work_dir, "--trials", "2"])
    [line] = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and line.startswith("tvmq: error: tuning failed: all 1 kernel(s)")
    assert "prim.Broadcast" in line and "Traceback" not in err
    assert "kernels tuned" not in out and "no kernel tuned" in out
