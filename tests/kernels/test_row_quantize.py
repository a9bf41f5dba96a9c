"""The per-row quantize kernel (tvmq/kernels/row_quantize.py: row_quantize_u8,
exact_quotient): the bytes of QuantizeDynamic's Relax ops, without a divide per value."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te

from tvmq.core import qmath
from tvmq.kernels.row_quantize import exact_quotient, row_quantize_u8

HOST = tvm.target.Target({"kind": "llvm"})


def test_exact_quotient_is_the_division_bit_for_bit():
    n = 1 << 20
    x = te.placeholder((n,), "float32", name="x")
    s = te.placeholder((n,), "float32", name="s")
    q = te.compute((n,), lambda i: exact_quotient(x[i], s[i], 1.0 / s[i]), name="q")
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([x, s, q])}), target=HOST)
    rng = np.random.default_rng(0)
    for _ in range(4):  # quotients over 20 decades, scales from 1e-7 (float32 eps) to 1e4
        xs = (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6, n)).astype("float32")
        ss = (rng.uniform(0.5, 1, n) * 10.0 ** rng.uniform(-7, 4, n)).astype("float32")
        out = tvm.runtime.empty((n,), "float32")
        lib["main"](tvm.runtime.tensor(xs), tvm.runtime.tensor(ss), out)
        np.testing.assert_array_equal(out.numpy().view(np.int32), (xs / ss).view(np.int32))


def _relax_quantize(rows: int, k: int):
    """QuantizeDynamic's quantize ops on (x, params), compiled for the host."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, k), "float32"))
    p = relax.Var("p", relax.TensorType((rows, 2), "float32"))
    with bb.function("main", [x, p]):
        with bb.dataflow():
            s_x = bb.emit(relax.op.strided_slice(p, [1], [0], [1]))
            z_f = bb.emit(relax.op.strided_slice(p, [1], [1], [2]))
            q = bb.emit(relax.op.add(relax.op.round(relax.op.divide(x, s_x)), z_f))
            out = bb.emit_output(relax.op.astype(relax.op.clip(q, 0, 255), "uint8"))
        bb.emit_func_output(out)
    return relax.VirtualMachine(tvm.compile(bb.get(), target=HOST), tvm.cpu())["main"]


def test_row_quantize_gives_the_relax_ops_bytes():
    rows, k = 9, 3075  # a row tail of 3 past the 16-value steps
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((rows, k)) * 10.0 ** rng.uniform(-4, 4, (rows, 1))).astype("float32")
    x[1] = np.abs(x[1])  # zero point 0
    x[2] = 0.0  # the scale is eps
    x[3, 5], x[4, 7], x[5, 9] = np.inf, np.nan, -np.inf  # these rows divide
    with np.errstate(invalid="ignore"):
        lo, hi = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
        s = np.maximum((hi - lo) / np.float32(255), np.float32(qmath.SCALE_EPS)).astype("float32")
        z = np.clip(np.round(-lo / s), 0, 255).astype("float32")
    params = np.stack([s, z], 1)
    lib = tvm.compile(
        tvm.IRModule({"main": row_quantize_u8(rows, k).with_attr("global_symbol", "main")}),
        target=HOST,
    )
    got = tvm.runtime.empty((rows, k), "uint8")
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(params), got)
    ref = _relax_quantize(rows, k)(tvm.runtime.tensor(x), tvm.runtime.tensor(params)).numpy()
    np.testing.assert_array_equal(got.numpy(), ref)
    finite = slice(0, 3)
    want = np.clip(np.round(x[finite] / s[finite, None]) + z[finite, None], 0, 255)
    np.testing.assert_array_equal(got.numpy()[finite], want.astype("uint8"))  # numpy's too
