"""QDQConvToNCHW: NHWC quantized convs (TFLite's form) -> NCHW on the integers, same numbers.

The regions are written as TVM's TFLite frontend writes them (conv with an ``HWIO`` kernel;
a depthwise conv with an ``HWOI`` kernel behind a ``reshape``), built and run before and
after the pass on random integers: the outputs must be identical, and after
``static_int8_passes`` no float conv may be left. The end-to-end check against LiteRT is
tests/frontends/test_tflite.py.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from tvmq.passes import QDQConvToNCHW, static_int8_passes
from tvmq.passes.analysis import float_compute_ops
from tvmq.passes.canonicalize_qdq import CanonicalizeQDQ

RNG = np.random.default_rng(0)
HOST = tvm.target.Target({"kind": "llvm"})
C_IN, C_OUT = 3, 8


def _c(value, dtype):
    return relax.const(np.asarray(value, dtype), dtype)


def _model(second_reader: bool = False) -> tvm.IRModule:
    """int8 NHWC input -> conv (HWIO) + bias, ReLU clip -> depthwise conv (HWOI) -> int8."""
    w1 = RNG.integers(-127, 128, (3, 3, C_IN, C_OUT)).astype("int8")
    s1 = RNG.uniform(0.002, 0.02, C_OUT).astype("float32")
    w2 = RNG.integers(-127, 128, (1, 3, 3, C_OUT)).astype("int8")
    s2 = RNG.uniform(0.002, 0.02, C_OUT).astype("float32")
    bias = RNG.normal(0, 0.2, C_OUT).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 6, 6, C_IN), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            xd = bb.emit(relax.op.dequantize(x, _c(0.03, "float32"), _c(-3, "int32"), axis=0))
            wd = bb.emit(
                relax.op.dequantize(_c(w1, "int8"), _c(s1, "float32"), _c(0, "int32"), axis=3)
            )
            y = bb.emit(
                relax.op.nn.conv2d(
                    xd, wd, padding=1, data_layout="NHWC", kernel_layout="HWIO", out_layout="NHWC"
                )
            )
            y = bb.emit(relax.op.add(y, _c(bias, "float32")))
            q = bb.emit(
                relax.op.quantize(
                    y, _c(0.05, "float32"), _c(-128, "int32"), axis=0, out_dtype="int8"
                )
            )
            q = bb.emit(relax.op.clip(q, -128, 127))
            d = bb.emit(relax.op.dequantize(q, _c(0.05, "float32"), _c(-128, "int32"), axis=0))
            w = bb.emit(
                relax.op.dequantize(_c(w2, "int8"), _c(s2, "float32"), _c(0, "int32"), axis=3)
            )
            w = bb.emit(relax.op.reshape(w, (3, 3, C_OUT, 1)))
            y2 = bb.emit(
                relax.op.nn.conv2d(
                    d,
                    w,
                    padding=1,
                    groups=C_OUT,
                    data_layout="NHWC",
                    kernel_layout="HWOI",
                    out_layout="NHWC",
                )
            )
            out = bb.emit(
                relax.op.quantize(y2, _c(0.04, "float32"), _c(5, "int32"), axis=0, out_dtype="int8")
            )
            if second_reader:  # the first conv's float result read by something else too
                out = bb.emit(relax.Tuple([out, y]))
            gv = bb.emit_output(out)
        bb.emit_func_output(gv)
    return bb.get()


def _run(mod: tvm.IRModule, x: np.ndarray):
    ex = tvm.compile(mod, target=HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    return (
        [o.numpy() for o in out] if isinstance(out, tvm.ir.Array | list | tuple) else [out.numpy()]
    )


def _convs(mod: tvm.IRModule) -> list[tuple[str, str]]:
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.nn.conv2d":
            found.append((str(e.attrs.data_layout), str(e.attrs.kernel_layout)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def test_both_convs_move_to_nchw_with_identical_outputs():
    mod = CanonicalizeQDQ()(_model())
    out = QDQConvToNCHW()(mod)
    assert _convs(out) == [("NCHW", "OIHW"), ("NCHW", "OIHW")]
    x = RNG.integers(-128, 128, (1, 6, 6, C_IN)).astype("int8")
    (before,), (after,) = _run(mod, x), _run(out, x)
    assert after.dtype == np.int8 and after.shape == (1, 6, 6, C_OUT)
    assert np.abs(before.astype(int)).max() > 0  # not a constant output
    np.testing.assert_array_equal(after, before)
    assert tvm_ffi.structural_equal(QDQConvToNCHW()(out), out)  # nothing left to rewrite
    lowered = static_int8_passes()(out)
    assert float_compute_ops(lowered["main"]) == []


def test_a_float_value_with_another_reader_is_left_alone():
    mod = CanonicalizeQDQ()(_model(second_reader=True))
    out = QDQConvToNCHW()(mod)
    assert _convs(out) == [("NHWC", "HWIO"), ("NCHW", "OIHW")]
    x = RNG.integers(-128, 128, (1, 6, 6, C_IN)).astype("int8")
    for a, b in zip(_run(mod, x), _run(out, x), strict=True):
        np.testing.assert_array_equal(b, a)
