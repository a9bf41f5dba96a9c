"""Bad calibration data (``--calib``): one line, exit 2, before the model is even imported.

Arrays in a calibration file must be numeric (bool, integer, float) and hold values; the
file is read with ``allow_pickle=False`` (an object array is refused, never unpickled).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
from array_files import Marker, npy, npz, raw, truncated_npz
from onnx import TensorProto, helper, numpy_helper


@pytest.fixture(scope="session")
def calib_model(tmp_path_factory) -> Path:
    """x[2,8] @ W + b: one float input named ``x``."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [
            numpy_helper.from_array(rng.standard_normal((8, 4)).astype("float32"), "W"),
            numpy_helper.from_array(np.zeros(4, "float32"), "b"),
        ],
    )
    path = tmp_path_factory.mktemp("calib-model") / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _objects(marker: Path) -> np.ndarray:
    a = np.empty(2, dtype=object)
    a[0], a[1] = Marker(str(marker)), None
    return a


def _directory(path: Path, marker: Path) -> Path:
    path.mkdir()
    return path


X = np.ones((4, 8), np.float32)

# case: (make the --calib file, message part, refused before the model is imported)
CASES = {
    "strings": (npz(x=np.full((4, 8), "a")), "not numbers", True),
    "bytes": (npz(x=np.full((4, 8), b"a")), "not numbers", True),
    "objects": (npz(x=_objects), "objects", True),
    "objects-npy": (npy(_objects), "objects", True),
    "datetimes": (npz(x=np.zeros((4, 8), "datetime64[s]")), "not numbers", True),
    "complex": (npz(x=np.zeros((4, 8), np.complex64)), "not numbers", True),
    "records": (npz(x=np.zeros(4, [("a", "f4"), ("b", "i4")])), "not numbers", True),
    "zero-rows": (npz(x=np.zeros((0, 8), np.float32)), "empty", True),
    "zero-rows-npy": (npy(np.zeros((0, 8), np.float32)), "empty", True),
    "string-label-beside-x": (npz(x=X, label=np.array(["cat"] * 4)), "'label'", True),
    "no-arrays": (npz(), "no arrays", True),
    "truncated": (truncated_npz((64, 8)), "cannot read", True),
    "not-numpy": (raw(b"x,y\n1,2\n"), "cannot read", True),
    "empty-file": (raw(b""), "cannot read", True),
    "pickle-as-npy": (raw(pickle.dumps([1, 2, 3]), ".npy"), "cannot read", True),
    "csv-suffix": (raw(b"1,2,3\n", ".csv"), ".npz or .npy", True),
    "directory": (_directory, "is a directory", True),
    "missing": (lambda path, marker: path, "does not exist", True),
    "wrong-names": (npz(a=X, b=X), "missing: ['x']", False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_calibration_file_is_one_line(
    case, calib_model, tmp_path, expect_user_error, monkeypatch
):
    import tvmq

    make, says, early = CASES[case]
    marker = tmp_path / "marker"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    calib = make(data_dir / "calib.npz", marker)
    if early:  # refused up front: importing or compiling the model is already too late

        def too_late(*args, **kwargs):
            pytest.fail(f"{case}: tvmq.compile ran before the calibration data was refused")

        monkeypatch.setattr(tvmq, "compile", too_late)
    argv = ["compile", calib_model, "--quantize", "int8", "--calib", calib, "-o", tmp_path / "out"]
    line = expect_user_error(argv, watch=[tmp_path, calib_model], contains=says)
    assert calib.name in line
    assert not marker.exists(), "an object array was unpickled"


def test_good_calibration_file_passes_the_check(tmp_path):
    from tvmq.calibration import check_calibration_file

    np.savez(tmp_path / "c.npz", x=X, label=np.arange(4))
    assert check_calibration_file(tmp_path / "c.npz") == {
        "x": ((4, 8), "float32"),
        "label": ((4,), "int64"),
    }


# The same rules through the Python API (arrays and dicts, not files).
API_CASES = {
    "strings": (np.full((4, 8), "a"), "not numbers"),
    "objects": (np.array([object(), None], dtype=object), "objects"),
    "zero-rows": (np.zeros((0, 8), np.float32), "empty"),
    "dict-with-strings": ({"x": np.full((4, 8), "a")}, "not numbers"),
    "list-of-batches-one-empty": ([X, np.zeros((0, 8), np.float32)], "empty"),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_bad_calibration_arrays_raise_tvmq_error(case):
    from tvmq.calibration import iter_calibration_batches
    from tvmq.errors import TvmqError

    data, says = API_CASES[case]
    with pytest.raises(TvmqError, match=says):
        list(iter_calibration_batches(data, ["x"]))


def test_object_array_file_through_the_api_is_refused_not_unpickled(tmp_path):
    from tvmq.calibration import iter_calibration_batches
    from tvmq.errors import TvmqError

    marker = tmp_path / "marker"
    np.savez(tmp_path / "c.npz", x=_objects(marker))
    with pytest.raises(TvmqError, match="cannot read calibration file"):
        list(iter_calibration_batches(tmp_path / "c.npz", ["x"]))
    assert not marker.exists()
