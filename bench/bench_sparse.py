"""Latency of block-sparse (BSR) float32 dense layers against tvmq's dense matmul, host CPU.

For each GEMM ``x[M, K] @ W[K, N]`` (default: the two BERT-base FFN GEMMs at 128 tokens),
in one run and on the same input:

- ``dense``: a plain ``matmul(x, W_const)`` module built by ``tvmq.build.build`` (tvmq's
  default CPU schedule, untuned);
- ``numpy``: ``x @ W`` in numpy (its BLAS), for reference only;
- ``bsr BxC @ s%``: the same module with ``W`` pruned to sparsity ``s`` in random
  ``BxC`` tiles and rewritten by ``SparsifyDense(min_sparsity=0)`` (so including the
  transpose of ``x`` the pass emits), built the same way.

Every cell is the median of ``time_evaluator`` measurements (ms) and the median speedup
over ``dense``, the two measured alternately (robust to a shared machine's load drifting). ``crossover`` is the lowest sparsity measured at which BSR beats dense.

Run: ``python bench/bench_sparse.py [--shapes 128x768x3072,128x3072x768] [--quick]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tvm
from tvm import relax

from tvmq.build import build
from tvmq.passes.sparsify_dense import SparsifyDense

SHAPES = [(128, 768, 3072), (128, 3072, 768)]
BLOCKS = [(1, 1), (4, 1), (16, 1)]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]


def _module(m: int, k: int, w_kn: np.ndarray) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, relax.const(w_kn, "float32")))
        bb.emit_func_output(y)
    return bb.get()


def _block_sparse(rng, k: int, n: int, block, sparsity: float) -> np.ndarray:
    """(K, N) weight whose transpose has a random ``sparsity`` fraction of zero ``block`` tiles."""
    bs_r, bs_c = block
    tiles = (n // bs_r) * (k // bs_c)
    keep = np.ones(tiles, dtype=bool)
    keep[rng.permutation(tiles)[: int(round(sparsity * tiles))]] = False
    mask = np.kron(keep.reshape(n // bs_r, k // bs_c), np.ones(block, dtype=bool))
    return (rng.standard_normal((n, k)) * mask).astype("float32").T.copy()


class _Timed:
    """A built module, its input, and ``time_evaluator`` sized to ~50 ms per measurement."""

    def __init__(self, mod: tvm.IRModule, x: np.ndarray) -> None:
        dev = tvm.cpu()
        self.vm = relax.VirtualMachine(build(mod, "host"), dev)
        self.arg = tvm.runtime.tensor(x, dev)
        start = time.perf_counter()
        self.out = self.vm["main"](self.arg).numpy()
        once = time.perf_counter() - start
        number = max(1, min(100, int(0.05 / max(once, 1e-7))))
        self.measure = self.vm.time_evaluator("main", dev, number=number, repeat=1)

    def ms(self) -> float:
        return float(self.measure(self.arg).mean) * 1e3


def _side_by_side(dense: _Timed, sparse: _Timed, rounds: int) -> tuple[float, float, float]:
    """(dense ms, sparse ms, speedup): medians over alternating measurements.

    Alternating keeps the ratio honest on a shared machine whose load drifts.
    """
    pairs = [(dense.ms(), sparse.ms()) for _ in range(rounds)]
    d, s = np.array(pairs).T
    return float(np.median(d)), float(np.median(s)), float(np.median(d / s))


def _time_numpy(x: np.ndarray, w: np.ndarray) -> float:
    times = []
    for _ in range(9):
        start = time.perf_counter()
        for _ in range(5):
            x @ w
        times.append((time.perf_counter() - start) / 5)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES))
    parser.add_argument("--quick", action="store_true", help="shorter timing budget")
    args = parser.parse_args()
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    rounds = 3 if args.quick else 9
    target = tvm.target.Target.from_device(tvm.cpu())
    print(f"target: {target}  (tvmq.build.build preset 'host'; float32; ms, median)")
    rng = np.random.default_rng(0)
    cols = [f"{int(s * 100)}%" for s in SPARSITIES]
    header = f"{'M x K x N':>15} | {'kernel':>10} | " + " | ".join(f"{c:>14}" for c in cols)
    header += f" | {'crossover':>9}"
    print(header)
    print("-" * len(header))
    for m, k, n in shapes:
        x = rng.standard_normal((m, k)).astype("float32")
        w_dense = rng.standard_normal((k, n)).astype("float32")
        dense = _Timed(_module(m, k, w_dense), x)
        t_numpy = _time_numpy(x, w_dense)
        label = f"{m}x{k}x{n}"
        dense_times = []
        for block in BLOCKS:
            cells, crossover = [], None
            for sparsity in SPARSITIES:
                w = _block_sparse(rng, k, n, block, sparsity)
                mod = SparsifyDense(min_sparsity=0.0, block=block, target=target)(_module(m, k, w))
                sparse = _Timed(mod, x)
                err = float(np.abs(sparse.out - x @ w).max())
                if err > 1e-2:
                    raise SystemExit(f"wrong result: {label} {block} {sparsity}: max err {err}")
                t_dense, t, speedup = _side_by_side(dense, sparse, rounds)
                dense_times.append(t_dense)
                if crossover is None and speedup > 1.0:
                    crossover = sparsity
                cells.append(f"{t:7.3f} {speedup:5.1f}x")
            bname = f"bsr {block[0]}x{block[1]}"
            cross = f"{int(crossover * 100)}%" if crossover is not None else "none"
            print(f"{label:>15} | {bname:>10} | " + " | ".join(f"{c:>14}" for c in cells), end="")
            print(f" | {cross:>9}", flush=True)
        print(f"{label:>15} | {'dense':>10} | {np.median(dense_times):7.3f} ms (tvmq default)")
        print(f"{label:>15} | {'numpy':>10} | {t_numpy:7.3f} ms (BLAS, reference)", flush=True)


if __name__ == "__main__":
    main()
