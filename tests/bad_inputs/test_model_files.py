"""Bad model files: one line, exit 2, naming the file; and loading a model never runs its code.

The crafted ``.pt2`` archives below are each a real ``torch.export.save`` output with one
part changed so that stock ``torch.export.load`` would run code from the file (create a
marker file). tvmq must refuse each one before anything is unpickled or evaluated.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper


class _Marker:
    """A pickle payload that creates ``path`` when unpickled: proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _WithConstant(torch.nn.Module):
    """Linear + relu + a buffer + a lifted tensor constant: weights *and* constants entries."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.register_buffer("shift", torch.ones(4))

    def forward(self, x):
        return torch.relu(self.fc(x)) + self.shift + torch.tensor([1.0, 2.0, 3.0, 4.0])


@pytest.fixture(scope="session")
def good_pt2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pt2") / "m.pt2"
    torch.export.save(torch.export.export(_WithConstant().eval(), (torch.zeros(2, 8),)), path)
    return path


def _onnx_mlp(op: str | None = None, domain: str = "") -> onnx.ModelProto:
    """x[2,8] @ W + b -> (optionally) one more node of type ``op`` -> y."""
    import numpy as np

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype("float32"), "W")
    b = numpy_helper.from_array(np.zeros(4, "float32"), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["z"]),
    ]
    last = "z"
    if op is not None:
        nodes.append(helper.make_node(op, ["z"], ["y"], name="the_odd_one", domain=domain))
        last = "y"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, [2, 4])],
        [w, b],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


@pytest.fixture(scope="session")
def good_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    onnx.save(_onnx_mlp(), path)
    return path


# -- crafting .pt2 variants ---------------------------------------------------------------


def _rewrite(src: Path, dst: Path, edit, extra: dict[str, bytes] | None = None) -> Path:
    """Copy the zip ``src`` to ``dst`` passing each entry through ``edit(name, data)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))
        for name, data in (extra or {}).items():
            zout.writestr(f"{root}/{name}", data)
    return dst


def _edit_json(suffix: str, change):
    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith(suffix):
            return data
        d = json.loads(data)
        change(d)
        return json.dumps(d).encode()

    return edit


def _pickled_weight(src, dst, marker):
    def edit(name, data):
        if name.endswith("model_weights_config.json"):
            d = json.loads(data)
            for meta in d["config"].values():
                meta["use_pickle"] = True
            return json.dumps(d).encode()
        if "/data/weights/weight_" in name:
            return pickle.dumps(_Marker(marker))
        return data

    return _rewrite(src, dst, edit)


def _pickled_constant(src, dst, marker):
    def edit(name, data):
        if name.endswith("model_constants_config.json"):
            d = json.loads(data)
            for meta in d["config"].values():
                meta["use_pickle"] = True
            return json.dumps(d).encode()
        if "/data/constants/tensor_" in name:
            return pickle.dumps(_Marker(marker))
        return data

    return _rewrite(src, dst, edit)


def _opaque_constant(src, dst, marker):
    def change(d):
        for meta in d["config"].values():
            meta["path_name"] = "opaque_obj_0"

    return _rewrite(
        src,
        dst,
        _edit_json("model_constants_config.json", change),
        {"data/constants/opaque_obj_0": pickle.dumps(_Marker(marker))},
    )


def _pickled_sample_inputs(src, dst, marker):
    def edit(name, data):
        return pickle.dumps((_Marker(marker),)) if name.endswith("sample_inputs/model.pt") else data

    return _rewrite(src, dst, edit)


def _code_in_shape(src, dst, marker):
    """sympy.sympify(expr_str) is eval: stock torch.export.load runs this."""

    def change(d):
        tv = d["graph_module"]["graph"]["tensor_values"]["x"]
        tv["sizes"][0] = {
            "as_expr": {
                "expr_str": f"s0 + len(open('{marker}', 'w').name) * 0",
                "hint": {"as_int": 2},
            }
        }

    return _rewrite(src, dst, _edit_json("models/model.json", change))


def _guard_code(src, dst, marker):
    return _rewrite(
        src,
        dst,
        _edit_json("models/model.json", lambda d: d.update(guards_code=[f"open('{marker}', 'w')"])),
    )


def _os_system_target(src, dst, marker):
    def edit(name, data):
        if name.endswith("models/model.json"):
            return data.replace(b'"torch.ops.aten.relu.default"', b'"torch.os.system"')
        return data

    return _rewrite(src, dst, edit)


def _load_library_target(src, dst, marker):
    def edit(name, data):
        if name.endswith("models/model.json"):
            return data.replace(b'"torch.ops.aten.relu.default"', b'"torch.ops.load_library"')
        return data

    return _rewrite(src, dst, edit)


