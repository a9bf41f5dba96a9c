"""Measure tvmq's pruning, distillation and weight sharing on the demo MLP (real MNIST digits).

    python bench/bench_compression.py [--epochs 15]

Trains the demo MLP (784-128-10) with ``tvmq.demo.train``, then for each variant compiles
the Relax module with ``tvm.compile`` for llvm (this machine) and reports test accuracy of
the compiled model (1,000 held-out digits, batch 1), parameters, constant bytes, matmul
MACs, and batch-1 latency from ``vm.time_evaluator``.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import tvm
from tvm import relax

from tvmq import demo
from tvmq.compression import ClusterConfig, PruneConfig, apply_compression, model_stats
from tvmq.distillation import distill
from tvmq.frontends.pytorch import from_pytorch
from tvmq.pruning import magnitude_mask, prunable_weights

TARGET = tvm.target.Target({"kind": "llvm"})


def _compile(mod):
    ex = tvm.compile(mod, target=TARGET)
    return relax.VirtualMachine(ex, tvm.cpu())


def _accuracy(vm, x, y) -> float:
    correct = 0
    for i in range(len(x)):
        out = vm["main"](tvm.runtime.tensor(x[i : i + 1]))[0].numpy()
        correct += int(out.argmax() == y[i])
    return correct / len(x)


def _latency_us(vm, x) -> tuple[float, float]:
    timer = vm.time_evaluator("main", tvm.cpu(), number=300, repeat=25, min_repeat_ms=0)
    results = np.array(timer(tvm.runtime.tensor(x)).results) * 1e6
    return float(np.median(results)), float(results.min())


def _row(name, mod, data, note=""):
    vm = _compile(mod)
    stats = model_stats(mod)
    acc = _accuracy(vm, data.x_test, data.y_test)
    med, best = _latency_us(vm, data.x_test[:1])
    print(
        f"{name:<34} {100 * acc:7.2f}% {stats['params']:>9,d} {stats['constant_bytes']:>11,d} "
        f"{stats['macs']:>9,d} {med:>8.1f} {best:>8.1f}  {note}",
        flush=True,
    )
    return acc


def _torch_pruned(model, sparsity):
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for w in prunable_weights(pruned).values():
            w.mul_(magnitude_mask(w, sparsity))
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--distill-epochs", type=int, default=5)
    args = parser.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    data = demo.load_mnist()
    model = demo.train(demo.make_mlp(), data, epochs=args.epochs)
    example = (torch.from_numpy(data.x_test[:1]),)
    base = from_pytorch(model, example).mod
    print(
        f"demo MLP 784-128-10, {args.epochs} epochs, PyTorch test accuracy "
        f"{100 * demo.torch_accuracy(model, data.x_test, data.y_test):.2f}%; "
        f"tvm.compile llvm {TARGET.attrs.get('mcpu', '(generic cpu)')}, 1 thread of torch"
    )
    print(
        f"{'variant':<34} {'acc':>8} {'params':>9} {'const bytes':>11} {'MACs':>9} {'med us':>8} {'min us':>8}"
    )
    _row("float32", base, data)
    for s in (0.5, 0.8):
        mod, rep = apply_compression(base, prune=PruneConfig("magnitude", sparsity=s))
        _row(f"magnitude {int(s * 100)}%", mod, data, f"sparsity {rep['sparsity']['sparsity']:.3f}")
    student = _torch_pruned(model, 0.8)
    distill(student, model, data, epochs=args.distill_epochs, temperature=4.0, alpha=0.7)
    mod, rep = apply_compression(
        from_pytorch(student, example).mod, prune=PruneConfig("magnitude", sparsity=0.8)
    )
    _row(
        f"magnitude 80% + distill ({args.distill_epochs} ep)",
        mod,
        data,
        f"sparsity {rep['sparsity']['sparsity']:.3f}",
    )
    mod, rep = apply_compression(base, prune=PruneConfig("channels", ratio=0.5))
    kept = {k: f"{v['before']}->{v['after']}" for k, v in rep["channels"]["pruned"].items()}
    _row("channels 50% of hidden", mod, data, f"{kept}")
    # Fine-tune the same channel choice: zero the pruned neurons' rows (L1 norm 0, so
    # PruneChannels removes exactly them afterwards) and their consumer columns, distill.
    keep = torch.zeros(128, dtype=torch.bool)
    keep[[int(i) for i in rep["channels"]["pruned"]["matmul_0"]["kept"]]] = True
    student = copy.deepcopy(model)
    with torch.no_grad():
        student[0].weight[~keep] = 0.0
        student[0].bias[~keep] = 0.0
        student[2].weight[:, ~keep] = 0.0
    distill(student, model, data, epochs=args.distill_epochs, temperature=4.0, alpha=0.7)
    mod, rep = apply_compression(
        from_pytorch(student, example).mod, prune=PruneConfig("channels", ratio=0.5)
    )
    _row(f"channels 50% + distill ({args.distill_epochs} ep)", mod, data)
    mod, rep = apply_compression(base, cluster=ClusterConfig(bits=4))
    _row("cluster 16 values (4-bit idx)", mod, data, "k-means++ per tensor")
    mod, rep = apply_compression(
        base, prune=PruneConfig("magnitude", sparsity=0.5), cluster=ClusterConfig(bits=4)
    )
    _row("magnitude 50% + cluster 16", mod, data)
    print(
        f"\nacc: compiled model, 1,000 test digits one at a time; lat: median / min of 25 x 300 "
        f"batch-1 calls (vm.time_evaluator, untuned kernels, 2 shared cores: +-30% noise); params: constant elements (codebook + packed index bytes "
        f"when clustered). Total {time.perf_counter() - t0:.0f} s."
    )


if __name__ == "__main__":
    main()
