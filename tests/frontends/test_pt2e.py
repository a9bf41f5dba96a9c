"""PT2E programs (torchao's prepare_pt2e / convert_pt2e) -> tvmq int8 kernels, vs PyTorch.

A Linear-ReLU-Linear MLP and a Conv-ReLU-Conv CNN are quantized on the fly with the two
stock CPU quantizers, calibrated on random data: ``X86InductorQuantizer`` (uint8
activations, asymmetric; int8 per-channel weights in [-128, 127]; the last layer's output
stays float) and the XNNPACK quantizer (int8 activations, int8 per-channel weights in
[-127, 127]; every output requantized). torchao ships XNNPACK's only as a test utility now
(the real one moved to ExecuTorch), so ``torchao.testing.pt2e`` provides it here.

``tvmq.compile`` must lower every layer onto integer compute with the program's own scales
and zero points, and agree with the PT2E program run by PyTorch (the reference) on random
inputs: within one quantization step on >= 99% of elements. A "step" is the scale of the
last ``quantize_per_tensor`` in the program (the output's own scale when the output is
requantized); the two differ only where a float rounding flips a requantize by one.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import tvmq
from tvmq.cli import main
from tvmq.core.qmath import sqnr
from tvmq.frontends.pytorch import from_exported
from tvmq.passes import CanonicalizeQDQ, prepare_passes, static_int8_passes
from tvmq.passes.relax_utils import op_name, ordered_bindings

pytest.importorskip("torchao")
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86  # noqa: E402
from torchao.testing.pt2e import _xnnpack_quantizer as xnnpack  # noqa: E402

pytestmark = pytest.mark.slow

BATCH = 64
MIN_WITHIN_ONE_STEP = 0.99
MAX_STEPS = 2
QD = torch.ops.quantized_decomposed


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(24, 48), torch.nn.Linear(48, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 8, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


_MODELS = {
    "mlp": (MLP, (BATCH, 24), "relax.matmul"),
    "cnn": (CNN, (8, 3, 10, 10), "relax.nn.conv2d"),
}


def _quantizer(name: str):
    if name == "x86":
        q = x86.X86InductorQuantizer()
        return q.set_global(x86.get_default_x86_inductor_quantization_config())
    q = xnnpack.XNNPACKQuantizer()
    return q.set_global(xnnpack.get_symmetric_quantization_config(is_per_channel=True))


def _pt2e_program(model_name: str, quantizer: str):
    """(converted torch module, its torch.export program, example input), seeded."""
    make, shape, _ = _MODELS[model_name]
    torch.manual_seed(0)
    x = torch.randn(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(make().eval(), (x,)).module()
        prepared = prepare_pt2e(graph, _quantizer(quantizer))
        for _ in range(16):  # calibration: random batches
            prepared(torch.randn(shape))
        converted = convert_pt2e(prepared)
        return converted, torch.export.export(converted, (x,)), x


@pytest.fixture(scope="module")
def programs():
    return {(m, q): _pt2e_program(m, q) for m in _MODELS for q in ("x86", "xnnpack")}


def _last_step(program) -> float:
    """Scale of the program's last per-tensor quantize (see the module docstring)."""
    scales = [
        float(n.args[1])
        for n in program.graph.nodes
        if n.op == "call_function" and n.target == QD.quantize_per_tensor.default
    ]
    return scales[-1]


def _compute_dtypes(mod) -> list[str]:
    """Every matmul / conv2d of ``main`` as "op in-dtypes -> out-dtype"."""
    out = []
    for b in ordered_bindings(mod["main"]):
        if op_name(b.value) in ("relax.matmul", "relax.nn.conv2d"):
            dtypes = ",".join(str(a.ty.dtype) for a in b.value.args)
            out.append(f"{op_name(b.value)} {dtypes} -> {b.value.ty.dtype}")
    return out


