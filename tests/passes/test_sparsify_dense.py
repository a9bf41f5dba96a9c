"""SparsifyDense + BSR kernels: exact packing, kernels equal dense numpy, pass structure and numerics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.build import build, export_library
from tvmq.kernels.sparse import (
    block_sparsity,
    bsr_dense_rows,
    bsr_dense_tiled,
    choose_bsr_tiles,
    from_bsr,
    kernel_arrays,
    pack_bsr,
    simd_lanes,
    to_bsr,
)
from tvmq.passes.relax_utils import is_tensor_const
from tvmq.passes.sparsify_dense import SPARSE_ATTR, SparsifyDense

HOST = tvm.target.Target.from_device(tvm.cpu())
LANES = simd_lanes(HOST)


def _block_sparse(rng, n, k, block, sparsity):
    """Random (N, K) float32 weight whose zero pattern is a random mask of ``block`` tiles."""
    bs_r, bs_c = block
    keep = rng.random((-(-n // bs_r), -(-k // bs_c))) >= sparsity
    mask = np.kron(keep, np.ones(block, dtype=bool))[:n, :k]
    return (rng.standard_normal((n, k)) * mask).astype("float32")


def _unstructured(rng, n, k, sparsity):
    w = rng.standard_normal((n, k)).astype("float32")
    w[rng.random((n, k)) < sparsity] = 0.0
    return w


def _run_kernel(x: np.ndarray, w: np.ndarray, block, variant: str) -> np.ndarray:
    """``x @ w.T`` through one BSR kernel built for the host, padding as the pass does."""
    m, k = x.shape
    packed = pack_bsr(w, block)
    n_pad, k_pad = packed.padded_shape
    data, indices, indptr = kernel_arrays(packed)
    if variant == "tiled":
        tiles = choose_bsr_tiles(m, block[0], LANES)
        m_out = tiles.m_padded
        func = bsr_dense_tiled(m_out, k_pad, n_pad, len(indices), block, tiles.mt)
    else:
        m_out = m
        func = bsr_dense_rows(m, k_pad, n_pad, len(indices), block)
    xp = np.zeros((m_out, k_pad), "float32")
    xp[:m, :k] = x
    if variant == "tiled":
        xp = np.ascontiguousarray(xp.T)
    func = func.with_attr("global_symbol", "main")  # the pass names kernels; here we do
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=HOST)
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.full((m_out, n_pad), np.nan, "float32"), dev)
    args = [tvm.runtime.tensor(a, dev) for a in (xp, data, indices, indptr)]
    lib["main"](*args, y)
    return y.numpy()[:m, : w.shape[0]]


# ------------------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("block", [(1, 1), (4, 1), (16, 1), (2, 4)])
def test_bsr_round_trip_with_padding_and_empty_rows(rng, block):
    w = _block_sparse(rng, 37, 21, block, 0.7)
    w[:8] = 0.0  # empty block rows
    data, indices, indptr = to_bsr(w, block)
    assert data.shape[1:] == block and data.dtype == np.float32
    assert indices.dtype == np.int32 and indptr.dtype == np.int32
    assert indptr[0] == 0 and indptr[-1] == len(indices) == len(data)
    assert np.all(np.diff(indptr) >= 0)
    np.testing.assert_array_equal(from_bsr(data, indices, indptr, w.shape), w)


def test_block_sparsity_counts_zero_tiles():
    w = np.zeros((32, 8), "float32")
    w[0, 0] = 1.0  # one non-zero: one 16x1 tile of 16
    assert block_sparsity(w, (16, 1)) == pytest.approx(1 - 1 / 16)
    assert block_sparsity(w, (1, 1)) == pytest.approx(1 - 1 / 256)
    assert block_sparsity(np.zeros((5, 3), "float32"), (4, 1)) == 1.0


# ------------------------------------------------------------------------------------
# kernels vs dense numpy


KERNEL_CASES = [
    # (M, K, N, block, sparsity, pattern)
    (128, 96, 64, (16, 1), 0.8, "block"),
    (128, 96, 64, (4, 1), 0.5, "block"),
    (128, 96, 64, (1, 1), 0.9, "unstructured"),
    (1, 96, 64, (16, 1), 0.8, "block"),
    (1, 50, 37, (4, 1), 0.7, "unstructured"),  # ragged N and K
    (3, 33, 45, (16, 1), 0.6, "block"),  # ragged everything, small M
    (37, 30, 21, (4, 2), 0.6, "block"),  # ragged M for the tiled kernel, bs_c > 1
    (128, 40, 48, (1, 1), 0.95, "unstructured"),
]


@pytest.mark.parametrize("variant", ["tiled", "rows"])
@pytest.mark.parametrize(("m", "k", "n", "block", "sparsity", "pattern"), KERNEL_CASES)
def test_kernel_matches_dense(rng, variant, m, k, n, block, sparsity, pattern):
    if pattern == "block":
        w = _block_sparse(rng, n, k, block, sparsity)
    else:
        w = _unstructured(rng, n, k, sparsity)
    w[: 2 * block[0]] = 0.0  # at least two empty block rows
    x = rng.standard_normal((m, k)).astype("float32")
    got = _run_kernel(x, w, block, variant)
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-4)
    assert np.all(got[:, : 2 * block[0]] == 0.0)


@pytest.mark.parametrize("variant", ["tiled", "rows"])
def test_kernel_all_zero_weight(rng, variant):
    x = rng.standard_normal((20, 24)).astype("float32")
    got = _run_kernel(x, np.zeros((19, 24), "float32"), (4, 1), variant)
    np.testing.assert_array_equal(got, np.zeros((20, 19), "float32"))


def test_kernels_are_marked_scheduled():
    func = bsr_dense_tiled(32, 8, 16, 3, (16, 1), 16)
    assert bool(func.attrs["tirx.is_scheduled"])
    assert str(func.attrs["tvmq.kernel"]) == "bsr_dense_tiled"
    with pytest.raises(ValueError):
        bsr_dense_tiled(30, 8, 16, 3, (16, 1), 16)  # M not a multiple of the tile


# ------------------------------------------------------------------------------------
# the pass


def _matmul_module(x_shape, w_nk: np.ndarray, transposed_const: bool = True) -> tvm.IRModule:
    """``main(x) = matmul(x, W) + 1`` with W given as permute_dims(W[N, K]) or a [K, N] const."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if transposed_const:
                w = bb.emit(relax.op.permute_dims(relax.const(w_nk, "float32"), [1, 0]))
            else:
                w = relax.const(np.ascontiguousarray(w_nk.T), "float32")
            y = bb.emit(relax.op.matmul(x, w))
            y = bb.emit(relax.op.add(y, relax.const(1.0, "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _call_tirs(func: relax.Function) -> list:
    calls = []
    relax.analysis.post_order_visit(
        func.body,
        lambda e: (
            calls.append(e)
            if isinstance(e, relax.Call) and e.op.same_as(tvm.ir.Op.get("relax.call_tir"))
            else None
        ),
    )
    return calls


def _records(mod):
    return [dict(r) for r in mod["main"].attrs[SPARSE_ATTR]]


def _run(mod, x, preset="host"):
    vm = relax.VirtualMachine(build(mod, preset), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return (out if hasattr(out, "numpy") else out[0]).numpy()  # torch imports return a tuple


@pytest.mark.parametrize("transposed_const", [True, False])
@pytest.mark.parametrize("x_shape", [(128, 48), (1, 48), (2, 5, 48), (20, 48)])
def test_pass_rewrites_sparse_weight(rng, x_shape, transposed_const):
    w = _block_sparse(rng, 40, 48, (16, 1), 0.9)
    mod = _matmul_module(x_shape, w, transposed_const)
    out = SparsifyDense(min_sparsity=0.8, block=(16, 1), target=HOST)(mod)
    assert len(_call_tirs(out["main"])) == 1
    [record] = _records(out)
    assert record["layer"] == "matmul_0" and bool(record["chosen"])
    assert record["block"] == "16x1" and float(record["sparsity"]) >= 0.8
    assert list(record["shape"]) == [40, 48]
    # The dense weight (40 x 48) left the module.
    consts = []
    relax.analysis.post_order_visit(
        out["main"].body, lambda e: consts.append(e) if is_tensor_const(e) else None
    )
    assert not any(tuple(c.value.shape) in ((40, 48), (48, 40)) for c in consts)
    x = rng.standard_normal(x_shape).astype("float32")
    np.testing.assert_allclose(_run(out, x), x @ w.T + 1.0, rtol=1e-5, atol=1e-4)


def test_pass_keeps_dense_weight_below_threshold(rng):
    w = _unstructured(rng, 64, 48, 0.9)  # 16x1 tiles of an unstructured 90% weight: few empty
    mod = _matmul_module((4, 48), w)
    out = SparsifyDense(min_sparsity=0.8, block=(16, 1), target=HOST)(mod)
    assert not _call_tirs(out["main"])
    [record] = _records(out)
    assert not bool(record["chosen"]) and "< min_sparsity" in str(record["reason"])
    # ...and the same weight qualifies with 1x1 blocks.
    out = SparsifyDense(min_sparsity=0.8, block=(1, 1), target=HOST)(mod)
    assert len(_call_tirs(out["main"])) == 1


def test_pass_is_idempotent_and_noop_without_sites(rng):
    mod = _matmul_module((8, 48), _block_sparse(rng, 40, 48, (16, 1), 0.9))
    once = SparsifyDense(target=HOST)(mod)
    tvm.ir.assert_structural_equal(SparsifyDense(target=HOST)(once), once)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        y = bb.emit(relax.op.add(x, x))
        bb.emit_func_output(y)
    plain = bb.get()
    assert SparsifyDense(target=HOST)(plain).same_as(plain)
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host={"kind": "llvm"})
    assert SparsifyDense(target=cuda)(mod).same_as(mod)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 96)
        self.fc2 = torch.nn.Linear(96, 80)
        self.fc3 = torch.nn.Linear(80, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("batch", [1, 32])
def test_mlp_matches_torch(rng, batch):
    import tvmq

    torch.manual_seed(0)
    model = _MLP().eval()
    with torch.no_grad():  # fc1, fc2: 90% sparse in 16x1 tiles; fc3 stays dense
        for fc in (model.fc1, model.fc2):
            w = fc.weight.numpy()
            fc.weight.copy_(torch.from_numpy(w * (_block_sparse(rng, *w.shape, (16, 1), 0.9) != 0)))
    x = rng.standard_normal((batch, 64)).astype("float32")
    mod = tvmq.import_model(model, example_inputs=(torch.from_numpy(x),)).mod
    out = SparsifyDense(min_sparsity=0.8, block=(16, 1), target=HOST)(mod)
    records = {str(r["layer"]): bool(r["chosen"]) for r in _records(out)}
    assert records == {"matmul_0": True, "matmul_1": True, "matmul_2": False}
    assert len(_call_tirs(out["main"])) == 2
    got = _run(out, x)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_builds_for_rasp4b_aarch64(tmp_path, rng):
    import shutil

    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no aarch64 cross compiler")
    mod = _matmul_module((16, 48), _block_sparse(rng, 40, 48, (4, 1), 0.9))
    from tvmq.targets import get_target

    target = get_target("rasp4b").tvm_target()
    out = SparsifyDense(min_sparsity=0.8, block=(4, 1), target=target)(mod)
    assert len(_call_tirs(out["main"])) == 1
    path = tmp_path / "sparse.so"
    export_library(build(out, "rasp4b"), path, "rasp4b")
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
