"""tvmq.output: tvmq replaces only its own files, atomically, and recovers from crashes.

Builds here are fakes (a manifest and a few bytes of "library"), so each test runs in
milliseconds; tests/bad_inputs/test_output_folders.py does the same through the CLI.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import tvmq.output as output
from tvmq.errors import TvmqError
from tvmq.manifest import FORMAT
from tvmq.output import (
    OutputFolder,
    build_files,
    inspect_folder,
    recover,
    swap_dirs,
)
from tvmq.output_file import check_output_file, write_file_atomically

DEAD_PID = 99999999  # above Linux's pid_max: never a live process


def write_build(folder: Path, tag: str, files: list[str] | None = None) -> None:
    """A fake tvmq build: model.so holding ``tag`` and a manifest listing its files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.so").write_text(f"lib {tag}")
    manifest = {"format": FORMAT, "library": {"file": "model.so"}, "tag": tag}
    if files is not None:
        manifest["files"] = files
    (folder / "model.json").write_text(json.dumps(manifest))


def stage_build(folder: OutputFolder, tag: str) -> None:
    with folder.stage() as stage:
        write_build(stage, tag, ["model.json", "model.so"])


def tag_of(folder: Path) -> str:
    return json.loads((folder / "model.json").read_text())["tag"]


def test_only_a_tvmq_manifest_makes_a_build(tmp_path):
    (tmp_path / "model.json").write_text('{"name": "my-npm-package"}')
    assert build_files(tmp_path) is None
    (tmp_path / "model.json").write_text("not json")
    assert build_files(tmp_path) is None
    write_build(tmp_path, "a")  # an old manifest without "files"
    assert build_files(tmp_path) == ["model.json", "model.so"]
    write_build(tmp_path, "a", ["model.json", "model.so", "extra.bin"])
    assert build_files(tmp_path) == ["extra.bin", "model.json", "model.so"]


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs", "..", ""])
def test_a_file_list_reaching_outside_is_no_build(tmp_path, bad):
    write_build(tmp_path, "a", ["model.json", bad])
    assert build_files(tmp_path) is None


def test_foreign_model_json_folder_is_refused_and_untouched(tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "model.json").write_text('{"layers": 3}')
    (out / "train.py").write_text("print(1)")
    with pytest.raises(TvmqError, match="model.json is not a tvmq manifest"):
        OutputFolder.open(out)
    assert sorted(os.listdir(out)) == ["model.json", "train.py"]


def test_new_folder_is_renamed_into_place(tmp_path):
    out = tmp_path / "a" / "b" / "build"
    stage_build(OutputFolder.open(out), "new")
    assert tag_of(out) == "new"
    assert sorted(os.listdir(out)) == ["model.json", "model.so"]
    assert os.listdir(out.parent) == ["build"]  # no staging folder left


def test_pure_build_is_swapped_whole_and_keeps_its_mode(tmp_path):
    out = tmp_path / "build"
    write_build(out, "old")
    os.chmod(out, 0o750)
    inode = out.stat().st_ino
    stage_build(OutputFolder.open(out), "new")
    assert tag_of(out) == "new"
    assert out.stat().st_ino != inode  # a folder swap, not files moved in
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert os.listdir(tmp_path) == ["build"]


def test_swap_without_renameat2_uses_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    out = tmp_path / "build"
    write_build(out, "old")
    stage_build(OutputFolder.open(out), "new")
    assert tag_of(out) == "new"
    assert os.listdir(tmp_path) == ["build"]


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_build(a, "A")
    write_build(b, "B")
    swap_dirs(a, b)
    assert (tag_of(a), tag_of(b)) == ("B", "A")


def test_build_with_user_files_replaces_only_tvmq_files(tmp_path):
    out = tmp_path / "build"
    write_build(out, "old", ["model.json", "model.so", "stale.bin"])
    (out / "stale.bin").write_text("tvmq wrote this once")
    (out / "model.onnx").write_bytes(b"\x08\x07onnx")
    (out / "inputs.npz").write_bytes(b"PK\x03\x04data")
    inode = out.stat().st_ino
    stage_build(OutputFolder.open(out), "new")
    assert tag_of(out) == "new"
    assert out.stat().st_ino == inode  # the user's folder itself stays
    assert sorted(os.listdir(out)) == ["inputs.npz", "model.json", "model.onnx", "model.so"]
    assert (out / "model.onnx").read_bytes() == b"\x08\x07onnx"
    assert (out / "inputs.npz").read_bytes() == b"PK\x03\x04data"


def test_working_directory_is_written_in_place(tmp_path, monkeypatch):
    write_build(tmp_path, "old")
    monkeypatch.chdir(tmp_path)
    stage_build(OutputFolder.open("."), "new")
    assert tag_of(tmp_path) == "new"
    assert os.path.samefile(os.getcwd(), tmp_path)  # the shell's folder was not replaced
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.so"]


