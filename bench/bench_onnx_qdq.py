"""onnxruntime vs tvmq on the same already-quantized (QDQ) ONNX model, on the host CPU.

For the demo's MLP (784-128-10) and small CNN, trained briefly on the demo's MNIST digits,
exported with ``torch.onnx.export(dynamo=False)`` and quantized by onnxruntime's
``quantize_static`` (QDQ, per-channel int8 weights, uint8 or int8 activations):

- ``ORT``: onnxruntime runs the QDQ file (it fuses it into QGemm / QLinearConv int8 kernels);
- ``tvmq``: ``from_onnx`` + ``CanonicalizeQDQ`` + ``prepare_passes`` + ``static_int8_passes()``
  + ``tvmq.build.build(mod, "host")`` (untuned default schedules);
- ``tvmq+vnni``: the same with ``PackInt8DenseX86`` for the host before the build (the matmuls
  become VNNI kernels; the convs keep the default schedule). Only on a host with avx512vnni.

Columns: ``max abs diff``: largest output difference on the 1,000 test digits, in output
quantization steps; ``agree``: argmax agreement with ORT on those digits; ``acc``: accuracy
(tvmq / ORT); latency: median ms of a batch-1 call with 1 and 2 threads (ORT
``intra_op_num_threads``; tvmq ``runtime.config_threadpool`` in a pool of ``TVM_NUM_THREADS`` = 2).

Run: ``python bench/bench_onnx_qdq.py [--epochs 1] [--activations uint8 int8]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import tvm
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from tvm import relax

from tvmq import demo
from tvmq.build import build
from tvmq.frontends.onnx import from_onnx
from tvmq.passes import PackInt8DenseX86, prepare_passes, static_int8_passes
from tvmq.passes.analysis import float_compute_ops
from tvmq.passes.canonicalize_qdq import CanonicalizeQDQ
from tvmq.passes.pack_int8_dense_x86 import target_has_vnni
from tvmq.targets import get_target

_ACTIVATIONS = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
_MODELS = {"mlp": demo.make_mlp, "cnn": demo.make_cnn}
THREADS = (1, 2)


class _Batches(CalibrationDataReader):
    def __init__(self, x: np.ndarray):
        self._it = iter([{"x": x[i : i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self._it, None)


def _export(model: torch.nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 784),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
            dynamo=False,
        )


def _output_scale(path: Path) -> float:
    model = onnx.load(str(path))
    out = model.graph.output[0].name
    node = next(n for n in model.graph.node if out in n.output)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return float(inits[node.input[1]])


def _median_ms(fn, budget_s: float = 1.0) -> float:
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    number = max(1, min(200, int(0.02 / once)))
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return float(np.median(times)) * 1e3


def _set_tvm_threads(n: int) -> None:
    # Mode 1 ("big" cores): every core on a uniform x86 CPU; nthreads caps the pool.
    tvm.get_global_func("runtime.config_threadpool")(1, n)


def _tvmq_module(path: Path, vnni_target) -> tvm.IRModule:
    mod = from_onnx(path, {"x": (1, 784)}).mod
    mod = static_int8_passes()(prepare_passes()(CanonicalizeQDQ()(mod)))
    if float_compute_ops(mod["main"]):
        raise RuntimeError(f"{path.name}: float ops left: {float_compute_ops(mod['main'])}")
    if vnni_target is not None:
        mod = PackInt8DenseX86(vnni_target)(mod)
    return mod


def _measure_ort(path: Path, digits: np.ndarray) -> tuple[np.ndarray, dict[int, float]]:
    """ORT's outputs on `digits` and its batch-1 latency per thread count."""
    out, ms = None, {}
    for n in THREADS:
        options = ort.SessionOptions()
        options.intra_op_num_threads = n
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        if out is None:
            out = sess.run(None, {"x": digits})[0]
        x1 = {"x": digits[:1]}
        ms[n] = _median_ms(lambda sess=sess, x1=x1: sess.run(None, x1))
    return out, ms


