"""Load a compiled tvmq directory and run it on numpy arrays; measure its latency.

Needs only TVM's runtime: a deploy bundle (:mod:`tvmq.bundle`) ships this module with
``libtvm_runtime.so`` and no compiler, so nothing here may import ``tvm.relax``.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from tvmq.errors import InputMismatchError, TvmqError
from tvmq.frontends.model import TensorSpec, bind_symbols, concrete_shape
from tvmq.machine import library_arch, missing_cpu_features, this_machine
from tvmq.manifest import Manifest, sha256_of
from tvmq.static_plan import PlanRunner


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model call, in milliseconds, over ``repeat`` timed runs."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    repeat: int

    @classmethod
    def from_seconds(cls, samples: list[float]) -> LatencyStats:
        ms = sorted(s * 1e3 for s in samples)
        p90 = float(np.percentile(ms, 90))
        return cls(statistics.median(ms), p90, statistics.fmean(ms), ms[0], len(ms))


def random_inputs(
    specs: list[TensorSpec], seed: int = 0, sizes: dict[str, int] | None = None
) -> list[np.ndarray]:
    """Random arrays matching the specs (normal floats, small integers: below 10 and the
    input's ``index_bound``); a symbolic dim takes its size from ``sizes`` (default 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in specs:
        shape = concrete_shape(s, sizes or {})
        if s.dtype.startswith("float"):
            out.append(rng.standard_normal(shape).astype(s.dtype))
        else:
            out.append(rng.integers(0, min(10, s.index_bound or 10), size=shape).astype(s.dtype))
    return out


def _outside(a: np.ndarray, bound: int | None):
    """A value of the index input ``a`` outside ``[0, bound)`` (the lowest or the highest),
    or None (also without a bound)."""
    if bound is None or not a.size:
        return None
    lo, hi = a.min(), a.max()
    return lo if lo < 0 else hi if hi >= bound else None


def check_inputs(specs: list[TensorSpec], args, kwargs) -> list[np.ndarray]:
    """Match positional or keyword inputs to the manifest's specs; contiguous arrays in order.

    Raises
    ------
    InputMismatchError
        For a wrong count, unknown or missing names, non-numeric data (strings, objects),
        or a shape or dtype the model was not compiled for.
    """
    if args and kwargs:
        raise InputMismatchError("pass inputs either by position or by name, not both")
    if kwargs:
        unknown = sorted(set(kwargs) - {s.name for s in specs})
        missing = [s.name for s in specs if s.name not in kwargs]
        if unknown or missing:
            raise InputMismatchError(
                f"inputs {unknown or ''} unknown, {missing or ''} missing; "
                f"the model takes {[s.name for s in specs]}"
            )
        args = [kwargs[s.name] for s in specs]
    if len(args) != len(specs):
        raise InputMismatchError(
            f"the model takes {len(specs)} input(s) {[s.name for s in specs]}, got {len(args)}"
        )
    arrays = []
    for spec, a in zip(specs, args, strict=True):
        a = np.asarray(a)
        if a.dtype.kind not in "biufc":  # strings or objects: say so, not "wrong dtype"
            raise InputMismatchError(
                f"input '{spec.name}': dtype {a.dtype} is not numeric (the model expects "
                f"{spec.dtype} numbers)"
            )
        if str(a.dtype) != spec.dtype:
            raise InputMismatchError(
                f"input '{spec.name}': dtype {a.dtype}, the model expects {spec.dtype}"
            )
        bad = _outside(a, spec.index_bound)
        if bad is not None:
            bound = spec.index_bound
            raise InputMismatchError(
                f"input '{spec.name}': value {bad} is outside 0..{bound - 1}; it indexes a table "
                f"of {bound} rows (for token ids: the vocabulary's size)"
            )
        arrays.append(np.asarray(a, order="C"))  # unlike ascontiguousarray, keeps 0-d 0-d
    try:  # ranks and static dims; a symbolic dim takes any size, the same in every input
        bind_symbols(specs, [a.shape for a in arrays])
    except ValueError as e:
        raise InputMismatchError(str(e)) from None
    return arrays


def verified_library(directory: Path, manifest: Manifest) -> Path:
    """The path of the compiled library, checked to exist and to match the manifest's sha256."""
    lib_path = directory / manifest.library["file"]
    if not lib_path.is_file():
        raise TvmqError(f"{lib_path}: the compiled library is missing")
    expected = manifest.library.get("sha256")
    if expected and sha256_of(lib_path) != expected:
        raise TvmqError(f"{lib_path}: sha256 differs from model.json; the library is damaged")
    return lib_path


def _load_fresh(lib_path: Path) -> tvm.runtime.Module:
    """``load_module`` that really loads a library rebuilt in place.

    TVM dlopens the real path, and dlopen hands back an already-loaded library when that
    name matches, even if the file was replaced since (a recompile into the same
    directory in one process): the old model would run. Loading through a hard link of a
    fresh name (a copy where links are not possible) makes every load see the file as it is.
    """
    fresh = lib_path.with_name(f".{lib_path.stem}-{uuid.uuid4().hex}{lib_path.suffix}")
    tmp_dir = None
    try:
        os.link(lib_path, fresh)
    except OSError:  # read-only directory, or a filesystem without hard links
        tmp_dir = Path(tempfile.mkdtemp(prefix="tvmq-load-"))
        fresh = tmp_dir / lib_path.name
        shutil.copyfile(lib_path, fresh)
    try:
        return tvm.runtime.load_module(str(fresh))
    finally:
        fresh.unlink(missing_ok=True)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


class CompiledModel:
    """A compiled model, callable on numpy arrays.

    ``model(x)`` or ``model(input_name=x)`` returns one array when the model has one
    output, else a tuple of arrays, in the manifest's output order. The arrays are the
    caller's own (tensors the call allocated, or copies): a later call never changes them.

    Calls on one model from several threads are safe; they run one at a time (a lock
    guards the model's input buffers and its VM).
    """

    def __init__(self, directory: os.PathLike, device: tvm.runtime.Device | None = None):
        self.directory = Path(directory)
        self.manifest = Manifest.read(self.directory)
        lib_path = verified_library(self.directory, self.manifest)
        target = self.manifest.target
        if library_arch(target) != this_machine():
            raise TvmqError(
                f"{self.directory} was compiled for target '{target.get('name')}', which does "
                "not run on this machine; run it on the board (tvmq bundle makes a folder that "
                "runs there with the TVM runtime only)"
            )
        lacking = (
            missing_cpu_features(target.get("features") or ())
            if target.get("kind") == "llvm"
            else []
        )
        if lacking:
            raise TvmqError(
                f"{self.directory} was compiled for target '{target.get('name')}' with "
                f"{', '.join(lacking)}, which this CPU does not have (or its OS does not allow); "
                "compile it again for this machine (-t host)"
            )
        self.device = device if device is not None else _device_for(self.manifest)
        try:
            load_device_runtime(self.device)
            self._lib = _load_fresh(lib_path)
            self._vm = VirtualMachine(self._lib, self.device)
            self._params = decoded_params(self._vm)
            self._main = self._vm["main"]
        except Exception as e:
            raise TvmqError(
                f"{lib_path}: cannot load for target '{target.get('name')}' on {self.device}: {e}"
            ) from e
        self._lock = threading.Lock()
        self._slots = _InputSlots.for_inputs(self.manifest.inputs, self.device, self._params)
        # The VM allocates every output anew per call (the build checked): numpy may keep
        # TVM's tensor itself, no copy. Libraries built before the check say nothing: copy.
        self._fresh_outputs = bool(self.manifest.library.get("fresh_outputs"))
        self._plan = self._load_plan()
        # one input with a slot: a call that skips the general path's lookups (~0.3 us)
        self._call_one = (
            _one_input_call(self, self._slots)
            if self._slots is not None and len(self._slots.arrays) == 1 and not self._slots.bounded
            else None
        )

    def _load_plan(self) -> PlanRunner | None:
        """The library's static call plan, loaded, where the model has one and its inputs
        have slots (a CPU device, static shapes); else None: calls run on the VM."""
        plan = self.manifest.library.get("plan")
        if plan is None or self._slots is None:
            return None
        try:
            return PlanRunner(plan, self._lib, self._vm, list(self._slots.main_args))
        except Exception:  # a plan this runtime cannot make: the VM runs the same kernels
            return None

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.manifest.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.manifest.outputs

    def _to_device(self, args, kwargs) -> list:
        arrays = check_inputs(self.manifest.inputs, args, kwargs)
        return [tvm.runtime.tensor(a, self.device) for a in arrays]

    def main_args(self, tensors: list) -> list:
        """The arguments of the VM's ``main``: the inputs, then any weights decoded at load."""
        return [*tensors, *self._params]

    def __call__(self, *args, **kwargs):
        if self._call_one is not None and len(args) == 1 and not kwargs:
            return self._call_one(args[0])  # the common case: one array, one input
        return self._call(args, kwargs)

    def _call(self, args: tuple, kwargs: dict):
        slots = self._slots
        if slots is None:  # a device other than the CPU, or symbolic shapes
            tensors = self._to_device(args, kwargs)
            with self._lock:
                outs = _flatten(self._main(*self.main_args(tensors)))
            return outs[0] if len(outs) == 1 else tuple(outs)
        if kwargs or not slots.accepts(args):
            # The full check: it names what is wrong, or takes lists, names, other layouts.
            args = check_inputs(self.manifest.inputs, args, kwargs)
        with self._lock:
            slots.fill(args)
            if self._plan is not None:
                self._plan.run()
                outs = [o.copy() for o in self._plan.outputs]  # the plan's buffers: copies
                return outs[0] if len(outs) == 1 else tuple(outs)
            result = self._main(*slots.main_args)
        return _host_outputs(result, self._fresh_outputs)

    def benchmark(
        self, inputs: list[np.ndarray] | None = None, *, warmup: int = 10, repeat: int = 100
    ) -> LatencyStats:
        """Time ``repeat`` calls after ``warmup`` calls (inputs already on the device): the
        static plan's kernel calls where the model has one (what a call runs), else the VM's
        ``main``."""
        if self._plan is not None:
            return self._benchmark_plan(inputs, warmup, repeat)
        tensors = self._to_device(inputs or random_inputs(self.manifest.inputs), {})
        self._vm.set_input("main", *self.main_args(tensors))
        for _ in range(max(warmup, 0)):
            self._vm.invoke_stateful("main")
        timer = self._vm.time_evaluator("invoke_stateful", self.device, number=1, repeat=repeat)
        return LatencyStats.from_seconds(list(timer("main").results))

    def _time_plan_steps(self, args, kwargs, warmup: int, repeat: int):
        """Each kernel call of the static plan timed where it runs: in the model's order, on
        the caches the calls before it leave, ``repeat`` runs of the whole plan after
        ``warmup``, on the inputs ``args`` / ``kwargs`` (as for a call). Returns ``(names,
        seconds, runs)``: the kernel of each step, each step's ``repeat`` times, and each
        run's total. The library's timed runner reads the clock between the calls in native
        code; a library without it is timed from Python (each step then includes its call
        from Python, the run the loop). None for a model without a plan (it runs on the VM)."""
        if self._plan is None:
            return None
        arrays = check_inputs(self.manifest.inputs, args, kwargs)
        plan, clock = self._plan, time.perf_counter
        seconds: list[list[float]] = [[] for _ in plan.steps]
        runs = []
        with self._lock:
            self._slots.fill(arrays)
            for _ in range(max(warmup, 0)):
                plan.run()
            for _ in range(max(repeat, 1)):
                steps = plan.time_steps()  # the library's timed runner: no Python between
                if steps is not None:
                    for times, t in zip(seconds, steps, strict=True):
                        times.append(float(t))
                    runs.append(float(steps.sum()))
                    continue
                begin = clock()
                for (function, operands), times in zip(plan.steps, seconds, strict=True):
                    start = clock()
                    function(*operands)
                    times.append(clock() - start)
                runs.append(clock() - begin)
        return plan.names, seconds, runs

    def _benchmark_plan(self, inputs, warmup: int, repeat: int) -> LatencyStats:
        arrays = check_inputs(self.manifest.inputs, inputs or random_inputs(self.inputs), {})
        run, clock, samples = self._plan.run, time.perf_counter, []
        with self._lock:
            self._slots.fill(arrays)
            for _ in range(max(warmup, 0)):
                run()
            for _ in range(max(repeat, 1)):
                start = clock()
                run()
                samples.append(clock() - start)
        return LatencyStats.from_seconds(samples)


def _host_outputs(result, fresh: bool):
    """A CPU call's result as the caller's arrays: one array, or a tuple of them."""
    outs = _flatten(result, on_host=True, fresh=fresh)
    return outs[0] if len(outs) == 1 else tuple(outs)


def _one_input_call(model: CompiledModel, slots: _InputSlots):
    """``model``'s call on one array, with what it needs bound once: the slot, its dtype and
    shape, the lock and the VM function. Anything but a numpy array of exactly that dtype and
    shape takes the general path (which checks it or names what is wrong)."""
    (buffer,), ((dtype, shape),), main_args = slots.arrays, slots.signature, slots.main_args
    lock, main, fresh = model._lock, model._main, model._fresh_outputs
    this = weakref.proxy(model)  # not the model itself: no cycle keeps it alive
    copyto, from_dlpack = np.copyto, np.from_dlpack
    plan = model._plan
    if plan is not None:
        run, outs = plan.run, plan.outputs
        out = outs[0] if len(outs) == 1 else None

        def call_plan(a):
            if type(a) is not np.ndarray or a.shape != shape or a.dtype != dtype:
                return this._call((a,), {})
            with lock:
                buffer[...] = a  # (a little faster than np.copyto)
                run()
                return out.copy() if out is not None else tuple(o.copy() for o in outs)

        return call_plan

    def call(a):
        if type(a) is not np.ndarray or a.shape != shape or a.dtype != dtype:
            return this._call((a,), {})
        with lock:
            copyto(buffer, a)
            result = main(*main_args)
        if fresh and type(result) is _Tensor:
            return from_dlpack(result)
        return _host_outputs(result, fresh)

    return call


class _InputSlots:
    """One preallocated host buffer per input, seen by TVM without a copy (DLPack).

    A call copies its arrays into them with numpy (about 1 us for a 3 KB input) instead of
    allocating a TVM tensor per input per call (20-35 us here). Only for a CPU device and
    static input shapes; the buffers are 64-byte aligned, as TVM's kernels assume.
    """

    def __init__(self, specs: list[TensorSpec], params: list):
        self.signature = tuple((np.dtype(s.dtype), tuple(s.shape)) for s in specs)
        # (position, index_bound) of the inputs that index a table (TensorSpec.index_bound)
        self.bounded = tuple((i, s.index_bound) for i, s in enumerate(specs) if s.index_bound)
        self.arrays = [_aligned_empty(shape, dtype) for dtype, shape in self.signature]
        # the arguments of ``main``: these buffers, then any weights decoded at load
        self.main_args = (*(tvm.runtime.from_dlpack(a) for a in self.arrays), *params)

    @classmethod
    def for_inputs(cls, specs: list[TensorSpec], device, params: list) -> _InputSlots | None:
        if device.dlpack_device_type() != tvm.cpu(0).dlpack_device_type():
            return None
        if not all(isinstance(d, int) for s in specs for d in s.shape):
            return None
        try:
            return cls(specs, params)
        except (TypeError, ValueError, RuntimeError):  # a dtype numpy or DLPack lacks
            return None

    def fill(self, arrays) -> None:
        """Copy one array per input into the buffers (call under the model's lock)."""
        for buffer, a in zip(self.arrays, arrays, strict=True):
            np.copyto(buffer, a)

    def accepts(self, args: tuple) -> bool:
        """Whether ``args`` are numpy arrays of exactly the inputs' dtypes and shapes, index
        inputs within their tables (what :func:`check_inputs` would pass unchanged, up to
        memory layout)."""
        return (
            len(args) == len(self.signature)
            and all(
                type(a) is np.ndarray and a.dtype == dtype and a.shape == shape
                for a, (dtype, shape) in zip(args, self.signature, strict=True)
            )
            and all(_outside(args[i], bound) is None for i, bound in self.bounded)
        )


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.__array_interface__["data"][0] % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


_ALIGN = 64


_Tensor = tvm.runtime.Tensor


def _flatten(result, on_host: bool = False, fresh: bool = False) -> list[np.ndarray]:
    """The outputs as numpy arrays; ``on_host``: they are in host memory (a CPU device);
    ``fresh``: each is a tensor the VM allocated for this call alone (numpy may keep it)."""
    if isinstance(result, _Tensor):
        if on_host:
            # By numpy (Tensor.numpy() costs ~10 us more at this size); a copy unless fresh:
            # an output can share memory with an input buffer or a constant.
            out = np.from_dlpack(result)
            return [out if fresh else out.copy()]
        return [result.numpy()]
    out = []
    for r in result:
        out.extend(_flatten(r, on_host, fresh))
    return out


DECODE_AT_LOAD = "main_transform_params"
"""A library function that computes weights stored compressed (``tvmq.passes.DecodeAtLoad``;
the name and convention of TVM's ``LiftTransformParams``): run once at load, its outputs are
passed to ``main`` after the inputs."""


def decoded_params(vm: VirtualMachine) -> list:
    """The outputs of the library's :data:`DECODE_AT_LOAD` function (run once, here), or
    ``[]`` for a library without one."""
    if not vm.module.implements_function(DECODE_AT_LOAD):
        return []
    return list(vm[DECODE_AT_LOAD]())


def load_device_runtime(device: tvm.runtime.Device) -> None:
    """Load TVM's CUDA runtime library where ``import tvm`` did not (runtime-only TVM).

    A full TVM loads ``libtvm_runtime_cuda.so`` with its backends; with the runtime only
    (``TVM_USE_RUNTIME_LIB=1``, or no compiler library, as in a bundle) nothing does, and a
    CUDA model would find no CUDA device API. A CPU device needs nothing.
    """
    from tvm import base

    if device.dlpack_device_type() != tvm.cuda(0).dlpack_device_type():
        return
    if "tvm_runtime_cuda" in base._LOADED_LIBS:
        return
    from tvm_ffi.libinfo import load_lib_ctypes

    lib_dir = Path(base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            "tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=[lib_dir]
        )
    except (OSError, RuntimeError) as e:
        raise TvmqError(
            f"cannot load TVM's CUDA runtime from {lib_dir} ({e}); it needs the CUDA 13 "
            "runtime (libcudart.so.13) and an NVIDIA driver"
        ) from None


def output_summary(spec: TensorSpec, y: np.ndarray) -> str:
    """One line about an output: shape, dtype, mean, max (and the argmax of 2-D scores)."""
    summary = f"{spec.name}: shape {y.shape} {y.dtype}"
    if y.size:
        summary += f", mean {float(y.mean()):.6g}, max {float(y.max()):.6g}"
        if y.ndim == 2:
            summary += f", argmax {y.argmax(axis=1)[:8].tolist()}"
    return summary


def _device_for(manifest: Manifest) -> tvm.runtime.Device:
    kind = manifest.target.get("kind", "llvm")
    return tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)


def load(directory: os.PathLike, device: tvm.runtime.Device | None = None) -> CompiledModel:
    """Load the output of ``tvmq compile`` for running on this machine."""
    return CompiledModel(directory, device)
