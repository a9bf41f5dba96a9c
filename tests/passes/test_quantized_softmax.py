"""QuantizedSoftmax: softmax + per-tensor quantize as one kernel, vs numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes import QuantizedSoftmax
from tvmq.passes.relax_utils import op_name, ordered_bindings
from tvmq.passes.safe_softmax import find_safe_softmax

_LLVM = tvm.target.Target({"kind": "llvm"})


def _ops(mod) -> list[str]:
    return [op_name(b.value) for b in ordered_bindings(mod["main"]) if op_name(b.value)]


def _softmax_quantize(shape, scale, zero, dtype, axis=-1, out_shape=None, extra_user=False):
    """``quantize(reshape(softmax(x)), scale, zero)``; with `extra_user` the softmax is also
    an output of the function."""
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            s = bb.emit(relax.op.nn.softmax(x, axis=axis))
            v = bb.emit(relax.op.reshape(s, out_shape)) if out_shape else s
            q = relax.op.quantize(v, relax.const(scale, "float32"), relax.const(zero, "int32"),
                                  axis=-1, out_dtype=dtype)  # fmt: skip
            q = bb.emit_output(q)
            out = bb.emit_output(relax.Tuple([q, s])) if extra_user else q
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, *args):
    ex = relax.build(mod, target=_LLVM)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(a) for a in args))
    return out.numpy()


def _reference(x, scale, zero, dtype):
    with np.errstate(invalid="ignore"):
        e = np.exp(x - x.max(-1, keepdims=True))
        p = np.nan_to_num(e / e.sum(-1, keepdims=True))  # a row of -inf: probability 0
    info = np.iinfo(dtype)
    return np.clip(np.round(p / scale) + zero, info.min, info.max)


@pytest.mark.parametrize(
    "shape, scale, zero, dtype",
    [
        ((2, 3, 7, 197), 1 / 255, 0, "uint8"),  # DeiT's 197 keys: padded to 208 in the kernel
        ((4, 64), 0.5 / 255, 0, "uint8"),  # probabilities above 0.5 clamp to 255
        ((3, 40), 1 / 255, -128, "int8"),  # asymmetric int8
        ((3, 40), 1 / 127, 0, "int8"),  # symmetric int8
    ],
)
def test_one_kernel_matches_numpy_to_one_step(shape, scale, zero, dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3).astype("float32")
    x.reshape(-1, shape[-1])[1] = -np.inf  # a fully masked row
    mod = _softmax_quantize(shape, scale, zero, dtype)
    out = QuantizedSoftmax()(mod)
    ops = _ops(out)
    assert "relax.nn.softmax" not in ops and "relax.quantize" not in ops
    got = _run(out, x)
    assert got.dtype == dtype
    ref = _reference(x.astype("float64"), scale, zero, dtype)
    diff = np.abs(got.astype("float64") - ref)
    assert diff.max() <= 1  # rounding once, half up, instead of twice (module docstring)
    assert (diff > 0).mean() < 0.01
    assert np.all(got.reshape(-1, shape[-1])[1] == zero)


def test_reshape_between_softmax_and_quantize():
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 33)).astype("float32")
    mod = _softmax_quantize((1, 2, 5, 33), 1 / 255, 0, "uint8", out_shape=(2, 5, 33))
    out = QuantizedSoftmax()(mod)
    assert "relax.quantize" not in _ops(out)
    got = _run(out, x)
    assert got.shape == (2, 5, 33)
    ref = _reference(x.astype("float64"), 1 / 255, 0, "uint8").reshape(2, 5, 33)
    assert np.abs(got - ref).max() <= 1


def test_pytorch_safe_softmax_pattern_is_matched():
    """SDPA's softmax with the "row of -inf gives 0" test (SafeSoftmax's pattern)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (5, 7, 7))
    mask = torch.rand(1, 1, 5, 7, generator=g) > 0.3
    mask[..., 2, :] = False

    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    mod = from_pytorch(Sdpa(), (q, k, v, mask)).mod
    (where,) = find_safe_softmax(mod["main"])  # the probabilities, before P @ V
    quantized = _quantize_binding(mod, where, 1 / 255)
    before = _ops(quantized)
    ops = _ops(QuantizedSoftmax()(quantized))
    assert "relax.nn.softmax" not in ops and "relax.quantize" not in ops
    assert ops.count("relax.equal") == before.count("relax.equal") - 1


