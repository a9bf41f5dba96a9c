"""The static call plan's kernel calls made by the library's native runner vs from Python.

For each build folder given: the same loaded model, its plan run by ``tvmq_plan_run`` (the
function compiled into the library, :func:`tvmq.static_plan_record.runner_source`) and by a
Python loop over the same steps (what a library without the runner gets), alternating in
one process: ``--rounds`` rounds, each the median of ``--repeat`` runs; the table holds the
medians over rounds and their ratio.

Run: ``python bench/bench_plan_runner.py BUILD_DIR [BUILD_DIR ...] [--threads N]``
(``TVM_NUM_THREADS`` is set from ``--threads`` before TVM starts). The inputs are random.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def _median_us(fn, repeat: int) -> float:
    for _ in range(max(repeat // 10, 3)):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(folder: str, rounds: int, repeat: int) -> tuple[int, float, float]:
    """(steps, Python us, native us) of one build folder."""
    import tvmq
    from tvmq.errors import TvmqError
    from tvmq.runtime import random_inputs

    model = tvmq.load(folder)
    plan = model._plan
    if plan is None or not plan.native:
        raise TvmqError(f"{folder}: no static plan with a native runner (rebuild it)")
    model(*random_inputs(model.inputs))  # fills the plan's input slots
    native, address = plan._native, plan._address

    def runner():
        native(address)

    got: dict[str, list[float]] = {"python": [], "native": []}
    for r in range(rounds):  # alternate which goes first
        order = (("python", plan.run_from_python), ("native", runner))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            got[name].append(_median_us(fn, repeat))
    return len(plan.steps), statistics.median(got["python"]), statistics.median(got["native"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="tvmq build folders (model.json + model.so)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeat", type=int, default=300, help="runs timed per round")
    args = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    print(f"{'build':40s} {'steps':>5s} {'python us':>10s} {'native us':>10s} {'ratio':>6s}")
    for folder in args.folders:
        steps, py, native = measure(folder, args.rounds, args.repeat)
        name = "/".join(Path(folder).resolve().parts[-2:])
        print(f"{name[-40:]:40s} {steps:5d} {py:10.2f} {native:10.2f} {py / native:6.3f}")
    print(f"{args.threads} thread(s); each figure the median over {args.rounds} alternating rounds")


if __name__ == "__main__":
    main()