def _aoti_library(src, dst, marker):
    return _rewrite(src, dst, lambda n, d: d, {"data/aotinductor/model/model.so": b"\x7fELF"})


def _legacy_weights(src, dst, marker):
    return _rewrite(
        src, dst, lambda n, d: d, {"data/weights/model.pt": pickle.dumps(_Marker(marker))}
    )


UNSAFE_PT2 = {
    "pickled-weight": (_pickled_weight, "use_pickle"),
    "pickled-constant": (_pickled_constant, "use_pickle"),
    "opaque-object-constant": (_opaque_constant, "opaque_obj_0"),
    "pickled-sample-inputs": (_pickled_sample_inputs, "sample inputs"),
    "code-in-shape-expression": (_code_in_shape, "symbolic shape"),
    "guard-code": (_guard_code, "guard code"),
    "os-system-target": (_os_system_target, "torch.os.system"),
    "load-library-target": (_load_library_target, "torch.ops.load_library"),
    "aotinductor-library": (_aoti_library, "data/aotinductor/model/model.so"),
    "legacy-pickled-weights": (_legacy_weights, "data/weights/model.pt"),
}


@pytest.mark.parametrize("command", ["inspect", "compile"])
@pytest.mark.parametrize("case", sorted(UNSAFE_PT2))
def test_unsafe_pt2_is_refused_without_running_code(
    case, command, good_pt2, tmp_path, expect_user_error
):
    craft, says = UNSAFE_PT2[case]
    marker = tmp_path / "marker"
    model = craft(good_pt2, tmp_path / "crafted.pt2", marker)
    argv = [command, model] + (["-o", tmp_path / "out"] if command == "compile" else [])
    line = expect_user_error(argv, watch=[tmp_path], contains=says)
    assert "crafted.pt2" in line
    assert not marker.exists(), "loading the model ran code from it"


def test_the_crafted_pickle_does_run_code_when_unpickled(tmp_path):
    """The corpus is real: its payload creates the marker when anything unpickles it."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Marker(marker))).close()
    assert marker.exists()


def test_unsafe_pt2_is_refused_by_the_python_api_too(good_pt2, tmp_path):
    from tvmq.errors import TvmqError
    from tvmq.frontends import import_model

    marker = tmp_path / "marker"
    model = _pickled_weight(good_pt2, tmp_path / "crafted.pt2", marker)
    with pytest.raises(TvmqError, match="use_pickle"):
        import_model(model)
    assert not marker.exists()


def test_torch_load_is_held_to_weights_only_while_loading(good_pt2, tmp_path, monkeypatch):
    """Defence in depth: a pickle path the archive check missed fails instead of unpickling."""
    import tvmq.frontends.pt2 as pt2
    from tvmq.errors import TvmqError

    monkeypatch.setattr(pt2, "check_pt2_archive", lambda path: None)  # pretend it missed
    marker = tmp_path / "marker"
    model = _pickled_weight(good_pt2, tmp_path / "crafted.pt2", marker)
    with pytest.raises(TvmqError, match="unpickling"):
        pt2.load_exported_program(model)
    assert not marker.exists()
    assert torch.load.__module__ == "torch.serialization"  # the real one is back


@pytest.mark.parametrize(
    "shape, says",
    [("x:4x8", "exported with shape [2, 8]"), ("y:2x8", "'y', which is not an input")],
    ids=["other-shape", "not-an-input"],
)
def test_input_shape_cannot_reshape_a_pt2(shape, says, good_pt2, tmp_path, expect_user_error):
    argv = ["inspect", good_pt2, "--input-shape", shape]
    expect_user_error(argv, watch=[good_pt2], contains=says)


def test_input_shape_may_restate_a_pt2_shape(good_pt2, cli):
    status, out, err = cli(["inspect", good_pt2, "--input-shape", "x:2x8"])
    assert status == 0, err


def test_a_clean_pt2_still_loads(good_pt2, cli):
    status, out, err = cli(["inspect", good_pt2])
    assert status == 0, err
    assert "input  x: [2, 8] float32" in out


# -- damaged, empty, wrong kind of file ---------------------------------------------------


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _flipped_weight_byte(src: Path, dst: Path) -> Path:
    """One byte of a weight changed: the zip is intact except for that entry's CRC."""
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if "/data/weights/weight_" in i.filename)
    data = bytearray(src.read_bytes())
    # The local header's own name/extra lengths (torch pads the extra field to align data).
    at = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[at + 26 : at + 30])
    data[at + 30 + name_len + extra_len] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def _without(suffix: str):
    """The archive less one entry: torch.export.load itself fails (and logs a traceback)."""

    def make(pt2: Path, onnx_: Path, dst: Path) -> Path:
        with zipfile.ZipFile(pt2) as zin, zipfile.ZipFile(dst, "w") as zout:
            for info in zin.infolist():
                if not info.filename.endswith(suffix):
                    zout.writestr(info, zin.read(info.filename))
        return dst

    return make


