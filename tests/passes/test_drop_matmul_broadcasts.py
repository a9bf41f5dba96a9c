"""DropMatmulBroadcasts: torch's expand + bmm form of a Linear becomes a plain weight matmul."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.passes import DropMatmulBroadcasts
from tvmq.passes.sites import list_weight_sites


def _module(w_shape, w_to, x_shape=(2, 5, 8)):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.broadcast_to(x, x_shape))
            b = bb.emit(relax.op.broadcast_to(relax.const(w), w_to))
            y = bb.emit_output(relax.op.matmul(a, b))
        bb.emit_func_output(y)
    return bb.get(), w


def _run(mod, x):
    ex = relax.build(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def test_batch_broadcasts_are_dropped_and_the_result_is_unchanged():
    mod, w = _module((8, 4), (2, 8, 4))
    out = DropMatmulBroadcasts()(mod)
    text = out["main"].script()
    assert "broadcast_to" not in text and "R.matmul(x, metadata" in text
    assert len(list_weight_sites(out["main"])) == 1 and not list_weight_sites(mod["main"])
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), x @ w, rtol=1e-5, atol=1e-5)
    assert DropMatmulBroadcasts()(out).same_as(out)  # nothing left to drop


def test_broadcasts_that_change_the_matrix_stay():
    mod, w = _module((1, 4), (2, 8, 4))  # a row repeated into the matrix: not a batch repeat
    out = DropMatmulBroadcasts()(mod)
    text = out["main"].script()
    assert text.count("R.broadcast_to(") == 1 and "R.matmul(x, " in text  # x's no-op went
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(
        _run(out, x), x @ np.broadcast_to(w, (2, 8, 4)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_bert_attention_output_is_a_weight_site_at_batch_2():
    """At batch > 1 torch.export writes BERT's attention output projection (SDPA attention, as
    all-MiniLM-L6-v2 loads) as expand + bmm; imported, it is a weight site with its layer name."""
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import zoo

    from tvmq.frontends import import_model

    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=200, initializer_range=0.1, attn_implementation="sdpa",  # MiniLM's default
    )  # fmt: skip
    torch.manual_seed(0)
    model = zoo._HiddenStates(transformers.BertModel(cfg, add_pooling_layer=False)).eval()
    ids, mask = zoo.token_inputs(2, 16, 200, seed=100)
    imported = import_model(model, example_inputs=(ids, mask))
    names = [s.layer_names for s in list_weight_sites(imported.mod["main"])]
    assert ("model.encoder.layer.0.attention.output.dense",) in names and len(names) == 6
    # the weight is not copied per batch row any more: no [2, 32, 32] broadcast
    assert 'R.Tensor((2, 32, 32), dtype="float32") = R.broadcast_to' not in (
        imported.mod["main"].script()
    )
    ex = relax.build(imported.mod, target=tvm.target.Target({"kind": "llvm"}))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](
        tvm.runtime.tensor(ids.numpy()), tvm.runtime.tensor(mask.numpy())
    )
    out = out if hasattr(out, "numpy") else out[0]
    with torch.no_grad():
        np.testing.assert_allclose(out.numpy(), model(ids, mask).numpy(), rtol=1e-4, atol=1e-4)