def _measure_tvmq(path: Path, digits: np.ndarray, vnni_target) -> tuple[np.ndarray, dict]:
    """tvmq's outputs on `digits` (batch-1 calls) and its batch-1 latency per thread count."""
    vm = relax.VirtualMachine(build(_tvmq_module(path, vnni_target), "host"), tvm.cpu())
    out = np.concatenate(
        [vm["main"](tvm.runtime.tensor(digits[i : i + 1])).numpy() for i in range(len(digits))]
    )
    arg = tvm.runtime.tensor(digits[:1])
    ms = {}
    for n in THREADS:
        _set_tvm_threads(n)
        ms[n] = _median_ms(lambda arg=arg: vm["main"](arg))
    _set_tvm_threads(max(THREADS))
    return out, ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per model")
    parser.add_argument(
        "--activations", nargs="+", default=["uint8", "int8"], choices=sorted(_ACTIVATIONS)
    )
    parser.add_argument("--calibration", type=int, default=100, help="calibration digits")
    args = parser.parse_args(argv)
    if "TVM_NUM_THREADS" not in os.environ:
        # TVM's pool defaults to half the logical CPUs (it assumes SMT) and is sized once,
        # at first use: start again with room for the largest thread count measured.
        env = dict(os.environ, TVM_NUM_THREADS=str(max(THREADS)))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    data = demo.load_mnist()
    host = get_target("host").tvm_target()
    vnni = host if target_has_vnni(host) else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in _MODELS.items():
            model = demo.train(make(), data, epochs=args.epochs).eval()
            fp32 = Path(tmp) / f"{name}.onnx"
            _export(model, fp32)
            for act in args.activations:
                path = Path(tmp) / f"{name}_{act}.onnx"
                quantize_static(
                    str(fp32),
                    str(path),
                    _Batches(data.x_train[: args.calibration]),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=_ACTIVATIONS[act],
                    weight_type=QuantType.QInt8,
                )
                ref, ort_ms = _measure_ort(path, data.x_test)
                s_y = _output_scale(path)
                variants = [("tvmq", None)] + ([("tvmq+vnni", vnni)] if vnni else [])
                for label, target in variants:
                    ours, tvm_ms = _measure_tvmq(path, data.x_test, target)
                    r = {
                        "steps": float(np.abs(ours - ref).max() / s_y),
                        "agree": float(np.mean(ours.argmax(1) == ref.argmax(1))),
                        "acc": (
                            float(np.mean(ours.argmax(1) == data.y_test)),
                            float(np.mean(ref.argmax(1) == data.y_test)),
                        ),
                        "ort_ms": ort_ms,
                        "tvm_ms": tvm_ms,
                    }
                    rows.append((name, act, label, r))

    t1, t2 = THREADS
    head = (
        f"| model | act | compiler | max abs diff (steps) | agree | acc tvmq / ORT "
        f"| ORT {t1}T ms | ORT {t2}T ms | tvmq {t1}T ms | tvmq {t2}T ms |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, act, label, r in rows:
        print(
            f"| {name} | {act} | {label} | {r['steps']:.0f} | {r['agree']:.3f} "
            f"| {r['acc'][0]:.3f} / {r['acc'][1]:.3f} "
            f"| {r['ort_ms'][t1]:.3f} | {r['ort_ms'][t2]:.3f} "
            f"| {r['tvm_ms'][t1]:.3f} | {r['tvm_ms'][t2]:.3f} |"
        )
    print(
        f"\nbatch 1, median ms; 1,000 MNIST test digits; onnxruntime {ort.__version__}, "
        f"TVM {tvm.__version__}, host {tvm.target.codegen.llvm_get_system_cpu()}; "
        f"command: python {' '.join(sys.argv)}"
    )


if __name__ == "__main__":
    main()