def _quantize_binding(mod, var, scale):
    """`mod` with ``var``'s readers reading ``dequantize(quantize(var))``."""

    @relax.expr_functor.mutator
    class Insert(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            if not binding.var.same_as(var):
                super().visit_var_binding_(binding)
                return
            bb = self.builder_
            new = bb.emit(self.visit_expr(binding.value))
            s, z = relax.const(scale, "float32"), relax.const(0, "int32")
            q = bb.emit(relax.op.quantize(new, s, z, axis=-1, out_dtype="uint8"))
            self.set_var_remap(binding.var, bb.emit(relax.op.dequantize(q, s, z, axis=-1)))

    m = Insert(mod)
    m.builder_.update_func(mod.get_global_var("main"), m.visit_expr(mod["main"]))
    return m.builder_.get()


@pytest.mark.parametrize(
    "case",
    ["per_channel_scale", "softmax_axis_0", "softmax_read_twice"],
)
def test_other_patterns_are_left_alone(case):
    if case == "per_channel_scale":
        x = relax.Var("x", relax.TensorType((2, 9), "float32"))
        bb = relax.BlockBuilder()
        with bb.function("main", [x]):
            with bb.dataflow():
                s = bb.emit(relax.op.nn.softmax(x))
                scale = relax.const(np.full(9, 1 / 255, "float32"))
                q = relax.op.quantize(s, scale, relax.const(0, "int32"), axis=-1)
                q = bb.emit_output(q)
            bb.emit_func_output(q)
        mod = bb.get()
    elif case == "softmax_axis_0":
        mod = _softmax_quantize((4, 9), 1 / 255, 0, "uint8", axis=0)
    else:
        mod = _softmax_quantize((4, 9), 1 / 255, 0, "uint8", extra_user=True)
    assert QuantizedSoftmax()(mod).same_as(mod)


def _scores_softmax(keys: int, mask: bool, second_reader: bool = False):
    """int8 attention's ``quantize(softmax(reshape(dequantize(s)) [+ mask]))`` over int32
    scores ``s (3, 4, keys)``; with ``second_reader`` the dequantized scores are an output
    too (so the chain cannot take them)."""
    s = relax.Var("s", relax.TensorType((3, 4, keys), "int32"))
    m = relax.Var("m", relax.TensorType((1, 1, 4, keys), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [s, m] if mask else [s]):
        with bb.dataflow():
            zero = relax.const(0, "int32")
            d = bb.emit(relax.op.dequantize(s, relax.const(0.01, "float32"), zero, axis=-1))
            x = bb.emit(relax.op.reshape(d, (1, 3, 4, keys)))
            if mask:
                x = bb.emit(relax.op.add(x, m))
            p = bb.emit(relax.op.nn.softmax(x, axis=-1))
            p = bb.emit(relax.op.reshape(p, (3, 4, keys)))
            q = relax.op.quantize(p, relax.const(1 / 255, "float32"), zero, axis=-1,
                                  out_dtype="uint8")  # fmt: skip
            q = bb.emit_output(q)
            out = bb.emit_output(relax.Tuple([q, d])) if second_reader else q
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("mask", [True, False])
def test_int32_scores_dequantized_and_masked_in_the_kernel(mask):
    """The scores' dequantize, reshape and mask add run in the softmax kernel (MiniLM int8:
    one 21 us pass a layer less): the same bits as the kernel reading the float32 scores."""
    rng = np.random.default_rng(2)
    s = rng.integers(-3000, 3000, (3, 4, 32)).astype("int32")
    m = np.where(rng.random((1, 1, 4, 32)) > 0.3, 0.0, -np.inf).astype("float32")
    m[..., 1, :] = -np.inf  # a fully masked row
    args = (s, m) if mask else (s,)
    fused = QuantizedSoftmax()(_scores_softmax(32, mask))
    names = [gv.name_hint for gv in fused.get_global_vars()]
    assert "relax.dequantize" not in _ops(fused) and "relax.add" not in _ops(fused)
    assert any(n.startswith("quantized_softmax_of_scores") for n in names), names
    apart = QuantizedSoftmax()(_scores_softmax(32, mask, second_reader=True))
    assert "relax.dequantize" in _ops(apart)
    got = _run(fused, *args)
    ex = relax.build(apart, target=_LLVM)
    want = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(a) for a in args))
    np.testing.assert_array_equal(got, want[0].numpy())
    x = s.astype("float32") * np.float32(0.01) + (m[0] if mask else 0)
    ref = _reference(x.astype("float64"), 1 / 255, 0, "uint8")
    assert np.abs(got - ref).max() <= 1 and len(np.unique(got)) > 20


def test_padded_score_rows_keep_their_dequantize():
    """Rows the softmax kernel pads (33 keys) read the float32 scores: fused ops there would
    take a branch per element."""
    out = QuantizedSoftmax()(_scores_softmax(33, mask=True))
    assert "relax.dequantize" in _ops(out) and "relax.quantize" not in _ops(out)
