import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.errors import TvmqError, UnsupportedOperatorError
from tvmq.frontends import import_model
from tvmq.frontends.pytorch import from_pytorch


def _run_host(mod, *arrays):
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
    return out[0].numpy()


def test_mlp_matches_pytorch(small_mlp, rng):
    x = rng.standard_normal((2, 32)).astype("float32")
    m = from_pytorch(small_mlp, (torch.from_numpy(x),))
    assert m.source == "pytorch"
    assert [(s.name, s.shape, s.dtype) for s in m.inputs] == [("x", (2, 32), "float32")]
    assert [(s.shape, s.dtype) for s in m.outputs] == [((2, 10), "float32")]
    with torch.no_grad():
        ref = small_mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run_host(m.mod, x), ref, atol=1e-5, rtol=1e-5)


def test_weights_are_constants(small_mlp):
    m = from_pytorch(small_mlp, torch.zeros(1, 32))
    assert len(m.mod["main"].params) == 1  # only the data input; weights are bound
    assert "metadata" in m.mod.script(show_meta=False)


def test_cnn_with_batchnorm_matches_pytorch(rng):
    from tvmq.demo import make_cnn

    torch.manual_seed(0)
    cnn = make_cnn().eval()
    with torch.no_grad():  # non-trivial running stats so BN is not an identity
        for bn in (cnn[2], cnn[6]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = rng.random((3, 784), dtype=np.float32)
    m = from_pytorch(cnn, torch.from_numpy(x))
    with torch.no_grad():
        ref = cnn(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run_host(m.mod, x), ref, atol=1e-4, rtol=1e-4)


def test_input_names(small_mlp):
    m = from_pytorch(small_mlp, torch.zeros(1, 32), input_names=["pixels"])
    assert m.inputs[0].name == "pixels"
    with pytest.raises(TvmqError, match="2 input names given for 1 inputs"):
        from_pytorch(small_mlp, torch.zeros(1, 32), input_names=["a", "b"])


def test_unsupported_operator_names_op_and_node():
    class Bessel(torch.nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x) * 2

    with pytest.raises(
        UnsupportedOperatorError, match=r"special_bessel_j0.*node 'special_bessel_j0'"
    ):
        from_pytorch(Bessel(), torch.randn(2, 3))


def test_bad_example_inputs(small_mlp):
    with pytest.raises(TvmqError, match="not a tensor"):
        from_pytorch(small_mlp, ("hello",))
    with pytest.raises(TvmqError, match="torch.export could not trace"):
        from_pytorch(small_mlp, torch.zeros(1, 31))  # wrong width: the Linear fails


def test_pt2_file_round_trip(small_mlp, tmp_path, rng):
    x = rng.standard_normal((1, 32)).astype("float32")
    ep = torch.export.export(small_mlp, (torch.from_numpy(x),))
    torch.export.save(ep, tmp_path / "m.pt2")
    m = import_model(tmp_path / "m.pt2")
    with torch.no_grad():
        ref = small_mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run_host(m.mod, x), ref, atol=1e-5)


def test_import_model_errors(tmp_path):
    with pytest.raises(TvmqError, match="no such file"):
        import_model(tmp_path / "missing.onnx")
    (tmp_path / "m.pb").write_bytes(b"x")
    with pytest.raises(TvmqError, match="unknown model format '.pb'"):
        import_model(tmp_path / "m.pb")
    with pytest.raises(TvmqError, match="needs example_inputs"):
        import_model(torch.nn.Linear(2, 2))


def test_legacy_empty_cat_operand_is_dropped(rng):
    """A KV cache that starts empty (shape [0], GPT-2 with use_cache): torch skips it in cat."""

    class Cache(torch.nn.Module):
        def forward(self, k):
            return torch.cat([k.new_zeros(0), k * 2.0], dim=-2)

    k = rng.standard_normal((1, 2, 5, 4)).astype("float32")
    m = from_pytorch(Cache(), (torch.from_numpy(k),))
    np.testing.assert_allclose(_run_host(m.mod, k), 2.0 * k, rtol=1e-6)
