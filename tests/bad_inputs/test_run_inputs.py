"""Bad run inputs and tampered builds: one line, exit 2, nothing written, nothing unpickled.

``compiled_mlp_dir`` (tests/conftest.py) takes one input ``x`` of shape (2, 32) float32.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from array_files import Marker, npy, npz, raw, truncated_npz

X = np.ones((2, 32), np.float32)


def _objects(marker: Path) -> np.ndarray:
    a = np.empty((2, 32), dtype=object)
    a[0, 0] = Marker(str(marker))
    return a


# case: (make the -i file, message part)
INPUT_CASES = {
    "strings": (npz(x=np.full((2, 32), "a")), "not numeric"),
    "bytes": (npz(x=np.full((2, 32), b"a")), "not numeric"),
    "objects": (npz(x=_objects), "not a readable"),
    "objects-npy": (npy(_objects), "not a readable"),
    "zero-rows": (npz(x=np.zeros((0, 32), np.float32)), "shape (0, 32)"),
    "zero-rows-npy": (npy(np.zeros((0, 32), np.float32)), "shape (0, 32)"),
    "scalar-npy": (npy(np.float32(1.0)), "shape ()"),
    "wrong-shape": (npz(x=np.ones((5, 32), np.float32)), "shape (5, 32)"),
    "wrong-dtype": (npz(x=np.ones((2, 32), np.float64)), "dtype float64"),
    "extra-input": (npz(x=X, y=X), "['y'] are not inputs"),
    "misspelt-input": (npz(X=X, y=X), "no array for input(s) ['x']"),
    "no-arrays": (npz(), "no array for input(s) ['x']"),
    "truncated": (truncated_npz((64, 32)), "not a readable"),
    "not-numpy": (raw(b"x\n1\n"), "not a readable"),
    "empty-file": (raw(b""), "not a readable"),
    "plain-pickle-npy": (raw(pickle.dumps([1.0] * 64), ".npy"), "not a readable"),
    "missing": (lambda path, marker: path, "no such file"),
}


@pytest.mark.parametrize("command", ["run", "bench"])
@pytest.mark.parametrize("case", sorted(INPUT_CASES))
def test_bad_run_inputs_are_one_line(case, command, compiled_mlp_dir, tmp_path, expect_user_error):
    make, says = INPUT_CASES[case]
    marker = tmp_path / "marker"
    inputs = make(tmp_path / "inputs.npz", marker)
    argv = [command, compiled_mlp_dir, "-i", inputs]
    if command == "run":
        argv += ["-o", tmp_path / "outputs.npz"]
    else:
        argv += ["--warmup", "0", "--repeat", "1"]
    line = expect_user_error(argv, watch=[tmp_path, compiled_mlp_dir], contains=says)
    assert inputs.name in line or "input 'x'" in line
    assert not marker.exists(), "an object array was unpickled"


def test_good_inputs_still_run(compiled_mlp_dir, tmp_path, cli):
    np.savez(tmp_path / "in.npz", x=X)
    status, out, err = cli(["run", compiled_mlp_dir, "-i", tmp_path / "in.npz"])
    assert status == 0, err
    assert "output0: shape (2, 10)" in out


@pytest.mark.parametrize(
    "value, says",
    [
        (np.array([["a"] * 32] * 2), "not numeric"),
        (np.empty((2, 32), dtype=object), "not numeric"),
        ([[None] * 32] * 2, "not numeric"),
        (np.zeros((0, 32), np.float32), "shape (0, 32)"),
    ],
    ids=["strings", "objects", "nones", "zero-rows"],
)
def test_python_api_refuses_bad_inputs(value, says, compiled_mlp_dir):
    import tvmq
    from tvmq.errors import InputMismatchError

    model = tvmq.load(compiled_mlp_dir)
    with pytest.raises(InputMismatchError, match=f"input 'x'.*{re.escape(says)}"):
        model(value)


# -- tampered and damaged builds ----------------------------------------------------------


def _flip_library_byte(build: Path) -> None:
    lib = build / "model.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0x01
    lib.write_bytes(bytes(data))


def _manifest_edit(change):
    def tamper(build: Path) -> None:
        path = build / "model.json"
        d = json.loads(path.read_text())
        change(d)
        path.write_text(json.dumps(d))

    return tamper


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(d):
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return _manifest_edit(change)


def _drop(key):
    return _manifest_edit(lambda d: d.pop(key))


def _write_manifest(text: str):
    def tamper(build: Path) -> None:
        (build / "model.json").write_text(text)

    return tamper


# case: (how to damage a copy of the build, message part)
BUILD_CASES = {
    "library-swapped": (_flip_library_byte, "sha256 differs"),
    "library-missing": (lambda b: (b / "model.so").unlink(), "missing"),
    "library-file-outside": (_set("library", "file", "../model.so"), "library.file"),
    "library-file-absolute": (_set("library", "file", "/tmp/model.so"), "library.file"),
    "library-file-number": (_set("library", "file", 7), "library.file"),
    "library-not-object": (_set("library", "model.so"), "'library'"),
    "library-sha256-garbled": (_set("library", "sha256", "not-a-digest"), "library.sha256"),
    "inputs-not-list": (_set("inputs", "x"), "'inputs'"),
    "input-not-object": (_set("inputs", ["x"]), "inputs[0]"),
    # A name is a symbolic dim; a name that is not an identifier is not.
    "input-shape-text": (_set("inputs", 0, "shape", ["two words", 32]), "inputs[0].shape"),
    "input-shape-negative": (_set("inputs", 0, "shape", [-2, 32]), "inputs[0].shape"),
    "input-dtype-missing": (
        _manifest_edit(lambda d: d["inputs"][0].pop("dtype")),
        "inputs[0].dtype",
    ),
    "outputs-missing": (_drop("outputs"), "'outputs'"),
    "target-not-object": (_set("target", ["host"]), "'target'"),
    "notes-not-object": (_set("notes", "fast"), "'notes'"),
    "format-unknown": (_set("format", "tvmq-model/99"), "format"),
    "manifest-a-list": (_write_manifest("[1, 2]"), "damaged manifest"),
    "manifest-truncated": (_write_manifest('{"format": "tvmq-model/1", "inp'), "damaged manifest"),
    "manifest-not-utf8": (
        lambda b: (b / "model.json").write_bytes(b"\xff\xfe{}"),
        "damaged manifest",
    ),
    "manifest-missing": (lambda b: (b / "model.json").unlink(), "no model.json"),
}


@pytest.mark.parametrize("command", ["inspect", "run"])
@pytest.mark.parametrize("case", sorted(BUILD_CASES))
def test_tampered_build_is_one_line(case, command, compiled_mlp_dir, tmp_path, expect_user_error):
    tamper, says = BUILD_CASES[case]
    build = tmp_path / "build"
    shutil.copytree(compiled_mlp_dir, build)
    tamper(build)
    np.savez(tmp_path / "in.npz", x=X)
    argv = [command, build] + (["-i", tmp_path / "in.npz"] if command == "run" else [])
    expect_user_error(argv, watch=[tmp_path], contains=says)


def test_inspect_of_an_intact_build_prints_the_manifest(compiled_mlp_dir, cli):
    status, out, err = cli(["inspect", compiled_mlp_dir])
    assert status == 0, err
    assert json.loads(out)["library"]["file"] == "model.so"