def test_empty_folder_is_filled_in_place(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    inode = out.stat().st_ino
    stage_build(OutputFolder.open(out), "new")
    assert out.stat().st_ino == inode and tag_of(out) == "new"


def test_overwrite_false_refuses_a_build(tmp_path):
    write_build(tmp_path / "b", "old")
    with pytest.raises(TvmqError, match="already holds a compiled model"):
        OutputFolder.open(tmp_path / "b", overwrite=False)


def test_user_file_appearing_during_the_build_is_kept(tmp_path):
    out = tmp_path / "build"
    write_build(out, "old")
    folder = OutputFolder.open(out)
    with folder.stage() as stage:
        write_build(stage, "new", ["model.json", "model.so"])
        (out / "notes.txt").write_text("written while tvmq compiled")
    assert tag_of(out) == "new"
    assert (out / "notes.txt").read_text() == "written while tvmq compiled"


def test_failed_write_leaves_folder_as_it_was(tmp_path):
    out = tmp_path / "build"
    write_build(out, "old")
    (out / "mine.txt").write_text("x")
    with pytest.raises(RuntimeError, match="linker"), OutputFolder.open(out).stage() as stage:
        (stage / "model.so").write_text("half")
        raise RuntimeError("linker exploded")
    assert tag_of(out) == "old"
    assert sorted(os.listdir(out)) == ["mine.txt", "model.json", "model.so"]
    assert os.listdir(tmp_path) == ["build"]


def test_error_between_the_two_renames_puts_the_old_build_back(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    out = tmp_path / "build"
    write_build(out, "old")
    real_rename = Path.rename
    calls = []

    def second_rename_fails(self, target):
        calls.append(self)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", second_rename_fails)
    with pytest.raises(TvmqError, match="writing the build failed"):
        stage_build(OutputFolder.open(out), "new")
    assert tag_of(out) == "old"
    assert os.listdir(tmp_path) == ["build"]


def test_folders_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "new" / "build"
        stage_build(OutputFolder.open(out), "new")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o750


# --------------------------------------------------------------------------------------
# Recovery from killed runs


def test_dead_runs_temp_folders_are_removed(tmp_path):
    out = tmp_path / "build"
    write_build(out, "old")
    (tmp_path / f".build.tmp-{DEAD_PID}").mkdir()
    (tmp_path / f".build.tmp-{DEAD_PID}-abcd1234" / "x").mkdir(parents=True)
    (out / f".tvmq-tmp-{DEAD_PID}-00ff").mkdir()
    live = tmp_path / f".build.tmp-{os.getpid()}-00000000"  # a concurrent run's: kept
    live.mkdir()
    (tmp_path / ".other.tmp-99999999").mkdir()  # another output's: not ours to judge
    recover(out)
    assert sorted(os.listdir(tmp_path)) == sorted(["build", live.name, ".other.tmp-99999999"])
    assert sorted(os.listdir(out)) == ["model.json", "model.so"]


def test_old_build_is_restored_when_output_went_missing(tmp_path):
    out = tmp_path / "build"
    write_build(tmp_path / f".build.old-{DEAD_PID}", "old")
    write_build(tmp_path / f".build.tmp-{DEAD_PID}-0a0a", "new")
    recover(out)
    assert tag_of(out) == "old"
    assert os.listdir(tmp_path) == ["build"]


def test_cut_short_per_file_commit_is_finished(tmp_path):
    out = tmp_path / "build"
    write_build(out, "old")
    (out / "mine.txt").write_text("x")
    stage = out / f".tvmq-tmp-{DEAD_PID}-1234"
    write_build(stage, "new", ["model.json", "model.so"])
    os.replace(stage / "model.so", out / "model.so")  # killed before model.json moved
    recover(out)
    assert tag_of(out) == "new" and (out / "model.so").read_text() == "lib new"
    assert sorted(os.listdir(out)) == ["mine.txt", "model.json", "model.so"]


def test_kill_between_the_two_renames_is_recovered(tmp_path):
    """A real crash: a child process dies (os._exit) right after the first rename."""
    out = tmp_path / "build"
    write_build(out, "old")
    child = f"""
import os, sys
from pathlib import Path
import tvmq.output as output
output._exchange = lambda a, b: False
real = Path.rename
def rename(self, target):
    result = real(self, target)
    if Path(target).name.startswith(".build.old-"):
        os._exit(9)
    return result
Path.rename = rename
folder = output.OutputFolder.open({str(out)!r})
with folder.stage() as stage:
    (stage / "model.so").write_text("lib new")
    (stage / "model.json").write_text('{{"format": "{FORMAT}", "library": {{}}, "tag": "new"}}')
"""
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    assert not out.exists()  # the crash window this guards against
    assert any(n.startswith(".build.old-") for n in os.listdir(tmp_path))
    OutputFolder.open(out)  # the next compile to the same -o
    assert tag_of(out) == "old"
    assert os.listdir(tmp_path) == ["build"]


# --------------------------------------------------------------------------------------
# Single files


def test_file_write_is_atomic_and_leaves_no_temp(tmp_path):
    target = tmp_path / "y.npz"
    write_file_atomically(target, lambda f: f.write(b"PK\x03\x04new"))
    assert target.read_bytes() == b"PK\x03\x04new"

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    (tmp_path / f".y.npz.tmp-{DEAD_PID}-0123abcd").write_bytes(b"killed mid-write")
    with pytest.raises(TvmqError, match="No space left"):
        write_file_atomically(target, fail)
    assert target.read_bytes() == b"PK\x03\x04new"
    assert os.listdir(tmp_path) == ["y.npz"]


def test_output_file_checks(tmp_path):
    with pytest.raises(TvmqError, match="is a directory"):
        check_output_file(tmp_path)
    with pytest.raises(TvmqError, match="does not exist"):
        check_output_file(tmp_path / "nope" / "y.npz")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(TvmqError, match="not a .npz file"):
        check_output_file(tmp_path / "model.onnx")
    assert check_output_file(tmp_path / "new.npz") == tmp_path / "new.npz"


def test_inspect_folder_separates_users_files(tmp_path):
    write_build(tmp_path, "a")
    (tmp_path / "data.csv").write_text("1")
    state = inspect_folder(tmp_path)
    assert state.build == ["model.json", "model.so"] and state.others == ["data.csv"]
    assert not state.only_build


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's")
def test_renameat2_is_found_on_linux(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "A").touch()
    assert output._exchange(tmp_path / "a", tmp_path / "b")  # one step, no fallback
    assert os.listdir(tmp_path / "b") == ["A"]