def _bad_json(src: Path, dst: Path) -> Path:
    return _rewrite(src, dst, lambda n, d: b"{oops" if n.endswith("models/model.json") else d)


def _bytes(data: bytes):
    """A maker that writes ``data`` as the model file."""

    def make(pt2: Path, onnx_: Path, dst: Path) -> Path:
        dst.write_bytes(data)
        return dst

    return make


def _copy_of(which: str):
    def make(pt2: Path, onnx_: Path, dst: Path) -> Path:
        dst.write_bytes((pt2 if which == "pt2" else onnx_).read_bytes())
        return dst

    return make


def _directory(pt2: Path, onnx_: Path, dst: Path) -> Path:
    dst.mkdir()
    return dst


DAMAGED = {
    # case: (name of the model file, how to make it from good_pt2 / good_onnx, message part)
    "empty-pt2": ("m.pt2", _bytes(b""), "empty file"),
    "empty-onnx": ("m.onnx", _bytes(b""), "not a valid ONNX"),
    "truncated-pt2": ("m.pt2", lambda pt2, onnx_, dst: _truncated(pt2, dst), "zip"),
    "truncated-onnx": (
        "m.onnx",
        lambda pt2, onnx_, dst: _truncated(onnx_, dst),
        "not a valid ONNX",
    ),
    "text-as-pt2": ("m.pt2", _bytes(b"hello"), "zip"),
    "text-as-onnx": ("m.onnx", _bytes(b"hello\n"), "not a valid ONNX"),
    "onnx-named-pt2": ("m.pt2", _copy_of("onnx"), "zip"),
    "pt2-named-onnx": ("m.onnx", _copy_of("pt2"), "not a valid ONNX"),
    "flipped-weight-byte": ("m.pt2", lambda pt2, onnx_, dst: _flipped_weight_byte(pt2, dst), "CRC"),
    "sample-inputs-missing": ("m.pt2", _without("sample_inputs/model.pt"), "not a loadable"),
    "weights-config-missing": ("m.pt2", _without("weights_config.json"), "not a loadable"),
    "program-not-json": ("m.pt2", lambda pt2, onnx_, dst: _bad_json(pt2, dst), "not JSON"),
    "unknown-suffix": ("m.pb", _bytes(b"\x08\x01"), "unknown model format"),
    "no-suffix": ("model", _bytes(b"x"), "unknown model format"),
    # inspect reads directories (compiled outputs): there the message is about that.
    "directory-onnx": (
        "m.onnx",
        _directory,
        {"compile": "is a directory", "inspect": "model.json"},
    ),
    "directory-pt2": ("m.pt2", _directory, {"compile": "is a directory", "inspect": "model.json"}),
    "missing": ("nope.pt2", lambda pt2, onnx_, dst: dst, "no such file"),
}


@pytest.mark.parametrize("command", ["inspect", "compile"])
@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_model_file_is_one_line(
    case, command, good_pt2, good_onnx, tmp_path, expect_user_error
):
    name, make, says = DAMAGED[case]
    models = tmp_path / "models"
    models.mkdir()
    model = make(good_pt2, good_onnx, models / name)
    argv = [command, model] + (["-o", tmp_path / "out"] if command == "compile" else [])
    says = says[command] if isinstance(says, dict) else says
    line = expect_user_error(argv, watch=[tmp_path], contains=says)
    assert name in line


UNSUPPORTED_ONNX = {
    "op-relax-lacks": (_onnx_mlp("Celu"), "'Celu'"),
    "custom-domain-op": (_onnx_mlp("Relu", domain="com.example"), "com.example::Relu"),
}


@pytest.mark.parametrize("command", ["inspect", "compile"])
@pytest.mark.parametrize("case", sorted(UNSUPPORTED_ONNX))
def test_unsupported_onnx_operator_names_file_and_operator(
    case, command, tmp_path, expect_user_error
):
    proto, op = UNSUPPORTED_ONNX[case]
    model = tmp_path / "odd.onnx"
    onnx.save(proto, model)
    argv = [command, model] + (["-o", tmp_path / "out"] if command == "compile" else [])
    line = expect_user_error(argv, watch=[tmp_path], contains=op)
    assert "odd.onnx" in line and "the_odd_one" in line


def test_a_clean_onnx_still_loads(good_onnx, cli):
    status, out, err = cli(["inspect", good_onnx])
    assert status == 0, err
    assert "input  x: [2, 8] float32" in out
