"""Latency of int8 dense (matmul with a constant weight) on the host CPU.

Columns, each the median of repeated runs (ms):

- ``tvmq int8``: ``PackInt8DenseX86`` (VNNI kernel, packed weight), uint8 x int8 -> int32;
- ``tvm int8``: TVM's default lowering (``LegalizeOps``, untuned) of the same matmul;
- ``tvm fp32``: TVM's default lowering of the float32 matmul;
- ``numpy fp32``: ``x @ w`` in numpy (its BLAS).

Run: ``python bench/bench_int8_dense.py [--quick] [--target-mcpu cascadelake]`` (``--quick``:
small shapes and short timing budgets, a smoke run for CI).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tvm
from tvm import relax

from tvmq.passes.pack_int8_dense_x86 import PackInt8DenseX86

SHAPES = [(1, 784, 128), (1, 128, 10), (128, 768, 3072), (128, 3072, 768)]
QUICK_SHAPES = [(1, 784, 128), (1, 128, 10), (32, 256, 512)]


def _module(m: int, k: int, n: int, w: np.ndarray, x_dtype: str) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), x_dtype))
    out_dtype = "int32" if x_dtype != "float32" else "float32"
    with bb.function("main", [x]):
        y = bb.emit(relax.op.matmul(x, relax.const(w), out_dtype=out_dtype))
        bb.emit_func_output(y)
    return bb.get()


def _time_vm(mod: tvm.IRModule, x: np.ndarray, target, budget_s: float = 1.0) -> float:
    """Median ms of ``main(x)``; repeats sized so slow kernels finish within ~budget_s."""
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), dev)
    arg = tvm.runtime.tensor(x, dev)
    start = time.perf_counter()
    vm["main"](arg)
    once = time.perf_counter() - start
    number = max(1, min(1000, int(0.05 / max(once, 1e-7))))
    repeat = max(3, min(15, int(budget_s / max(once * number, 1e-7))))
    res = vm.time_evaluator("main", dev, number=number, repeat=repeat)(arg)
    return float(np.median(res.results)) * 1e3


def _time_numpy(x: np.ndarray, w: np.ndarray) -> float:
    times = []
    for _ in range(15):
        number = 20
        start = time.perf_counter()
        for _ in range(number):
            x @ w
        times.append((time.perf_counter() - start) / number)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-mcpu", default=None, help="default: the host CPU")
    parser.add_argument("--quick", action="store_true", help="small shapes only (CI smoke run)")
    args = parser.parse_args()
    budget_s = 0.2 if args.quick else 1.0
    if args.target_mcpu:
        target = tvm.target.Target({"kind": "llvm", "mcpu": args.target_mcpu})
    else:
        target = tvm.target.Target.from_device(tvm.cpu())
    print(f"target: {target}")
    rng = np.random.default_rng(0)
    header = f"{'M x K x N':>18} | {'tvmq int8':>10} | {'tvm int8':>10} | {'tvm fp32':>10} | {'numpy fp32':>10} | {'speedup vs tvm fp32':>19}"
    print(header)
    print("-" * len(header))
    for m, k, n in QUICK_SHAPES if args.quick else SHAPES:
        w8 = rng.integers(-128, 128, (k, n), dtype=np.int8)
        x8 = rng.integers(0, 256, (m, k), dtype=np.uint8)
        wf, xf = w8.astype(np.float32), x8.astype(np.float32)
        int8_mod = _module(m, k, n, w8, "uint8")
        t_tvmq = _time_vm(PackInt8DenseX86(target)(int8_mod), x8, target, budget_s)
        t_int8 = _time_vm(int8_mod, x8, target, budget_s)
        t_fp32 = _time_vm(_module(m, k, n, wf, "float32"), xf, target, budget_s)
        t_np = _time_numpy(xf, wf)
        print(
            f"{f'{m}x{k}x{n}':>18} | {t_tvmq:10.4f} | {t_int8:10.4f} | {t_fp32:10.4f} | "
            f"{t_np:10.4f} | {t_fp32 / t_tvmq:18.1f}x"
        )


if __name__ == "__main__":
    main()
