"""One-shot GPU check of tvmq's CUDA int8 path: correctness, int8 vs fp32 latency, a short tune.

Run on a machine with an NVIDIA GPU (and nvcc)::

    python bench/gpu_check.py --out gpu_check_logs --trials 32

For the demo MLP (batch 4), the demo CNN (batch 4) and a 128x768x3072 GEMM it builds the fp32
model and the static-int8 model (``PackInt8DenseCUDA`` applied: dp4a kernels for int8 dense
layers; int8 conv2d still takes TVM's default lowering) for the GPU's own arch, checks:

- GEMM: int8 result == numpy, bit-exact; fp32 vs numpy (max relative error);
- MLP / CNN: the GPU int8 output == the CPU (llvm) build of the same quantized model (the
  integer parts are exact; the float epilogue may differ by rounding), and SQNR vs fp32;

times each build with ``time_evaluator``, then runs ``--trials`` MetaSchedule trials on the
int8 MLP (``tvmq.tuning.tune``, records under ``--out/tune``) and times the tuned build.
Prints one table; writes it to ``--out/gpu_check.txt`` too. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    noise = np.linalg.norm(ref.astype(np.float64) - out)
    return float("inf") if noise == 0 else 20 * np.log10(np.linalg.norm(ref) / noise)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check_logs", help="folder for records + table")
    parser.add_argument("--trials", type=int, default=32, help="MetaSchedule trials (0: skip)")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import torch
    import tvm
    from tvm import relax

    import tvmq.passes  # noqa: F401  (before tvmq.kernels: import order)
    from tvmq.build import build_with_info
    from tvmq.demo import make_cnn, make_mlp
    from tvmq.frontends import import_model
    from tvmq.passes.pack_int8_dense_cuda import PackInt8DenseCUDA
    from tvmq.quantization import quantize
    from tvmq.targets import get_target

    dev = tvm.cuda(0)
    if not dev.exist:
        print("no CUDA GPU visible", file=sys.stderr)
        return 2
    arch = str(tvm.target.Target.from_device(dev).attrs["arch"])
    base = get_target("cuda-sm90" if arch.startswith("sm_90") else "cuda-sm80")
    if arch == "sm_90":
        arch = "sm_90a"
    preset = dataclasses.replace(base, target={**dict(base.target), "arch": arch})
    host = get_target("host").tvm_target()
    print(f"device: {dev.device_name}, arch {arch}", flush=True)
    rows: list[tuple[str, ...]] = []
    failed = False

    def timed(vm, *inputs) -> float:
        return vm.time_evaluator("main", dev, number=20, repeat=5)(*inputs).mean * 1e3

    def gpu_vm(mod, tuning_logs=None):
        ex, info = build_with_info(mod, preset, tuning_logs=tuning_logs)
        return relax.VirtualMachine(ex, dev), info

    def first(result):
        return (result if hasattr(result, "numpy") else result[0]).numpy()

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    int8_mlp = None
    for name, model, shape in [
        ("mlp", make_mlp(), (4, 784)),
        ("cnn", make_cnn(), (4, 784)),
    ]:
        model = model.eval()
        imported = import_model(model, example_inputs=(torch.zeros(*shape),))
        calib = rng.random((64, shape[1]), dtype=np.float32)
        q = quantize(imported, calib, "int8", progress=False, evaluate=False).mod
        q_cuda = PackInt8DenseCUDA(preset.tvm_target())(q)
        if name == "mlp":
            int8_mlp = q_cuda
        x = rng.random(shape, dtype=np.float32)
        with torch.no_grad():
            fp_ref = model(torch.from_numpy(x)).numpy()
        cpu = relax.VirtualMachine(relax.build(q, target=host), tvm.cpu())
        int8_cpu = first(cpu["main"](tvm.runtime.tensor(x)))
        vm8, info = gpu_vm(q_cuda)
        x_dev = tvm.runtime.tensor(x, dev)
        int8_gpu = first(vm8["main"](x_dev))
        vm32, _ = gpu_vm(imported.mod)
        fp_gpu = first(vm32["main"](x_dev))
        diff = float(np.abs(int8_gpu - int8_cpu).max())
        ok = diff <= 1e-3 * max(1.0, float(np.abs(int8_cpu).max()))
        failed |= not ok
        rows.append(
            (
                name,
                "OK" if ok else "FAIL",
                f"|gpu-cpu int8| {diff:.2e}; SQNR int8 {_sqnr(fp_ref, int8_gpu):.1f} dB, "
                f"fp32 {_sqnr(fp_ref, fp_gpu):.1f} dB; {info.summary()}",
                f"{timed(vm8, x_dev):.4f}",
                f"{timed(vm32, x_dev):.4f}",
            )
        )
        print(rows[-1], flush=True)

    # GEMM 128x768x3072
    m, k, n = 128, 768, 3072
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    mods = {}
    for dtype in ("int8", "float32"):
        xv = relax.Var("x", relax.TensorType((m, k), dtype))
        bb = relax.BlockBuilder()
        with bb.function("main", [xv]):
            kwargs = {"out_dtype": "int32"} if dtype == "int8" else {}
            y = relax.op.matmul(xv, relax.const(w.astype(dtype)), **kwargs)
            bb.emit_func_output(bb.emit(y))
        mods[dtype] = bb.get()
    expected = a.astype(np.int32) @ w.astype(np.int32)
    vm8, info = gpu_vm(PackInt8DenseCUDA(preset.tvm_target())(mods["int8"]))
    a8 = tvm.runtime.tensor(a, dev)
    ok8 = np.array_equal(vm8["main"](a8).numpy(), expected)
    vm32, _ = gpu_vm(mods["float32"])
    af = tvm.runtime.tensor(a.astype(np.float32), dev)
    rel = float(np.abs(vm32["main"](af).numpy() - expected).max() / np.abs(expected).max())
    failed |= not ok8
    rows.append(
        (
            f"gemm {m}x{k}x{n}",
            "OK" if ok8 else "FAIL",
            f"int8 == numpy: {ok8}; fp32 max rel err {rel:.1e}; {info.summary()}",
            f"{timed(vm8, a8):.4f}",
            f"{timed(vm32, af):.4f}",
        )
    )
    print(rows[-1], flush=True)

    if args.trials > 0 and int8_mlp is not None:
        from tvmq.tuning import tune

        work_dir = out_dir / "tune"
        start = time.perf_counter()
        report = tune(int8_mlp, preset, trials=args.trials, work_dir=work_dir, progress=False)
        took = time.perf_counter() - start
        vm_t, info = gpu_vm(int8_mlp, tuning_logs=str(work_dir))
        x = rng.random((4, 784), dtype=np.float32)
        x_dev = tvm.runtime.tensor(x, dev)
        cpu = relax.VirtualMachine(relax.build(int8_mlp, target=host), tvm.cpu())
        diff = float(
            np.abs(first(vm_t["main"](x_dev)) - first(cpu["main"](tvm.runtime.tensor(x)))).max()
        )
        ok = diff <= 1e-3
        failed |= not ok
        rows.append(
            (
                f"mlp tuned ({args.trials} trials, {took:.0f} s)",
                "OK" if ok else "FAIL",
                f"|gpu-cpu| {diff:.2e}; {info.summary()}; {report}",
                f"{timed(vm_t, x_dev):.4f}",
                "-",
            )
        )
        print(rows[-1], flush=True)

    header = ("case", "check", "details", "int8 ms", "fp32 ms")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = [
        " | ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True)) for r in (header, *rows)
    ]
    lines.insert(1, "-+-".join("-" * wd for wd in widths))
    table = "\n".join([f"device: {dev.device_name} ({arch})", *lines])
    print(table)
    (out_dir / "gpu_check.txt").write_text(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
