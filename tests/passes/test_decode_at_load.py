"""Weights decoded at load: FoldTableDecoders, DecodeAtLoad and ClusterInt8Weights, vs numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.build import build_with_info
from tvmq.errors import TvmqError
from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes import ClusterInt8Weights, ClusterWeights, DecodeAtLoad, FoldTableDecoders
from tvmq.passes.cluster_int8_weights import cluster_int8_tensor
from tvmq.passes.cluster_weights import ATTR, cluster_tensor
from tvmq.passes.decode_at_load import FUNCTION, decode_values, encode_values
from tvmq.passes.quantize_weight_only import DECODER_ATTR
from tvmq.runtime import DECODE_AT_LOAD, decoded_params


@pytest.mark.parametrize(
    ("dtype", "distinct", "size", "bits"),
    [("float32", 16, 1001, 4), ("float32", 200, 640, 8), ("int8", 9, 77, 4), ("float32", 1, 5, 4)],
)
def test_encode_decode_roundtrip_is_exact(dtype, distinct, size, bits):
    rng = np.random.default_rng(distinct)
    values = rng.standard_normal(distinct).astype(np.float32)
    if dtype == "int8":
        values = rng.choice(np.arange(-127, 128), distinct, replace=False).astype(np.int8)
    w = rng.choice(values, size).reshape(-1, 1) if size % 7 else rng.choice(values, size)
    packed, table, got_bits = encode_values(w, 8 if dtype == "float32" else 4)
    assert got_bits == bits and table.dtype == w.dtype
    assert packed.dtype == np.uint8 and packed.size == (size + 1) // 2 if bits == 4 else size
    np.testing.assert_array_equal(decode_values(packed, table, bits, w.shape), w)


def test_too_many_values_are_not_encoded():
    w = np.arange(300, dtype=np.float32)
    assert encode_values(w, 8) is None
    assert encode_values(np.arange(17, dtype=np.int8), 4) is None


def _mlp(d_in, hidden, d_out):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, d_out)
    ).eval()


def _clustered_reference(model, x, bits):
    h = x
    for i, layer in enumerate((model[0], model[2])):
        codebook, idx = cluster_tensor(layer.weight.detach().numpy(), bits)
        h = h @ codebook[idx].T + layer.bias.detach().numpy()
        if i == 0:
            h = np.maximum(h, 0)
    return h


def test_fold_table_decoders_gives_the_clustered_weight_and_drops_the_decoders():
    model = _mlp(48, 33, 10)
    mod = ClusterWeights(bits=3, min_size=0)(from_pytorch(model, (torch.zeros(2, 48),)).mod)
    folded = FoldTableDecoders()(mod)
    decoders = [f for _, f in folded.functions_items() if f.attrs and DECODER_ATTR in f.attrs]
    assert decoders == []
    consts = []

    @relax.expr_functor.visitor
    class _Consts(relax.expr_functor.PyExprVisitor):
        def visit_generic_const_(self, const):
            consts.append(const.value.numpy())

    _Consts().visit_expr(folded["main"])
    codebook, idx = cluster_tensor(model[0].weight.detach().numpy(), 3)
    assert any(c.shape == idx.shape and np.array_equal(c, codebook[idx]) for c in consts)


@pytest.mark.parametrize(("m", "k", "n"), [(1, 784, 128), (64, 256, 512)])
def test_clustered_build_decodes_at_load_and_runs_the_float_kernels(m, k, n):
    """A small matmul (default schedule) and one large enough for PackFloatDense."""
    model = _mlp(k, n, 10)
    mod = ClusterWeights(bits=4)(from_pytorch(model, (torch.zeros(m, k),)).mod)
    ex, info = build_with_info(mod, "host", tuning_logs=None)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    assert FUNCTION == DECODE_AT_LOAD and vm.module.implements_function(FUNCTION)
    params = decoded_params(vm)
    assert len(params) == 2  # both weights (the biases are too small)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x), *params)[0].numpy()
    np.testing.assert_allclose(got, _clustered_reference(model, x, 4), rtol=1e-4, atol=1e-4)
    weights = dict(info.weights)
    assert weights["float32"] < 4 * (n + 10 + 2 * 16) + 64  # biases and two tables only
    assert weights["uint8"] == (k * n + n * 10) // 2  # 4-bit codes
    if m * k * n >= 1 << 20:
        assert any(name.startswith("tvmq_float_dense") for name in info.prescheduled)


def test_decode_at_load_leaves_other_constants_and_is_a_no_op_twice():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 300), "float32"))
    rng = np.random.default_rng(0)
    few = rng.choice(np.float32([0.5, -1.0, 2.0]), (300, 300))
    many = rng.standard_normal((300, 300)).astype(np.float32)
    shared = relax.const(few)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, shared))
            y = bb.emit(relax.op.matmul(y, relax.const(many)))
            out = bb.emit_output(relax.op.matmul(y, shared))
        bb.emit_func_output(out)
    mod = bb.get()
    once = DecodeAtLoad()(mod)
    assert len(once["main"].params) == 2  # x, then the one few-valued constant (used twice)
    assert int(once["main"].attrs["num_input"]) == 1
    tvm.ir.assert_structural_equal(DecodeAtLoad()(once), once)
    ex = relax.build(once, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xv = rng.standard_normal((2, 300)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(xv), *decoded_params(vm)).numpy()
    np.testing.assert_allclose(got, xv @ few @ many @ few, rtol=1e-4, atol=1e-3)


def _int8_linear(q: np.ndarray):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, q.shape[1]), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(relax.const(q, "int8")))
            out = bb.emit_output(relax.op.matmul(x, wt, out_dtype="int32"))
        bb.emit_func_output(out)
    return bb.get()


def test_cluster_int8_weights_shares_at_most_16_integer_levels():
    rng = np.random.default_rng(0)
    q = np.clip(np.rint(rng.standard_normal((40, 64)) * 40), -127, 127).astype(np.int8)
    after = ClusterInt8Weights(bits=4)(_int8_linear(q))
    record = after["main"].attrs[ATTR]["matmul_0"]
    assert int(record["distinct"]) <= 16 and int(record["bytes_after"]) == 16 + 40 * 64 // 2
    x = rng.integers(0, 256, (3, 64)).astype(np.uint8)
    ex = relax.build(after, target=tvm.target.Target({"kind": "llvm"}))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    table, idx = cluster_int8_tensor(q, 4)
    shared = table[idx]
    np.testing.assert_array_equal(got, x.astype(np.int32) @ shared.T.astype(np.int32))
    # independent checks of the codebook: integers in q's range, zeros kept, nearest level
    assert table.size <= 16 and table.min() >= q.min() and table.max() <= q.max()
    assert np.all(shared[q == 0] == 0)
    dist = np.abs(q.astype(np.int32)[..., None] - table.astype(np.int32))
    np.testing.assert_array_equal(np.abs(q.astype(np.int32) - shared), dist.min(axis=-1))
    # near the optimum of 16 levels on a Gaussian (Lloyd-Max: RMS error 0.097 sigma)
    assert np.sqrt(np.mean((q - shared.astype(np.float64)) ** 2)) < 0.11 * q.std()


def test_cluster_int8_weights_refuses_more_than_16_levels():
    with pytest.raises(TvmqError, match="at most 16"):
        ClusterInt8Weights(bits=5)
    with pytest.raises(TvmqError, match="init"):
        ClusterInt8Weights(init="uniform")


def _basic_block(c: int, integer_weights: bool) -> tuple[torch.nn.Module, tvm.IRModule]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(c, c, 3, padding=1)
    ).eval()
    if integer_weights:  # an int8 model's weights on the float kernels are integers
        with torch.no_grad():
            for conv in (model[0], model[2]):
                conv.weight.copy_(torch.randint(-127, 128, conv.weight.shape).float())
    return model, from_pytorch(model, (torch.zeros(1, c, 10, 10),)).mod


@pytest.mark.parametrize("integer_weights", [False, True], ids=["float", "integer"])
def test_winograd_panels_are_computed_at_load_from_the_3x3_weights(integer_weights):
    """A library (``int8_weight_codes``, as tvmq.compile builds it) stores a Winograd conv's
    3x3 weight, not its 16/9 as large panels, and ``main_transform_params`` transforms it:
    the same panels for integer weights (stored as 8-bit codes; outputs bit-identical to the
    build that embeds the panels), within float32's rounding of them otherwise."""
    c = 32
    model, mod = _basic_block(c, integer_weights)
    embedded, _ = build_with_info(mod, "host", tuning_logs=None)
    lifted, info = build_with_info(mod, "host", tuning_logs=None, int8_weight_codes=True)
    vm = relax.VirtualMachine(lifted, tvm.cpu())
    params = decoded_params(vm)
    assert [(p.shape[0], p.shape[4]) for p in params] == [(16, c)] * 2  # both convs' panels
    weights = dict(info.weights)
    if integer_weights:
        assert weights["uint8"] >= 2 * c * c * 9  # one code a 3x3 weight
        assert weights.get("float32", 0) < 4 * c * c * 9  # not the weights
    else:
        assert 2 * 4 * c * c * 9 <= weights["float32"] < 2 * 4 * c * c * 16  # 3x3, not panels
    x = np.random.default_rng(1).standard_normal((1, c, 10, 10)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x), *params)[0].numpy()
    want = relax.VirtualMachine(embedded, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()
    if integer_weights:
        np.testing.assert_array_equal(got, want)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
