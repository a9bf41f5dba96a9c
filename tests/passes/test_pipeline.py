"""The registered Relax pipeline "tvmq" and the static int8 pass Sequential."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmq.core import qmath
from tvmq.passes import (
    AnnotateQDQ,
    FoldQuantScales,
    LowerInt8,
    prepare_passes,
    static_int8_passes,
)

HOST = tvm.target.Target({"kind": "llvm"})


def _mlp(rng):
    """x -> linear(relu) -> linear, as the PyTorch importer writes it (permute_dims, bias first)."""
    w1 = rng.standard_normal((16, 32)).astype("float32") * 0.2
    w2 = rng.standard_normal((8, 16)).astype("float32") * 0.2
    b1 = rng.standard_normal(16).astype("float32") * 0.1
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 32), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t1 = bb.emit(relax.op.permute_dims(relax.const(w1)))
            h = bb.emit(relax.op.matmul(x, t1, out_dtype="float32"))
            h = bb.emit(relax.op.nn.relu(relax.op.add(relax.const(b1), h)))
            t2 = bb.emit(relax.op.permute_dims(relax.const(w2)))
            y = bb.emit_output(relax.op.matmul(h, t2, out_dtype="float32"))
        bb.emit_func_output(y)
    return bb.get(), (w1, b1, w2)


def _qparams(x, w1, b1):
    h = np.maximum(x @ w1.T + b1, 0)
    return {
        "matmul_0": qmath.choose_qparams(x.min(), x.max(), "int8"),
        "matmul_1": qmath.choose_qparams(h.min(), h.max(), "int8"),
    }


def _run(ex, x):
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def test_pipeline_is_registered_with_arguments():
    assert isinstance(relax.get_pipeline("tvmq"), tvm.transform.Pass)
    p = relax.get_pipeline("tvmq", activation_qparams={}, requantize="integer", build=False)
    assert isinstance(p, tvm.transform.Pass)


def test_sequential_equals_passes_run_one_by_one():
    rng = np.random.default_rng(0)
    mod, (w1, b1, _) = _mlp(rng)
    qp = _qparams(rng.standard_normal((4, 32)).astype("float32"), w1, b1)
    by_hand = prepare_passes()(mod)
    for p in (AnnotateQDQ(qp), FoldQuantScales(), LowerInt8()):
        by_hand = p(by_hand)
    tvm.ir.assert_structural_equal(static_int8_passes(qp)(mod), by_hand)
    no_build = relax.get_pipeline("tvmq", activation_qparams=qp, build=False)
    tvm.ir.assert_structural_equal(no_build(mod), by_hand)


@pytest.mark.parametrize("params", [{}, {"activation_dtype": "uint8", "requantize": "integer"}])
def test_compile_with_pipeline(params):
    rng = np.random.default_rng(1)
    mod, (w1, b1, w2) = _mlp(rng)
    x = rng.standard_normal((4, 32)).astype("float32")
    qp = _qparams(x, w1, b1)
    if params.get("activation_dtype") == "uint8":
        h = np.maximum(x @ w1.T + b1, 0)
        qp = {
            "matmul_0": qmath.choose_qparams(x.min(), x.max(), "uint8"),
            "matmul_1": qmath.choose_qparams(h.min(), h.max(), "uint8"),
        }
    ref = np.maximum(x @ w1.T + b1, 0) @ w2.T
    pipeline = relax.get_pipeline("tvmq", activation_qparams=qp, **params)
    got = _run(tvm.compile(mod, target=HOST, relax_pipeline=pipeline), x)
    assert qmath.sqnr(ref, got) > 30


def test_compile_qdq_module_by_pipeline_name():
    """relax_pipeline="tvmq" lowers a module already in QDQ form, then builds it."""
    rng = np.random.default_rng(2)
    mod, (w1, b1, _) = _mlp(rng)
    x = rng.standard_normal((4, 32)).astype("float32")
    qdq = AnnotateQDQ(_qparams(x, w1, b1))(prepare_passes()(mod))
    ref = _run(tvm.compile(qdq, target=HOST), x)
    got = _run(tvm.compile(qdq, target=HOST, relax_pipeline="tvmq"), x)
    assert qmath.sqnr(ref, got) > 60
