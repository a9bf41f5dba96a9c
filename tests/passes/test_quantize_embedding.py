"""QuantizeEmbedding: int8 rows + per-row scales, gathered and decoded, vs numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmq.passes import QuantizeEmbedding
from tvmq.passes.quantize_embedding import ATTR, quantize_rows
from tvmq.passes.relax_utils import is_tensor_const

HOST = tvm.target.Target({"kind": "llvm"})


def _embedding(table: np.ndarray, ids_shape=(2, 7)) -> tvm.IRModule:
    ids = relax.Var("ids", relax.TensorType(ids_shape, "int64"))
    bb = relax.BlockBuilder()
    with bb.function("main", [ids]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.take(relax.const(table), ids, axis=0))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, ids):
    ex = tvm.compile(mod, target=HOST)
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(ids)).numpy()


def _constant_bytes(mod) -> int:
    consts = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: consts.append(e) if is_tensor_const(e) else None
    )
    return sum(c.value.numpy().nbytes for c in consts)


def test_gathered_rows_match_numpy_and_the_table_shrinks(rng):
    table = rng.standard_normal((1000, 96)).astype(np.float32)
    table[5] = 0.0  # an all-zero row keeps a scale of 1
    mod = _embedding(table)
    out_mod = QuantizeEmbedding(min_size=1)(mod)
    assert [list(s) for s in out_mod["main"].attrs[ATTR]] == [[1000, 96]]
    assert _constant_bytes(out_mod) < table.nbytes / 3.5
    ids = rng.integers(0, 1000, (2, 7)).astype(np.int64)
    ids[0, 0] = 5
    got = _run(out_mod, ids)
    q, s = quantize_rows(table)
    np.testing.assert_array_equal(got, q[ids].astype(np.float32) * s[ids])  # exact decode
    want = table[ids]
    snr = 20 * np.log10(np.linalg.norm(want) / np.linalg.norm(got - want))
    assert snr > 40  # int8 per row
    assert np.all(got[0, 0] == 0.0)


@pytest.mark.parametrize("shape,dtype", [((100, 8), "float32"), ((1000, 96), "float16")])
def test_small_or_non_float32_tables_are_left_alone(rng, shape, dtype):
    mod = _embedding(rng.standard_normal(shape).astype(dtype))
    assert QuantizeEmbedding()(mod).same_as(mod)


def test_idempotent(rng):
    once = QuantizeEmbedding(min_size=1)(_embedding(rng.standard_normal((300, 16)).astype("f4")))
    assert QuantizeEmbedding(min_size=1)(once).same_as(once)
