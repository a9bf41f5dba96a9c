"""Tune the benchmark models' kernels into the shipped logs (``tuning_logs/<preset>/``).

    python bench/tune_bench_models.py                          # all models, 32 per kernel
    python bench/tune_bench_models.py --models minilm-b1-dyn gemm-int8 --trials-per-task 16
                                                               # what tuning_logs/host ships
    python bench/tune_bench_models.py --models minilm-b1-dyn --trials-per-task 16
    python bench/tune_bench_models.py --list                   # kernels per model, no tuning

Models are built exactly as ``bench/bench_peers.py`` builds them (same seeds, same
calibration), so the records match the kernels of its ``tuned`` rows:

    gemm-fp32, gemm-int8      the BERT-base FFN pair (128x768 -> 3072 -> 768)
    minilm-b1-dyn             all-MiniLM-L6-v2, sequence 128, batch 1, int8-dynamic
    minilm-b8-dyn             the same at batch 8
    minilm-b1-fp32            the float model, batch 1

Kernels tvmq already schedules by hand (the VNNI int8 dense kernels) are not tuned.
Interrupt at any time: rerunning resumes, every measured record is kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_peers as bp  # noqa: E402

MODELS = ("gemm-fp32", "gemm-int8", "minilm-b1-dyn", "minilm-b8-dyn", "minilm-b1-fp32")


def _gemm(quantize: str | None):
    import tvmq
    from tvmq.compiler import scheme_for_target
    from tvmq.quantization import quantize as run_quantize
    from tvmq.targets import get_target

    rng = np.random.default_rng(0)  # bench_peers.prepare's draws, in its order
    tokens, hidden, _ = bp.GEMM_SHAPE
    model = bp._gemm_model()
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    calib = [rng.standard_normal((tokens, hidden)).astype(np.float32) for _ in range(4)]
    imported = tvmq.import_model(model, example_inputs=(torch.from_numpy(x),))
    if quantize is None:
        return imported
    scheme = scheme_for_target(quantize, get_target("host"))
    return run_quantize(imported, calib, scheme, progress=False).model


def _minilm(batch: int, quantize: str | None):
    import tvmq
    from tvmq.compiler import scheme_for_target
    from tvmq.quantization import quantize as run_quantize
    from tvmq.targets import get_target

    inputs = bp._tokenize(bp.SENTENCES[:batch])
    example = tuple(torch.from_numpy(a) for a in inputs)
    imported = tvmq.import_model(bp._minilm_model(), example_inputs=example)
    if quantize is None:
        return imported
    scheme = scheme_for_target(quantize, get_target("host"))
    return run_quantize(imported, None, scheme, progress=False).model


def build_model(name: str):
    return {
        "gemm-fp32": lambda: _gemm(None),
        "gemm-int8": lambda: _gemm("int8"),
        "minilm-b1-dyn": lambda: _minilm(1, "int8-dynamic"),
        "minilm-b8-dyn": lambda: _minilm(8, "int8-dynamic"),
        "minilm-b1-fp32": lambda: _minilm(1, None),
    }[name]()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--target", default="host", help="target preset (default: host)")
    p.add_argument("--trials-per-task", type=int, default=32)
    p.add_argument("--list", action="store_true", help="print the kernels to tune and stop")
    args = p.parse_args(argv)

    from tvmq.build import fuse_to_tir
    from tvmq.targets import get_target
    from tvmq.tuning import tunable_tasks, tune

    work_dir = Path(__file__).resolve().parent.parent / "tuning_logs"
    for name in args.models:
        t = time.perf_counter()
        model = build_model(name)
        preset = get_target(args.target)
        tasks = tunable_tasks(fuse_to_tir(model.mod, preset), preset.tvm_target())
        print(f"{name}: {len(tasks)} kernels to tune", flush=True)
        if args.list or not tasks:
            continue
        report = tune(
            model,
            args.target,
            work_dir=work_dir / args.target,
            trials=args.trials_per_task * len(tasks),
            trials_per_task=args.trials_per_task,
        )
        print(report.summary())
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
