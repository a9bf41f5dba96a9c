"""One site model: pruning, weight sharing and quantization name the same layers."""

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmq.core.compression import PruneConfig
from tvmq.passes import AnnotateQDQ, ClusterWeights, PruneMagnitude, QuantizeWeightOnly
from tvmq.passes.relax_utils import binding_map, op_name, ordered_bindings, resolve
from tvmq.passes.sites import module_weight_sites


def _model() -> tvm.IRModule:
    """Four matmuls: a Linear (permuted weight), a reshaped weight, a float16 one, a plain one."""
    rng = np.random.default_rng(0)

    def const(*shape, dtype="float32"):
        return relax.const(rng.standard_normal(shape).astype(dtype), dtype)

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 32), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w0 = bb.emit(relax.op.permute_dims(const(16, 32), [1, 0]))
            a = bb.emit(relax.op.matmul(x, w0), name_hint="linear")
            w1 = bb.emit(relax.op.reshape(const(4, 4, 16), (16, 16)))
            b = bb.emit(relax.op.matmul(a, w1), name_hint="reshaped")
            b16 = bb.emit(relax.op.astype(b, "float16"))
            c16 = bb.emit(relax.op.matmul(b16, const(16, 16, dtype="float16")), name_hint="half")
            c = bb.emit(relax.op.astype(c16, "float32"))
            d = bb.emit(relax.op.matmul(c, const(16, 8)), name_hint="plain")
            out = bb.emit_output(d)
        bb.emit_func_output(out)
    return bb.get()


def _weight_is(mod, layer: str, pred) -> bool:
    func = mod["main"]
    bindings = binding_map(func)
    (value,) = [b.value for b in ordered_bindings(func) if b.var.name == layer]
    return pred(resolve(value.args[1], bindings), bindings)


def _dense(expr, bindings) -> bool:
    while op_name(expr) in ("relax.permute_dims", "relax.reshape"):
        expr = resolve(expr.args[0], bindings)
    return isinstance(expr, tvm.ir.Constant) and np.count_nonzero(expr.value.numpy() == 0) == 0


def _float_weight(expr, bindings) -> bool:
    return op_name(expr) != "relax.dequantize"


LAYERS = {"matmul_0": "linear", "matmul_1": "reshaped", "matmul_2": "plain"}


def test_sites_see_through_reshape_and_skip_other_dtypes():
    sites = module_weight_sites(_model())
    assert [(s.name, s.var.name) for s in sites] == list(LAYERS.items())
    reshaped = sites[1]
    assert reshaped.perm is None and reshaped.weight.shape == (16, 16)
    back = reshaped.const_from_op_layout(reshaped.weight)
    np.testing.assert_array_equal(back.value.numpy(), reshaped.const.value.numpy())


@pytest.mark.parametrize("name", list(LAYERS))
def test_prune_and_quantize_skip_the_same_layer(name):
    mod = _model()
    layer = LAYERS[name]
    config = PruneConfig("magnitude", sparsity=0.5, min_size=0, skip=(name,))
    pruned = PruneMagnitude(config.sparsity, config.scope, config.min_size, config.skip)(mod)
    assert [lay for lay in LAYERS.values() if _weight_is(pruned, lay, _dense)] == [layer]

    qparams = {site: (0.05, 0) for site in LAYERS}
    annotated = AnnotateQDQ(qparams, skip=(name,))(mod)
    assert [lay for lay in LAYERS.values() if _weight_is(annotated, lay, _float_weight)] == [layer]

    decoded = QuantizeWeightOnly(skip=(name,))(mod)
    clustered = ClusterWeights(bits=2, min_size=0, skip=(name,))(mod)
    for after in (decoded, clustered):
        kept = [s.var.name for s in module_weight_sites(after)]
        assert kept == [layer], kept
