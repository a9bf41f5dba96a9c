"""Float vs int8 on the demo MLP and CNN: accuracy on real MNIST digits, library size, latency.

Every number comes from the compiled libraries, measured side by side in one run::

    python bench/bench_quant.py            # full: MLP 15 epochs, CNN 4 epochs
    python bench/bench_quant.py --quick    # CI smoke run

Latency: batch 1, median of ``--repeat`` calls of the VM (time_evaluator), float and int8
interleaved round by round so machine noise hits both alike; PyTorch eager on one thread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tvmq
from tvmq import demo


def _torch_ms(model, x, repeat: int) -> float:
    return demo.torch_latency_ms(model, x, warmup=max(5, repeat // 10), repeat=repeat)


def bench_model(name, model, data, workdir: Path, repeat: int, rounds: int, target: str):
    example = (torch.from_numpy(data.x_test[:1]),)
    builds = {}
    for label, kwargs in [
        ("float32", {}),
        ("int8", {"quantize": "int8", "calibration_data": data.x_train[:500]}),
        ("float32 tuned", {"tuning_logs": "auto"}),
    ]:
        out = workdir / f"{name}-{label.replace(' ', '-')}"
        kwargs.setdefault("tuning_logs", None)  # no tuning records unless the row says so
        art = tvmq.compile(
            model, target, example_inputs=example, output_dir=out, progress=False, **kwargs
        )
        builds[label] = (art, tvmq.load(out))
    times = {label: [] for label in builds}
    for _ in range(rounds):  # interleave so both see the same machine state
        for label, (_, m) in builds.items():
            times[label].append(m.benchmark([data.x_test[:1]], warmup=10, repeat=repeat).median_ms)
    ref_acc = demo.torch_accuracy(model, data.x_test, data.y_test)
    torch_ms = _torch_ms(model, data.x_test[:1], repeat)
    rows = []
    for label, (art, m) in builds.items():
        acc = demo.compiled_accuracy(m, data.x_test, data.y_test)
        rows.append(
            (f"{name} {label}", acc, art.manifest.library["bytes"], statistics.median(times[label]))
        )
    f_lib, f_ms = rows[0][2], rows[0][3]
    print(
        f"\n{name}: PyTorch float32 accuracy {100 * ref_acc:.2f}%, eager latency {torch_ms:.4f} ms (1 thread)"
    )
    print(
        f"{'model':<20} {'test acc':>9} {'Δ acc':>7} {'library':>11} {'size':>6} {'latency':>11} {'speed-up':>9}"
    )
    for label, acc, size, ms in rows:
        print(
            f"{label:<20} {100 * acc:>8.2f}% {100 * (acc - ref_acc):>+6.2f} {size / 1024:>7.1f} KiB "
            f"{size / f_lib:>5.0%} {ms:>8.4f} ms {f_ms / ms:>8.2f}x"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short training and timing (CI)")
    p.add_argument("--target", default="host")
    args = p.parse_args()
    t0 = time.perf_counter()
    data = demo.load_mnist()
    repeat, rounds = (50, 2) if args.quick else (300, 5)
    mlp = demo.train(demo.make_mlp(), data, epochs=3 if args.quick else 15)
    cnn = demo.train(demo.make_cnn(), data, epochs=1 if args.quick else 4)
    with tempfile.TemporaryDirectory() as tmp:
        bench_model("MLP", mlp, data, Path(tmp), repeat, rounds, args.target)
        bench_model("CNN", cnn, data, Path(tmp), repeat, rounds, args.target)
    print(
        f"\ntarget {args.target}; 'float32'/'int8': default schedules (no tuning records), "
        f"'float32 tuned': the shipped tuning logs (tuning_logs/<target>/); accuracy on 1,000 held-out real MNIST digits, "
        f"one at a time; latency: median over {rounds} interleaved rounds of {repeat} batch-1 "
        f"calls. Total {time.perf_counter() - t0:.0f} s."
    )


if __name__ == "__main__":
    main()
