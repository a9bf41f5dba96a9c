"""FoldConstantCasts: casts of constants fold (with TVM's rounding); nothing else does."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq.passes import FoldConstantCasts, half_precision_passes
from tvmq.passes.relax_utils import is_tensor_const, op_name, ordered_bindings


def _ops(func) -> list[str]:
    return [op_name(b.value) for b in ordered_bindings(func) if op_name(b.value)]


def _run(mod, *args):
    ex = relax.build(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args])


def _module(w: np.ndarray) -> tvm.IRModule:
    """``y = x @ astype(W, fp16) + full_like(x @ ..., 0)``: one cast to fold, one fill to keep."""
    x = relax.Var("x", relax.TensorType((3, w.shape[0]), "float16"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            w16 = bb.emit(relax.op.astype(relax.const(w), "float16"))
            y = bb.emit(relax.op.matmul(x, w16, out_dtype="float32"))
            zeros = bb.emit(relax.op.full_like(y, relax.const(0.0, "float32")))
            out = bb.emit_output(relax.op.add(y, zeros))
        bb.emit_func_output(out)
    return bb.get()


def test_folds_the_cast_of_a_constant_and_matches_tvms_cast():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((20, 7)) * 3).astype(np.float32)
    x = rng.standard_normal((3, 20)).astype(np.float16)
    mod = _module(w)
    folded = FoldConstantCasts()(mod)
    assert _ops(folded["main"]) == ["relax.matmul", "relax.full_like", "relax.add"]
    consts = []
    relax.analysis.post_order_visit(
        folded["main"], lambda e: consts.append(e) if is_tensor_const(e) else None
    )
    (w16,) = [c for c in consts if str(c.ty.dtype) == "float16"]
    np.testing.assert_array_equal(w16.value.numpy(), w.astype(np.float16))
    np.testing.assert_array_equal(_run(folded, x).numpy(), _run(mod, x).numpy())
    want = x.astype(np.float32) @ w.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x).numpy(), want, rtol=1e-5, atol=1e-5)


def test_half_precision_keeps_activation_sized_fills_out_of_the_constants():
    """Masked softmax's ``where(mask, full_like(s, 0), s)``: TVM's FoldConstant turned the fill
    into a constant of the activation's shape (25 MB per attention layer of MiniLM at batch 32)."""
    w = np.random.default_rng(1).standard_normal((20, 7)).astype(np.float32)
    x = relax.Var("x", relax.TensorType((64, 20), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.exp(x))
            zeros = bb.emit(relax.op.full_like(y, relax.const(0.0)))
            mask = bb.emit(relax.op.less(y, relax.const(0.5)))
            s = bb.emit(relax.op.where(mask, zeros, y))
            out = bb.emit_output(relax.op.matmul(s, relax.const(w)))
        bb.emit_func_output(out)
    mixed = half_precision_passes()(bb.get())
    shapes = []
    relax.analysis.post_order_visit(
        mixed["main"],
        lambda e: (
            shapes.append((str(e.ty.dtype), tuple(int(d) for d in e.value.shape)))
            if is_tensor_const(e)
            else None
        ),
    )
    assert ("float16", (20, 7)) in shapes
    assert all(s != (64, 20) for _, s in shapes), shapes
    assert "relax.astype" in _ops(mixed["main"])  # x's cast stays


def test_folds_a_linear_layers_transposed_cast_weight():
    """``matmul(x, permute_dims(astype(W)))`` (a linear layer after ToMixedPrecision): the
    matmul reads one fp16 constant, W.T, which the tensor-core passes match."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((7, 20)).astype(np.float32)  # torch's (out, in)
    x = relax.Var("x", relax.TensorType((3, 20), "float16"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            w16 = bb.emit(relax.op.astype(relax.const(w), "float16"))
            wt = bb.emit(relax.op.permute_dims(w16))
            flat = bb.emit(relax.op.reshape(wt, (20, 7)))
            out = bb.emit_output(relax.op.matmul(x, flat, out_dtype="float32"))
        bb.emit_func_output(out)
    mod = bb.get()
    folded = half_precision_passes()(mod)
    (matmul,) = [b.value for b in ordered_bindings(folded["main"]) if op_name(b.value)]
    assert op_name(matmul) == "relax.matmul" and is_tensor_const(matmul.args[1])
    np.testing.assert_array_equal(matmul.args[1].value.numpy(), w.astype(np.float16).T)
    xv = rng.standard_normal((3, 20)).astype(np.float16)
    np.testing.assert_array_equal(_run(folded, xv).numpy(), _run(mod, xv).numpy())