@pytest.mark.parametrize("quantizer", ["x86", "xnnpack"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_pt2e_program_runs_int8_and_matches_pytorch(model_name, quantizer, programs, tmp_path):
    converted, program, _ = programs[model_name, quantizer]
    _, shape, op = _MODELS[model_name]
    activation = "uint8" if quantizer == "x86" else "int8"

    # (1) Both layers compute on integers: activation x int8 weight -> int32.
    lowered = static_int8_passes()(prepare_passes()(CanonicalizeQDQ()(from_exported(program).mod)))
    assert _compute_dtypes(lowered) == [f"{op} {activation},int8 -> int32"] * 2

    art = tvmq.compile(program, "host", output_dir=tmp_path / "out")
    assert art.manifest.compression == {"quantize": {"scheme": "pt2e", "float_ops": []}}

    # (2) Against the PT2E program run by PyTorch, on random inputs it was not calibrated on.
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = converted(x).numpy()
    ours = tvmq.load(tmp_path / "out")(x.numpy())
    step = _last_step(program)
    err = np.abs(ours - ref)
    within = float(np.mean(err <= step * 1.001))
    print(
        f"{model_name} {quantizer}: max |diff| {err.max():.3g} ({err.max() / step:.2f} steps of "
        f"{step:.3g}), {100 * within:.2f}% within one step, SQNR {sqnr(ref, ours):.1f} dB"
    )
    assert within >= MIN_WITHIN_ONE_STEP, within
    assert err.max() <= MAX_STEPS * step * 1.001, err.max() / step


class _OpsModule(torch.nn.Module):
    """The converters' corner cases, on one tensor: .tensor overloads with buffer parameters,
    a clamp range narrower than the dtype's, per-channel quantize with a nonzero zero point."""

    def __init__(self):
        super().__init__()
        self.register_buffer("s", torch.tensor(0.05))
        self.register_buffer("z", torch.tensor(-3))
        self.register_buffer("sc", torch.tensor([0.02, 0.04, 0.08]))
        self.register_buffer("zc", torch.tensor([5, 0, -7]))

    def forward(self, x):
        a = QD.quantize_per_tensor.tensor(x, self.s, self.z, -128, 127, torch.int8)
        a = QD.dequantize_per_tensor.tensor(a, self.s, self.z, -128, 127, torch.int8)
        b = QD.quantize_per_tensor.default(x, 0.03, 10, 0, 100, torch.uint8)  # narrow clamp
        b = QD.dequantize_per_tensor.default(b, 0.03, 10, 0, 100, torch.uint8)
        c = QD.quantize_per_channel.default(x, self.sc, self.zc, 1, -128, 127, torch.int8)
        c = QD.dequantize_per_channel.default(c, self.sc, self.zc, 1, -128, 127, torch.int8)
        return a + 10 * b + 100 * c


def test_quantize_dequantize_ops_match_torch(tmp_path):
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2)) * 3
    program = torch.export.export(_OpsModule(), (x,))
    tvmq.compile(program, "host", output_dir=tmp_path / "out")
    with torch.no_grad():
        ref = _OpsModule()(x).numpy()
    ours = tvmq.load(tmp_path / "out")(x.numpy())
    assert (x > (100 - 10) * 0.03).any()  # the narrow clamp bites
    # Equal up to float rounding (measured: all elements within 3.1e-5); a rounding tie
    # (x / s here, x * (1 / s) in torch) could still move one term by one of its steps.
    assert np.mean(np.abs(ours - ref) < 1e-4) >= 0.99
    assert np.abs(ours - ref).max() <= 100 * 0.08 + 1e-4


class _Dynamic(torch.nn.Module):
    """Dynamic quantization: the scale is computed at run time by choose_qparams."""

    def forward(self, x):
        s, z = QD.choose_qparams.tensor(x, -128, 127, 1e-5, torch.int8)
        q = QD.quantize_per_tensor.tensor(x, s, z, -128, 127, torch.int8)
        return QD.dequantize_per_tensor.tensor(q, s, z, -128, 127, torch.int8)


def test_unsupported_quantized_op_is_one_line(tmp_path, capsys):
    program = torch.export.export(_Dynamic(), (torch.randn(2, 4),))
    with pytest.raises(tvmq.TvmqError, match=r"quantized op quantized_decomposed\.choose_qparams"):
        from_exported(program)
    torch.export.save(program, tmp_path / "dyn.pt2")
    assert main(["-q", "compile", str(tmp_path / "dyn.pt2"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tvmq: error: ") and "\n" not in err, err
    assert "quantized op quantized_decomposed.choose_qparams.tensor is not supported" in err
    assert not (tmp_path / "o").exists()


def test_pt2_file_round_trip_through_the_cli(programs, tmp_path, capsys):
    """(3) torch.export.save -> `tvmq compile model.pt2` -> `tvmq run`, vs PyTorch."""
    converted, program, x = programs["cnn", "xnnpack"]
    torch.export.save(program, tmp_path / "model.pt2")
    out = tmp_path / "out"
    assert main(["-q", "compile", str(tmp_path / "model.pt2"), "-o", str(out)]) == 0
    art = tvmq.load(out)
    assert art.manifest.compression["quantize"]["scheme"] == "pt2e"
    assert art.manifest.compression["quantize"]["float_ops"] == []
    with torch.no_grad():
        ref = converted(x).numpy()
    step = _last_step(program)
    assert np.mean(np.abs(art(x.numpy()) - ref) <= step * 1.001) >= MIN_WITHIN_ONE_STEP
    # Already quantized: asking tvmq to quantize it again is refused.
    with pytest.raises(tvmq.TvmqError, match="already quantized.*PT2E"):
        tvmq.compile(tmp_path / "model.pt2", "host", quantize="int8", calibration_data=x.numpy())
