"""Where a compiled model's time goes: per-kernel times of one call.

A model with a static call plan (:mod:`tvmq.static_plan`: static shapes on a CPU, what most
builds are) is timed *in sequence*: each kernel call of the plan is timed where it runs, in
the model's order, on the caches the calls before it leave (the clock read between the calls
by the library's timed runner, in native code as a call makes them; a library built without
it is timed from Python, each time then including a call from Python, a fraction of a
microsecond), and a kernel's row is the sum of its calls' medians.
Timed alone in a loop, a kernel finds its weights and operands in cache (the VM's
``time_evaluator`` path below): ResNet-50 fp32's 14x14 1x1 convs took 15-16% longer in the
model than alone on one thread, 25-26% on two, and all such gaps together showed up as 17%
of the call in the "around the kernels" row, as if it were dispatch.

Any other model (dynamic shapes, a GPU) runs on TVM 0.27's Relax VM, which has no profiling
mode (``VirtualMachine(..., profile=True)`` is gone); it can only be *instrumented*:
``vm.set_instrument(f)`` calls ``f`` before and after every call the VM makes.
:func:`profile_kernels` uses that once, to record which kernels one model call runs and on
which tensors; then it times each kernel call alone, on those same tensors, with TVM's
``time_evaluator`` (a timer in C++: no Python callback inside the measured interval, whose
overhead of about a microsecond per call would swamp the microsecond kernels of a small
model). What the whole call takes beyond its kernels is the row :data:`DISPATCH_ROW`: the
plan's calls from Python, or the VM's allocation, checks and dispatch (and, for kernels
timed alone, what they lose in the model to caches the kernels before them left).

Usable from any front end (``tvmq report``, ``tvmq run --profile``)::

    for name, calls, seconds, percent in profile_kernels("build/"):
        print(f"{percent:5.1f}%  {seconds * 1e6:8.1f} us  x{calls}  {name}")
"""

from __future__ import annotations

import os
import statistics
from typing import NamedTuple

import tvm

from tvmq.errors import TvmqError
from tvmq.runtime import CompiledModel, random_inputs

__all__ = ["DISPATCH_ROW", "KernelTime", "format_profile", "profile_kernels"]

DISPATCH_ROW = "(around the kernels: dispatch, allocation, checks)"
"""The name of the row that holds the rest of a call's time, beyond its kernels."""


class KernelTime(NamedTuple):
    """One kernel (TIR function) of a model call.

    ``calls``: how often one model call runs it; ``seconds``: its time in one model call
    (all its calls together); ``percent``: of the model call's time.
    """

    name: str
    calls: int
    seconds: float
    percent: float


def profile_kernels(
    model: CompiledModel | str | os.PathLike,
    inputs=None,
    *,
    repeat: int = 10,
    min_repeat_ms: int = 2,
    warmup: int = 3,
    in_sequence: bool | None = None,
) -> list[KernelTime]:
    """Per-kernel times of one call of a compiled model, slowest first.

    Parameters
    ----------
    model : CompiledModel or path
        A model loaded with :func:`tvmq.load`, or the folder ``tvmq compile`` wrote.
    inputs : list or dict of arrays, optional
        The call's inputs, as for ``model(...)``; default: random ones of the right shapes.
    repeat : int
        Timed repetitions of the whole model and of each kernel; medians are reported.
    min_repeat_ms : int
        Kernels timed alone: each repetition runs the kernel as often as it takes to last
        this long.
    warmup : int
        Untimed model calls first.
    in_sequence : bool, optional
        Time each kernel call in the model's sequence (needs a static call plan) rather than
        alone in a loop; default: in sequence where the model has a plan.

    Returns
    -------
    list[KernelTime]
        One row per kernel, plus :data:`DISPATCH_ROW` (the model call's median time minus its
        kernels', never negative), sorted by time. ``percent`` is of the larger of the
        model call's median time and the kernels' sum, so the rows add up to 100.

    Raises
    ------
    TvmqError
        For a bad ``repeat``, inputs that do not fit the model, ``in_sequence`` for a model
        without a plan, or a build for another machine (cross-compiled).
    """
    if not isinstance(repeat, int) or repeat < 1:
        raise TvmqError(f"repeat must be a positive integer, got {repeat!r}")
    if not isinstance(model, CompiledModel):
        model = CompiledModel(model)
    if inputs is None:
        inputs = random_inputs(model.inputs)
    args, kwargs = (inputs, {}) if not isinstance(inputs, dict) else ((), inputs)
    if in_sequence is None:
        in_sequence = times_in_sequence(model)
    if in_sequence:
        timed = model._time_plan_steps(list(args), kwargs, warmup, repeat)
        if timed is None:
            raise TvmqError(
                "in_sequence needs the model's static call plan; this model runs on the VM "
                "(dynamic shapes, a GPU or a plan this runtime cannot load)"
            )
        names, seconds, runs = timed
        per_kernel: dict[str, list[float]] = {}
        for name, times in zip(names, seconds, strict=True):
            per_kernel.setdefault(name, []).append(statistics.median(times))
        whole_s = statistics.median(runs)
    else:
        per_kernel, whole_s = _alone(model, args, kwargs, repeat, min_repeat_ms, warmup)
    rows = [(name, len(ts), sum(ts)) for name, ts in per_kernel.items()]
    kernels_s = sum(s for _, _, s in rows)
    total = max(whole_s, kernels_s)
    rows.append((DISPATCH_ROW, 0, total - kernels_s))
    rows.sort(key=lambda r: -r[2])
    return [KernelTime(n, c, s, 100.0 * s / total if total > 0 else 0.0) for n, c, s in rows]


