"""``tvmq compile --skip GLOB`` and the layer names ``tvmq inspect`` lists for it."""

from __future__ import annotations

import json

import numpy as np
import torch

from tvmq.cli import main
from tvmq.core import qmath


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU())
        self.classifier = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(self.encoder(x))


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _pt2(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    torch.export.save(torch.export.export(net, (torch.zeros(4, 32),)), tmp_path / "m.pt2")
    return net, tmp_path / "m.pt2"


def test_inspect_lists_both_names(capsys, tmp_path):
    _, pt2 = _pt2(tmp_path)
    code, out, _ = _cli(capsys, "inspect", str(pt2))
    assert code == 0
    assert "matmul_0  encoder.0  (matmul, weight 32x32)" in out
    assert "matmul_1  classifier  (matmul, weight 32x10)" in out


def test_skip_errors_are_one_line_before_any_build(capsys, tmp_path):
    _, pt2 = _pt2(tmp_path)
    out = tmp_path / "o"
    code, _, err = _cli(capsys, "compile", str(pt2), "-o", str(out), "--skip", "classifier")
    assert code == 2 and "--skip leaves layers out of --quantize, --prune or --cluster" in err
    code, _, err = _cli(  # -q: no phase lines before the error
        capsys, "-q", "compile", str(pt2), "-o", str(out), "--prune", "0.5", "--skip", "clasifier*"
    )
    assert code == 2 and err.count("\n") == 1
    assert "'clasifier*' matches no layer" in err and "matmul_1 [classifier]" in err
    assert not out.exists()


def test_compile_skip_reaches_pruning_and_quantization(capsys, tmp_path):
    net, pt2 = _pt2(tmp_path)
    x = np.random.default_rng(0).standard_normal((64, 32)).astype("float32")
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "build"
    argv = ["-q", "compile", str(pt2), "-o", str(out), "--prune", "0.5", "--quantize", "int8"]
    code, _, err = _cli(capsys, *argv, "--calib", str(tmp_path / "calib.npz"), "--skip", "class*")
    assert code == 0, err
    manifest = json.loads((out / "model.json").read_text())
    layers = manifest["compression"]["quantize"]["layers"]
    assert [(r["name"], r["source"], r["quantized"]) for r in layers] == [
        ("matmul_0", "encoder.0", True),
        ("matmul_1", "classifier", False),
    ]
    assert manifest["compression"]["prune"][0]["skip"] == ["class*"]
    sites = manifest["notes"]["compression"]["sparsity"]["sites"]
    assert [sites[n]["sparsity"] for n in ("matmul_0", "matmul_1")] == [0.5, 0.0]
    # The reference: PyTorch with encoder.0's smallest half of weights zeroed, all in float.
    with torch.no_grad():
        w = net.encoder[0].weight
        w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0.0
        ref = net(torch.from_numpy(x[:4])).numpy()
    np.savez(tmp_path / "x.npz", x=x[:4])
    y = tmp_path / "y.npz"
    code, _, err = _cli(capsys, "run", str(out), "-i", str(tmp_path / "x.npz"), "-o", str(y))
    assert code == 0, err
    assert qmath.sqnr(ref, np.load(y)["output0"]) > 25.0
