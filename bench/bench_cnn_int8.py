"""Latency of the demo CNN (``tvmq.demo.make_cnn``, MNIST, batch 1) on the host CPU.

One table, median ms of one digit (batch 1) at ``TVM_NUM_THREADS=1`` and ``=2``:

- ``float32 tvmq`` and ``int8 tvmq`` (static int8, ``quantize="int8"``), each built twice:
  ``before`` with the files of a git revision (``--baseline-rev``, default ``HEAD``) for the
  int8 conv path and the default CPU schedule (``passes/pack_int8_conv_x86.py``,
  ``tvmq/kernels/x86_int8_conv.py``, ``tvmq/cpu_schedule.py``), ``after`` with the working
  tree; everything else is the working tree in both;
- ``onnxruntime fp32``: the same float model exported with ``torch.onnx.export``.

Each thread count runs in its own process (the TVM thread pool reads ``TVM_NUM_THREADS``
once). Rounds are interleaved (every variant once per round) and the table shows the median
over rounds of each round's median: the machine is shared and noisy. The script also checks
that ``before`` and ``after`` int8 outputs are bit-identical on the test digits.

Run: ``python bench/bench_cnn_int8.py [--quick] [--threads 1 2] [--baseline-rev HEAD]``
(``--quick``: fewer rounds and digits, a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_OWNED = {
    "conv_kernel": "tvmq/kernels/x86_int8_conv.py",
    "conv_pass": "passes/pack_int8_conv_x86.py",
    "schedule": "tvmq/cpu_schedule.py",
}


def _module_from_rev(rev: str, path: str, name: str, package: str, replace=()) -> types.ModuleType:
    """Import ``path`` as it is at ``rev`` under the module name ``name``."""
    src = subprocess.check_output(["git", "show", f"{rev}:{path}"], cwd=ROOT, text=True)
    for old, new in replace:
        src = src.replace(old, new)
    # A real file: TVMScript reads the source of each prim_func back with inspect.
    file = Path(tempfile.mkdtemp(prefix="tvmq_bench_")) / Path(path).name
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = package
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _baseline(rev: str):
    """Build with ``rev``'s int8 conv pass, im2col kernel and default CPU schedule."""
    import tvmq.build
    import tvmq.passes.pack_int8_conv_x86 as conv_pass

    kernel = _module_from_rev(
        rev, _OWNED["conv_kernel"], "tvmq.kernels._bench_old_x86_int8_conv", "tvmq.kernels"
    )
    old_pass = _module_from_rev(
        rev,
        _OWNED["conv_pass"],
        "tvmq.passes._bench_old_pack_int8_conv_x86",
        "tvmq.passes",
        replace=[("tvmq.kernels.x86_int8_conv", kernel.__name__)],
    )
    schedule = _module_from_rev(rev, _OWNED["schedule"], "tvmq._bench_old_cpu_schedule", "tvmq")
    saved = conv_pass.PackInt8ConvX86, tvmq.build.CPUDefaultSchedule
    conv_pass.PackInt8ConvX86 = old_pass.PackInt8ConvX86
    tvmq.build.CPUDefaultSchedule = schedule.CPUDefaultSchedule
    try:
        yield
    finally:
        conv_pass.PackInt8ConvX86, tvmq.build.CPUDefaultSchedule = saved


def _onnx_session(model, example, threads: int, workdir: Path):
    import onnxruntime as ort
    import torch

    path = workdir / "cnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), input_names=["x"], dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def _child(args) -> None:
    """Measure every variant in this process (TVM_NUM_THREADS already set); print JSON."""
    import torch
    import tvm
    from tvm import relax

    import tvmq
    from tvmq import demo

    data = demo.load_mnist()
    model = demo.train(demo.make_cnn(), data, epochs=1 if args.quick else 3)
    example = (torch.from_numpy(data.x_test[:1]),)
    calib = data.x_train[: demo.CALIBRATION_SAMPLES]

    def build(quantize: bool):
        kwargs = {"quantize": "int8", "calibration_data": calib} if quantize else {}
        art = tvmq.compile(model, "host", example_inputs=example, progress=False, **kwargs)
        return relax.VirtualMachine(art.executable, tvm.cpu())

    vms = {}
    with _baseline(args.baseline_rev):
        vms["float32 tvmq (before)"] = build(False)
        vms["int8 tvmq (before)"] = build(True)
    vms["float32 tvmq (after)"] = build(False)
    vms["int8 tvmq (after)"] = build(True)

    n_check = 100 if args.quick else 1000
    digits = data.x_test[:n_check]
    outs = {}
    for k in ("int8 tvmq (before)", "int8 tvmq (after)"):
        outs[k] = np.stack([vms[k]["main"](tvm.runtime.tensor(d[None]))[0].numpy() for d in digits])
    identical = bool(np.array_equal(*outs.values()))

    x = tvm.runtime.tensor(data.x_test[:1])
    timers = {
        k: vm.time_evaluator("main", tvm.cpu(), number=args.number, repeat=args.repeat)
        for k, vm in vms.items()
    }
    runners = {k: (lambda t=t: [v * 1e3 for v in t(x).results]) for k, t in timers.items()}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ort_run = _onnx_session(model.eval(), example, args.threads[0], Path(tmp))
        except Exception as err:  # onnx export needs onnx / onnxscript; skip the row
            print(f"onnxruntime row skipped: {type(err).__name__}: {err}", file=sys.stderr)
            ort_run = None
        if ort_run is not None:
            xin = data.x_test[:1]

            def ort_times():
                res = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    for _ in range(args.number):
                        ort_run(xin)
                    res.append((time.perf_counter() - t0) / args.number * 1e3)
                return res

            ort_run(xin)
            runners["onnxruntime fp32"] = ort_times
        times = {k: [] for k in runners}
        for _ in range(args.rounds):
            for k, run in runners.items():
                times[k].append(statistics.median(run()))
    print(json.dumps({"identical": identical, "checked": n_check, "times": times}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--baseline-rev", default="HEAD", help="git revision for 'before'")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 15)
    args.number, args.repeat = (100, 3) if args.quick else (200, 5)
    if args.child:
        _child(args)
        return

    results = {}
    for t in args.threads:
        env = dict(os.environ, TVM_NUM_THREADS=str(t), OMP_NUM_THREADS=str(t))
        cmd = [sys.executable, __file__, "--child", "--threads", str(t)]
        cmd += ["--baseline-rev", args.baseline_rev, "--rounds", str(args.rounds)]
        cmd += ["--quick"] if args.quick else []
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{t}-thread run failed:\n{out.stderr[-4000:]}")
        results[t] = json.loads(out.stdout.strip().splitlines()[-1])

    names = list(results[args.threads[0]]["times"])
    head = f"{'demo CNN, batch 1 (median ms)':<30}" + "".join(
        f"{f'{t} thread' + ('s' if t > 1 else ''):>12}" for t in args.threads
    )
    print(head)
    print("-" * len(head))
    for name in names:
        cells = "".join(
            f"{statistics.median(results[t]['times'][name]):>12.4f}" for t in args.threads
        )
        print(f"{name:<30}{cells}")
    for t in args.threads:
        r = results[t]
        print(
            f"{t} thread(s): int8 before/after outputs bit-identical on {r['checked']} test "
            f"digits: {r['identical']}; {args.rounds} interleaved rounds"
        )


if __name__ == "__main__":
    main()
