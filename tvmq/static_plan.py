"""A static call plan: a model's kernel calls on buffers allocated once, without the VM.

For a small model the Relax VM costs more than the kernels: each call enters the VM
(~0.4 us), checks the inputs again, and allocates every intermediate and output tensor
(~0.2 us each) before it runs a kernel. When the lowered ``main`` is straight-line code on
static shapes (what TVM's lowering makes of a static model: storage allocations, tensors
in that storage, kernel calls, reshapes, kills), the build records that code as a *plan*:
the storages with their sizes, the tensors viewed in them, and the kernel calls with their
operands. At load the runtime allocates the storages once, makes the same views, looks up
the same kernels in the library and calls them in order from Python. The storage sharing
is TVM's own memory plan (``StaticPlanBlockMemory``), so the memory is what one VM call
holds; the kernels, their operands and their order are the VM's, so the results are the
same bits. The plan's outputs live in its buffers: a call copies them out.

Constants cannot be read back from a library, so the build adds a Relax function,
:data:`CONSTANTS_FUNCTION`, that returns the plan's digest and constants: the VM shares the
constants with ``main``'s (its constant pool keeps one copy of each), and the runtime calls
it once. The kernels are built without argument checks, so the runtime makes a plan only
when its digest is the one compiled into the library: an edited or damaged ``model.json``
runs on the VM.

The plan lives in ``model.json`` (``library["plan"]``); a model without one (dynamic
shapes, control flow, a GPU, an operation the plan does not know) runs on the VM as before.
"""

from __future__ import annotations

import hashlib
import json
import mmap

import numpy as np
import tvm

CONSTANTS_FUNCTION = "tvmq_plan_constants"
"""The library function that returns the plan's constants, in the plan's order."""

RUNNER_FUNCTION = "tvmq_plan_run"
"""The library function that makes the plan's kernel calls in native code, given the
address of their operands' handles (:func:`tvmq.static_plan_record.runner_source`). A
library without it (exported before it existed, or by hand) is run from Python."""

TIMED_RUNNER_FUNCTION = "tvmq_plan_run_timed"
"""The same calls, the monotonic clock read before the first and after each
(:meth:`PlanRunner.time_steps`)."""

PLAN_VERSION = 1

HUGE_PAGE = 2 << 20
"""x86-64's and AArch64's (4 KiB granule) transparent huge page, 2 MiB."""


def plan_digest(plan: dict) -> str:
    """The sha256 of a plan's canonical JSON."""
    text = json.dumps(plan, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class PlanRunner:
    """A loaded plan: its buffers allocated, its kernels looked up, its constants fetched.

    ``run()`` makes the kernel calls; ``outputs`` are numpy views of the output tensors
    (the plan's own buffers: copy them before the next run). Built for a CPU device only.
    Raises ``ValueError`` when the plan does not match the library (then run the VM).
    """

    def __init__(self, plan: dict, lib: tvm.runtime.Module, vm, params: list):
        if plan.get("version") != PLAN_VERSION:
            raise ValueError(
                f"plan version {plan.get('version')}, this runtime reads {PLAN_VERSION}"
            )
        digest, *constants = vm[CONSTANTS_FUNCTION]()
        if str(digest) != plan_digest(plan) or len(constants) != plan["constants"]:
            raise ValueError("model.json's plan is not the one compiled into the library")
        storage = [_storage(n) for n in plan["storage"]]
        tensors: list = []
        sources = {"p": params, "c": constants, "s": storage, "t": tensors}

        def ref(name: str):
            return sources[name[0]][int(name[1:])]

        for source, shape, dtype in plan["tensors"]:
            tensors.append(ref(source)._create_view(shape, dtype))
        self.tensors = tuple(tensors)
        functions = [lib.get_function(k, query_imports=True) for k in plan["kernels"]]
        self.steps = tuple((functions[k], tuple(ref(a) for a in args)) for k, args in plan["steps"])
        self.names = tuple(plan["kernels"][k] for k, _ in plan["steps"])  # each step's kernel
        self.outputs = tuple(np.from_dlpack(ref(o)) for o in plan["outputs"])
        self._native = _library_function(lib, RUNNER_FUNCTION)
        self._timed = _library_function(lib, TIMED_RUNNER_FUNCTION)
        # every step's operands, as the runner reads them: object handles, step after step
        # (the tensors themselves are kept alive by self.steps)
        self._handles = np.array(
            [a.__chandle__() for _, args in self.steps for a in args], dtype=np.uint64
        )
        self._address = int(self._handles.ctypes.data)

    @property
    def native(self) -> bool:
        """Whether the calls are made by the library's native runner, not from Python."""
        return self._native is not None

    def time_steps(self) -> np.ndarray | None:
        """One run of the calls by the library's timed runner: each step's seconds (the
        monotonic clock read between the calls in native code, no Python in between), or None
        for a library without it."""
        if self._timed is None:
            return None
        stamps = np.zeros(len(self.steps) + 1, np.int64)
        self._timed(self._address, int(stamps.ctypes.data))
        return np.diff(stamps) * 1e-9

    def run(self) -> None:
        if self._native is not None:
            self._native(self._address)
        else:
            self.run_from_python()

    def run_from_python(self) -> None:
        """The same calls from a Python loop (a library without the native runner)."""
        for function, args in self.steps:
            function(*args)


def _library_function(lib: tvm.runtime.Module, name: str):
    """The library's function ``name``, or None where it has none."""
    try:
        return lib.get_function(name, query_imports=True)
    except AttributeError:
        return None


def _storage(nbytes: int) -> tvm.runtime.Tensor:
    """A plan storage of ``nbytes``, host memory aligned to 64 bytes or more.

    One of at least a megabyte is mapped on its own, 2 MiB aligned, and advised for
    transparent huge pages (``MADV_HUGEPAGE``; Linux's default THP mode, ``madvise``, gives
    them only to such regions): a layer's multi-megabyte activations then cost a few TLB
    entries instead of hundreds (1 thread, 224x224: UNet fp32 1.7% faster, the YOLO-style
    neck 1.2%, ResNets unchanged). Elsewhere, or if the mapping fails, TVM's allocator.
    """
    if nbytes >= HUGE_PAGE // 2 and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            region.madvise(mmap.MADV_HUGEPAGE)
            raw = np.frombuffer(region, np.uint8)  # keeps the mapping alive, as DLPack does it
            start = -raw.ctypes.data % HUGE_PAGE
            return tvm.runtime.from_dlpack(raw[start : start + nbytes])
        except (OSError, ValueError):
            pass
    return tvm.runtime.empty((nbytes,), "uint8", tvm.cpu(0))
