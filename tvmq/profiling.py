"""Per-kernel time of a compiled model, from the Relax VM's instrumentation hook.

TVM 0.27's Relax VM has no profiler mode: :func:`profile_kernels` installs
``VirtualMachine.set_instrument`` with a callback that times every call instruction
(kernels and VM builtins) between its before/after events, synchronising the device, and
sums the times by function symbol over ``repeat`` runs after ``warmup`` untimed ones.
The callback itself costs a few microseconds per call, so tiny kernels read high.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["KernelTime", "format_profile", "profile_kernels"]


@dataclass(frozen=True)
class KernelTime:
    """One function the VM called: calls per run and mean time per run (ms)."""

    name: str
    calls: int
    ms: float


def profile_kernels(vm, device, tensors, *, repeat: int = 10, warmup: int = 1) -> list[KernelTime]:
    """Time each function ``vm["main"](*tensors)`` calls; slowest first."""
    for _ in range(warmup):
        vm["main"](*tensors)
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    started: list[float] = []

    def instrument(func, name, before_run, ret, *args):
        device.sync()
        if before_run:
            started.append(time.perf_counter())
        else:
            name = str(name)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - started.pop()
            calls[name] = calls.get(name, 0) + 1
        return 0  # VMInstrumentReturnKind.kNoOp: run the call as usual

    vm.set_instrument(instrument)
    try:
        for _ in range(repeat):
            vm["main"](*tensors)
    finally:
        vm.set_instrument(None)
    times = [KernelTime(n, calls[n] // repeat, 1e3 * t / repeat) for n, t in totals.items()]
    return sorted(times, key=lambda k: -k.ms)


def format_profile(times: list[KernelTime], top: int) -> str:
    """A table of the ``top`` slowest kernels with their share of the summed time; the VM's
    own builtins (allocation, shape checks) summed on one line."""
    total = sum(k.ms for k in times) or 1.0
    kernels = [k for k in times if not k.name.startswith("vm.builtin.")]
    builtins = [k for k in times if k.name.startswith("vm.builtin.")]
    width = max([len(k.name) for k in kernels[:top]] + [24])
    lines = [f"{'kernel':<{width}}  {'calls':>5}  {'ms/run':>9}  {'share':>6}"]

    def row(name, calls, ms):
        return f"{name:<{width}}  {calls:>5}  {ms:>9.4f}  {100 * ms / total:>5.1f}%"

    for k in kernels[:top]:
        lines.append(row(k.name, k.calls, k.ms))
    rest = kernels[top:]
    if rest:
        lines.append(row(f"({len(rest)} more kernels)", "", sum(k.ms for k in rest)))
    if builtins:
        calls = sum(k.calls for k in builtins)
        lines.append(row("(VM builtins)", calls, sum(k.ms for k in builtins)))
    lines.append(row("total", "", total))
    return "\n".join(lines)
