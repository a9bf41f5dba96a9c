"""The model's own layer names: recorded by the frontends, carried by the sites, matched by skip.

One small PyTorch model with nested submodules (``encoder.0.fc``, ``encoder.1.fc``,
``classifier``), imported through ``torch.export`` (also from a ``.pt2`` file) and through
ONNX (both exporters): the sites carry the names, ``skip=("classifier*",)`` keeps exactly
that layer float in the IR and the report while the output still matches PyTorch, old
``matmul_2`` names work as before, and a pattern that matches nothing is one clear error.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax

from tvmq.compression import apply_compression
from tvmq.core import qmath
from tvmq.core.compression import PruneConfig
from tvmq.core.schemes import Int8Static, WeightOnly
from tvmq.errors import TvmqError
from tvmq.frontends import import_model
from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes import SmoothQuant
from tvmq.passes.sites import module_weight_sites
from tvmq.quantization.quantize import quantize

HOST = tvm.target.Target({"kind": "llvm"})
TORCH_NAMES = [("encoder.0.fc",), ("encoder.1.fc",), ("classifier",)]


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(Block(), Block())
        self.classifier = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(self.encoder(x))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def calib():
    return np.random.default_rng(0).standard_normal((64, 32)).astype("float32")


def _onnx(model, dynamo: bool):
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(8, 32),), buf, input_names=["x"], dynamo=dynamo, verbose=False
        )
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module")
def imported(net):
    """torch.export and legacy-exporter ONNX imports of the same model."""
    return {
        "torch": from_pytorch(net, (torch.zeros(8, 32),)),
        "onnx": import_model(_onnx(net, dynamo=False)),
    }


def _names(mod) -> list[tuple[str, ...]]:
    return [s.layer_names for s in module_weight_sites(mod)]


def test_torch_export_names_are_module_paths(net, imported):
    mod = imported["torch"].mod
    assert [s.name for s in module_weight_sites(mod)] == ["matmul_0", "matmul_1", "matmul_2"]
    assert _names(mod) == TORCH_NAMES
    # Naming imports the parameters as inputs, then binds them: the same module as before.
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.export(net, (torch.zeros(8, 32),))
    plain = from_exported_program(ep, keep_params_as_input=False)
    assert tvm_ffi.structural_equal(mod["main"], plain["main"])


def test_pt2_file_keeps_names(net, tmp_path):
    torch.export.save(torch.export.export(net, (torch.zeros(8, 32),)), tmp_path / "m.pt2")
    assert _names(import_model(tmp_path / "m.pt2").mod) == TORCH_NAMES


def test_tied_weight_is_named_by_the_module_using_it():
    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.proj = torch.nn.Linear(16, 16)
            self.lm_head = torch.nn.Linear(16, 50, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, ids):
            return self.lm_head(torch.relu(self.proj(self.embed(ids))))

    m = from_pytorch(LM().eval(), (torch.zeros(2, 4, dtype=torch.int64),))
    assert _names(m.mod) == [("proj",), ("lm_head",)]


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_onnx_names_are_node_names_and_weight_names(net, dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")
    names = _names(import_model(_onnx(net, dynamo)).mod)
    if dynamo:  # node names are made up; the module path comes from the node's metadata
        assert [n[1:] for n in names] == TORCH_NAMES
        assert all(n[0].startswith("node_") for n in names)
    else:
        nodes = ["/encoder/encoder.0/fc/Gemm", "/encoder/encoder.1/fc/Gemm", "/classifier/Gemm"]
        assert names == [(node, *path) for node, path in zip(nodes, TORCH_NAMES, strict=True)]


def _float_reference(net, x):
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def _run(mod, x):
    out = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())["main"](
        tvm.runtime.tensor(x)
    )
    return (out[0] if not hasattr(out, "numpy") else out).numpy()


def _matmul_dtypes(mod) -> list[str]:
    out = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            if getattr(getattr(b.value, "op", None), "name", None) == "relax.matmul":
                out.append(str(b.value.ty.dtype))
    return out


@pytest.mark.parametrize("source", ["torch", "onnx"])
def test_skip_by_own_name_keeps_exactly_that_layer_float(net, imported, calib, source):
    model = imported[source]
    q = quantize(model, calib, Int8Static(skip=("classifier*",)), progress=False, evaluate=False)
    layers = q.report.layers
    assert [r.quantized for r in layers] == [True, True, False]
    assert layers[2].reason == "skipped by the scheme"
    assert [r.source for r in layers] == [n[0] for n in _names(model.mod)]
    assert q.describe()["layers"][2]["source"] == layers[2].source  # model.json's layers
    assert layers[2].source in q.report.summary()
    assert _matmul_dtypes(q.mod) == ["int32", "int32", "float32"]
    # Old names keep working, to the same effect.
    old = quantize(model, calib, Int8Static(skip=("matmul_2",)), progress=False, evaluate=False)
    assert [r.quantized for r in old.report.layers] == [True, True, False]
    # Still the float model within int8 tolerance.
    x = calib[:8]
    ref, got = _float_reference(net, x), _run(q.mod, x)
    assert qmath.sqnr(ref, got) > 25.0
    np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())


def test_skip_glob_over_module_paths_in_weight_only(imported):
    q = quantize(imported["torch"], None, WeightOnly(skip=("encoder.*",)), progress=False)
    assert [r.quantized for r in q.report.layers] == [False, False, True]


def test_unknown_pattern_is_one_error_listing_names(imported, calib):
    with pytest.raises(TvmqError) as e:
        quantize(imported["torch"], calib, Int8Static(skip=("clasifier*",)), progress=False)
    msg = str(e.value)
    assert "'clasifier*' matches no layer" in msg and "matmul_2 [classifier]" in msg
    with pytest.raises(TvmqError, match="'decoder.*' matches no layer"):
        apply_compression(imported["torch"].mod, prune=PruneConfig(skip=("decoder.*",)))
    # Op kinds are never an error: a model may have none of them.
    q = quantize(imported["torch"], None, WeightOnly(skip=("conv2d",)), progress=False)
    assert all(r.quantized for r in q.report.layers)


@pytest.mark.parametrize("source", ["torch", "onnx"])
def test_prune_skip_by_own_name(imported, source):
    mod = imported[source].mod
    config = PruneConfig(sparsity=0.5, min_size=0, skip=("encoder.1.fc",))
    _, report = apply_compression(mod, prune=config)
    sites = report["sparsity"]["sites"]
    assert [round(sites[n]["sparsity"], 2) for n in ("matmul_0", "matmul_1", "matmul_2")] == [
        0.5,
        0.0,
        0.5,
    ]
    assert sites["matmul_1"]["source"] == _names(mod)[1][0]
    # Channel pruning: the skipped layer keeps its output channels.
    config = PruneConfig(method="channels", ratio=0.25, skip=("encoder.1.*",))
    out, report = apply_compression(mod, prune=config)
    assert set(report["channels"]["pruned"]) == {"matmul_0"}
    assert report["channels"]["skipped"]["matmul_1"] == "skipped by the config"
    assert _names(out) == _names(mod)
    assert [s.weight.shape for s in module_weight_sites(out)] == [(32, 24), (24, 32), (32, 10)]


def test_names_survive_smoothing(imported):
    mod = imported["torch"].mod
    absmax = {"matmul_1": np.linspace(0.1, 4.0, 32).astype("float32")}
    smoothed = SmoothQuant(absmax, (("matmul_1", 0.5),))(mod)
    assert not tvm_ffi.structural_equal(smoothed["main"], mod["main"])
    assert _names(smoothed) == TORCH_NAMES