def times_in_sequence(model: CompiledModel) -> bool:
    """Whether :func:`profile_kernels` times ``model``'s kernels in sequence by default: where
    the model runs a static call plan."""
    return model._plan is not None


def _alone(model: CompiledModel, args, kwargs, repeat: int, min_repeat_ms: int, warmup: int):
    """Each kernel call of one model call timed alone in a loop on that call's tensors:
    ``({kernel: [seconds of each call]}, the whole call's median seconds)``."""
    tensors = model._to_device(list(args), kwargs)
    lib, vm = model._lib, model._vm
    calls = _record_calls(vm, lib, model.main_args(tensors))
    whole = model.benchmark([t.numpy() for t in tensors], warmup=warmup, repeat=repeat)
    per_kernel: dict[str, list[float]] = {}
    for owner, name, call_args in calls:
        timer = owner.time_evaluator(
            name, model.device, number=1, repeat=repeat, min_repeat_ms=int(min_repeat_ms)
        )
        per_kernel.setdefault(name, []).append(statistics.median(timer(*call_args).results))
    return per_kernel, whole.median_ms / 1e3


def format_profile(times: list[KernelTime], top: int) -> str:
    """A table of the ``top`` slowest kernels of :func:`profile_kernels`' rows, the rest of the
    kernels on one line, then the VM's own share and the total (``tvmq run --profile``)."""
    kernels = [k for k in times if k.name != DISPATCH_ROW]
    vm = [k for k in times if k.name == DISPATCH_ROW]
    width = max([len(k.name) for k in kernels[:top]] + [len(DISPATCH_ROW)])
    lines = [f"{'kernel':<{width}}  {'calls':>5}  {'us/run':>9}  {'share':>6}"]

    def row(name, calls, seconds, percent):
        return f"{name:<{width}}  {calls:>5}  {1e6 * seconds:>9.2f}  {percent:>5.1f}%"

    for k in kernels[:top]:
        lines.append(row(k.name, k.calls, k.seconds, k.percent))
    rest = kernels[top:]
    if rest:
        seconds, percent = sum(k.seconds for k in rest), sum(k.percent for k in rest)
        lines.append(row(f"({len(rest)} more kernels)", "", seconds, percent))
    lines += [row(k.name, "", k.seconds, k.percent) for k in vm]
    lines.append(row("total", "", sum(k.seconds for k in times), sum(k.percent for k in times)))
    return "\n".join(lines)


def _record_calls(vm, lib: tvm.runtime.Module, tensors) -> list[tuple]:
    """(module, kernel name, arguments) of each kernel call of one ``main`` call, in order.

    A kernel is a function of the library's compiled modules; the VM's own builtins
    (``vm.builtin.alloc_tensor``...) and nested Relax functions are not kernels.
    """
    owners: dict[str, tvm.runtime.Module | None] = {}
    calls = []

    def instrument(func, name, before_run, ret, *args):
        name = str(name)
        if before_run:
            if name not in owners:
                owners[name] = _owner(lib, name)
            if owners[name] is not None:
                calls.append((owners[name], name, args))
        return 0  # VMInstrumentReturnKind.NO_OP: run the call

    vm.set_instrument(instrument)
    try:
        vm["main"](*tensors)
    finally:
        vm.set_instrument(None)
    return calls


def _owner(lib: tvm.runtime.Module, name: str) -> tvm.runtime.Module | None:
    """The compiled (non-VM) module of ``lib``'s import tree that defines ``name``."""
    todo = list(lib.imports)
    while todo:
        mod = todo.pop()
        if mod.implements_function(name):
            return mod
        todo.extend(mod.imports)
    return None
