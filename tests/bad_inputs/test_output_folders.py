"""Output folders and files: tvmq never loses a user's file when it writes ``-o``."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch

import tvmq.output


@pytest.fixture
def model_file(tmp_path, small_mlp):
    """A .pt2 of the session's small MLP for batch 2 (the shape of ``compiled_mlp_dir``)."""
    path = tmp_path / "src" / "m.pt2"
    path.parent.mkdir()
    torch.export.save(torch.export.export(small_mlp, (torch.zeros(2, 32),)), path)
    return path


def old_build(compiled_mlp_dir, where):
    """A copy of the session's build at ``where``, as a previous compile left it."""
    shutil.copytree(compiled_mlp_dir, where)
    return where


def build_of(folder) -> dict:
    return json.loads((folder / "model.json").read_text())


def test_dot_in_a_project_with_a_foreign_model_json_is_refused(
    expect_user_error, model_file, monkeypatch
):
    project = model_file.parent
    (project / "model.json").write_text('{"name": "my-model", "layers": [784, 128, 10]}')
    (project / "train.py").write_text("import torch\n")
    monkeypatch.chdir(project)
    expect_user_error(
        ["compile", "m.pt2", "-o", "."],
        watch=[project.parent],
        contains="model.json is not a tvmq manifest",
    )


def test_folder_of_sources_without_manifest_is_refused(expect_user_error, model_file):
    expect_user_error(
        ["compile", model_file, "-o", model_file.parent],
        watch=[model_file.parent.parent],
        contains="not a tvmq output",
    )


def test_output_that_is_a_file_is_refused(expect_user_error, model_file):
    expect_user_error(
        ["compile", model_file, "-o", model_file],
        watch=[model_file.parent.parent],
        contains="not a directory",
    )


def test_rebuild_keeps_the_sources_and_inputs_beside_the_build(
    cli, model_file, compiled_mlp_dir, tmp_path
):
    out = old_build(compiled_mlp_dir, tmp_path / "build")
    shutil.copy(model_file, out / "m.pt2")
    np.savez(out / "inputs.npz", x=np.ones((2, 32), np.float32))
    (tmp_path / ".build.tmp-99999999").mkdir()  # a killed compile's leftover
    users = {n: (out / n).read_bytes() for n in ("m.pt2", "inputs.npz")}
    marked = build_of(out) | {"previous": True}  # still a tvmq manifest, now recognisable
    (out / "model.json").write_text(json.dumps(marked))

    status, stdout, err = cli(["compile", out / "m.pt2", "-o", out, "--no-tuning-logs"])

    assert status == 0, err
    assert {n: (out / n).read_bytes() for n in users} == users
    assert sorted(os.listdir(out)) == ["inputs.npz", "m.pt2", "model.json", "model.so"]
    manifest = build_of(out)
    assert "previous" not in manifest and manifest["files"] == ["model.json", "model.so"]
    assert sorted(os.listdir(tmp_path)) == ["build", "src"]  # leftover gone, none new
    status, stdout, err = cli(["run", out, "-i", out / "inputs.npz"])
    assert status == 0 and "output0: shape (2, 10)" in stdout, err


def test_failed_swap_keeps_the_old_build_byte_identical(
    expect_user_error, model_file, compiled_mlp_dir, tmp_path, monkeypatch
):
    out = old_build(compiled_mlp_dir, tmp_path / "build")

    def disk_full(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tvmq.output, "swap_dirs", disk_full)
    expect_user_error(
        ["compile", model_file, "-o", out, "--no-tuning-logs"],
        watch=[tmp_path],
        contains="No space left on device",
    )


def test_killed_swap_is_recovered_by_the_next_compile(cli, model_file, compiled_mlp_dir, tmp_path):
    # What a compile killed between the fallback's two renames leaves: no build at -o,
    # the old one hidden as .build.old-PID, the new one complete in .build.tmp-PID-*.
    out = tmp_path / "build"
    old_build(compiled_mlp_dir, tmp_path / ".build.old-99999999")
    old_build(compiled_mlp_dir, tmp_path / ".build.tmp-99999999-0abc")
    (tmp_path / ".build.old-99999999" / "notes.txt").write_text("kept with the build")

    tvmq.output.OutputFolder.open(out)  # what compile does first
    assert (out / "notes.txt").read_text() == "kept with the build"
    assert sorted(os.listdir(tmp_path)) == ["build", "src"]

    status, _, err = cli(["compile", model_file, "-o", out, "--no-tuning-logs"])
    assert status == 0, err
    assert sorted(os.listdir(out)) == ["model.json", "model.so", "notes.txt"]


def test_new_output_folder_follows_the_umask(cli, model_file, tmp_path):
    out = tmp_path / "shared" / "build"
    old = os.umask(0o022)
    try:
        status, _, err = cli(["compile", model_file, "-o", out, "--no-tuning-logs"])
    finally:
        os.umask(old)
    assert status == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o755
    assert sorted(os.listdir(tmp_path / "shared")) == ["build"]


# --------------------------------------------------------------------------------------
# tvmq run -o


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.ones((2, 32), np.float32))
    return path


def test_run_output_to_a_folder(expect_user_error, compiled_mlp_dir, inputs, tmp_path):
    (tmp_path / "results").mkdir()
    expect_user_error(
        ["run", compiled_mlp_dir, "-i", inputs, "-o", tmp_path / "results"],
        watch=[tmp_path, compiled_mlp_dir],
        contains="is a directory",
    )


def test_run_output_with_missing_parent(expect_user_error, compiled_mlp_dir, inputs, tmp_path):
    expect_user_error(
        ["run", compiled_mlp_dir, "-i", inputs, "-o", tmp_path / "no" / "such" / "y.npz"],
        watch=[tmp_path, compiled_mlp_dir],
        contains="does not exist",
    )


def test_run_output_over_a_non_npz_file(expect_user_error, compiled_mlp_dir, inputs, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x04onnx")
    expect_user_error(
        ["run", compiled_mlp_dir, "-i", inputs, "-o", tmp_path / "model.onnx"],
        watch=[tmp_path, compiled_mlp_dir],
        contains="not a .npz file",
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_run_output_in_an_unwritable_folder(expect_user_error, compiled_mlp_dir, inputs, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        expect_user_error(
            ["run", compiled_mlp_dir, "-i", inputs, "-o", locked / "y.npz"],
            watch=[tmp_path],
            contains="permission denied",
        )
    finally:
        locked.chmod(0o755)


def test_run_output_replaces_an_existing_npz_and_leaves_no_temp(
    cli, compiled_mlp_dir, inputs, tmp_path
):
    target = tmp_path / "y.npz"
    np.savez(target, old=np.zeros(1))
    before = sorted(os.listdir(compiled_mlp_dir))
    status, _, err = cli(["run", compiled_mlp_dir, "-i", inputs, "-o", target])
    assert status == 0, err
    assert list(np.load(target)) == ["output0"]
    assert sorted(os.listdir(tmp_path)) == ["x.npz", "y.npz"]
    assert sorted(os.listdir(compiled_mlp_dir)) == before


# --------------------------------------------------------------------------------------
# tvmq demo -o


def test_demo_output_with_a_users_row_folder_is_refused_before_training(
    expect_user_error, tmp_path
):
    row = tmp_path / "runs" / "int8-static-tvmq"
    row.mkdir(parents=True)
    (row / "model.json").write_text('{"mine": true}')
    (tmp_path / "runs" / "notes.md").write_text("my notes")
    expect_user_error(
        ["demo", "--quick", "-o", tmp_path / "runs"],
        watch=[tmp_path],
        contains="int8-static-tvmq",
    )
