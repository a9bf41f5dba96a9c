"""Compressed weights vs float32, side by side: w8 / w4 / clustered, on the BERT FFN and the demo MLP.

    python bench/bench_weight_only.py [--quick] [--threads 1]

For each model it compiles, with ``tvmq.compile`` for the host (no tuning records), the
float32 model and its ``w8``, ``w4`` (group 32), clustered (16 values, ``ClusterConfig``),
static ``int8`` and clustered int8 (16 int8 values per weight) versions, then times them round-robin (``--rounds`` rounds of ``--repeat`` calls each; the
median of the round medians, so a busy machine slows every row alike) and prints one table:
latency, ratio to float32, library size, SQNR of the output vs float32 on random inputs.

Models: the BERT-base FFN (``x @ W1 -> GELU -> @ W2``, 128 x 768 x 3072 x 768) and the
demo's MNIST MLP (784-128-10) at batch 1. Matmul weights of w8 / w4 models run on
``PackDecodedDense``'s kernel, which decodes them inside the matmul; clustered weights are
stored as codebooks + 4-bit codes and decoded once at load (``DecodeAtLoad``), so their
rows run the float32 / int8 kernels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tvmq
from tvmq.compression import ClusterConfig


class FFN(torch.nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, h), torch.nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(784, 128), torch.nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


VARIANTS = {
    "float32": {},
    "w8": {"quantize": "w8"},
    "w4 (group 32)": {"quantize": "w4"},
    "clustered 16": {"cluster": ClusterConfig(bits=4)},
    "int8": {"quantize": "int8"},
    "clustered int8": {"cluster": ClusterConfig(bits=4), "quantize": "int8"},
}


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    noise = np.linalg.norm(ref.astype(np.float64) - out)
    return float("inf") if noise == 0 else 20 * np.log10(np.linalg.norm(ref) / noise)


def _bench(name: str, model, x: np.ndarray, calib, rounds: int, repeat: int, out: Path) -> None:
    """``calib``: batches like ``x`` for the int8 rows' calibration."""
    compiled = {}
    for label, kwargs in VARIANTS.items():
        folder = out / f"{name}-{label.replace(' ', '-')}"
        if kwargs.get("quantize") == "int8":
            kwargs = {**kwargs, "calibration_data": calib}
        tvmq.compile(
            model, "host", example_inputs=(torch.from_numpy(x),), output_dir=folder,
            progress=False, tuning_logs=None, **kwargs,
        )  # fmt: skip
        compiled[label] = (tvmq.load(folder), (folder / "model.so").stat().st_size)
    ref = compiled["float32"][0](x)
    medians = {label: [] for label in compiled}
    for _ in range(rounds):
        for label, (m, _) in compiled.items():
            medians[label].append(m.benchmark([x], warmup=3, repeat=repeat).median_ms)
    base = statistics.median(medians["float32"])
    print(f"\n{name}: input {tuple(x.shape)}")
    print(f"{'variant':<15} {'ms':>8} {'vs fp32':>8} {'library':>10} {'SQNR dB':>8}")
    for label, (m, size) in compiled.items():
        ms = statistics.median(medians[label])
        sqnr = _sqnr(ref, m(x))
        print(f"{label:<15} {ms:8.3f} {ms / base:7.2f}x {size / 1024:8.0f} KiB {sqnr:8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smaller FFN, fewer runs (smoke test)")
    p.add_argument("--threads", type=int, default=1, help="TVM_NUM_THREADS (default 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    rounds, repeat = (2, 3) if args.quick else (args.rounds, args.repeat)
    d, h, m = (128, 512, 32) if args.quick else (768, 3072, 128)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tvmq-bench-wo-") as tmp:
        ffn = FFN(d, h).eval()
        x = rng.standard_normal((m, d)).astype(np.float32)
        calib = [rng.standard_normal((m, d)).astype(np.float32) for _ in range(4)]
        _bench(f"FFN {m}x{d}x{h}x{d}", ffn, x, calib, rounds, repeat, Path(tmp))
        mlp = MLP().eval()
        x, calib = rng.random((1, 784)).astype(np.float32), rng.random((64, 1, 784))
        calib = list(calib.astype(np.float32))
        _bench("demo MLP", mlp, x, calib, rounds, repeat * 10, Path(tmp))
    print(f"\n({args.threads} thread(s); {time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
