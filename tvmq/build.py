"""Build a Relax module for a :class:`~tvmq.targets.TargetPreset` and export it as a ``.so``.

:func:`build` is the last step of every tvmq flow: it runs the target's Relax pipeline
(legalize, fuse, schedule, lower) and links the virtual-machine executable.
:func:`export_library` writes that executable as one shared library for the board, linked
with the preset's (cross) compiler.

Tuned and default schedules
    :func:`build` runs in three phases: fuse the model into TIR kernels (:func:`fuse_to_tir`,
    also what :func:`tvmq.tuning.tune` extracts its tasks from), give kernels with a
    MetaSchedule tuning record their tuned schedule (``build_with_info``'s ``tuning_logs``;
    :func:`tvmq.compile` reads ``./tuning_logs/<preset>/`` and the logs shipped with tvmq),
    then schedule the rest and lower. Kernels already scheduled (``tirx.is_scheduled``: tuned,
    or emitted scheduled by a tvmq pass such as the VNNI int8 dense) are left alone. The
    others get a default schedule:

    * CUDA: the dlight GPU rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback), as in
      TVM's own CUDA pipeline, except that Matmul is skipped for integer matmuls, on which it
      crashes in TVM 0.27 (those fall through to the other rules: slow but built).
    * CPU (llvm): TVM's CPU pipeline (which, unlike ``relax.build``'s default, fuses
      operators) plus :class:`tvmq.cpu_schedule.CPUDefaultSchedule`, a cheap parallel + SIMD schedule. It made
      untuned float MLPs, CNNs and a transformer block 13 to 30x faster than TVM's
      unscheduled loops on x86; the dlight CPU rules (GEMV, Reduction) measured slower and
      are not used.

CUDA device code
    TVM 0.27 generates CUDA C++ and compiles it through the ``tvm_callback_cuda_compile``
    hook: with NVRTC (the ``cuda-python`` package) by default, and only where the CUDA
    runtime library loads, i.e. on a machine with an NVIDIA driver. Elsewhere the module
    keeps the CUDA *source*, and whoever loads the ``.so`` must compile it. tvmq instead
    always embeds PTX compiled by ``nvcc`` for the preset's ``arch``: during :func:`build` it
    routes the hook to nvcc, and on a machine without the driver :func:`export_library`
    compiles the kept source and writes PTX into the library in its place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import tvm
import tvm_ffi
from tvm import relax, tirx

from tvmq import tuning
from tvmq.errors import TvmqError
from tvmq.lowering import fuse_to_tir, schedule_and_lower
from tvmq.targets import TargetPreset, get_target
from tvmq.toolchain import find_compiler

if TYPE_CHECKING:
    from tvm.s_tir.meta_schedule import Database

__all__ = ["BuildInfo", "build", "build_with_info", "export_library", "fuse_to_tir"]

_CUDA_COMPILE_HOOK = "tvm_callback_cuda_compile"
_PTX_CACHE: OrderedDict[tuple[str, str], bytes] = OrderedDict()
_PTX_CACHE_SIZE = 16
TuningLogs: TypeAlias = 'Literal["auto"] | str | os.PathLike | Database | Sequence | None'
"""Where :func:`build_with_info` reads tuning records: see its ``tuning_logs``."""


def build(
    mod: tvm.IRModule,
    target: TargetPreset | str,
    *,
    tuning_logs: TuningLogs = None,
) -> tvm.relax.VMExecutable:
    """Compile a Relax module for a target preset.

    Parameters
    ----------
    mod : tvm.IRModule
        A Relax module, e.g. from ``tvm.relax.frontend.torch.from_exported_program``, possibly
        already transformed (quantized, pruned) by other tvmq passes.
    target : TargetPreset or str
        The preset, or anything :func:`tvmq.targets.get_target` accepts.
    tuning_logs : "auto", path, Database or a sequence of them, optional
        MetaSchedule records to schedule kernels with (see :func:`build_with_info`). The
        default, None, uses none: every kernel gets the default schedule.

    Returns
    -------
    tvm.relax.VMExecutable
        Runnable here with ``relax.VirtualMachine`` when the preset is this machine's kind;
        otherwise pass it to :func:`export_library`.

    Raises
    ------
    TvmqError
        When TVM fails to compile the model (the message keeps TVM's), or when ``nvcc`` is
        missing or rejects the generated CUDA code.
    """
    return build_with_info(mod, target, tuning_logs=tuning_logs)[0]


def build_with_info(
    mod: tvm.IRModule,
    target: TargetPreset | str,
    *,
    tuning_logs: TuningLogs = "auto",
) -> tuple[tvm.relax.VMExecutable, BuildInfo]:
    """:func:`build`, applying tuning records, and say which kernels were tuned.

    Kernels with a record in ``tuning_logs`` (same workload, same target CPU or GPU) get the
    best tuned schedule; the others get tvmq's default schedule, as in :func:`build`.

    Parameters
    ----------
    mod : tvm.IRModule
        As for :func:`build`.
    target : TargetPreset or str
        As for :func:`build`.
    tuning_logs : "auto", path, Database or a sequence of them, optional
        ``"auto"`` (the default) reads ``./tuning_logs/<preset>/`` (what
        :func:`tvmq.tuning.tune` writes by default) and the logs shipped with tvmq for the
        preset; a path is a folder with ``database_workload.json`` and
        ``database_tuning_record.json``; None applies no records.

    Returns
    -------
    (tvm.relax.VMExecutable, BuildInfo)
        The executable, and which kernels were tuned and which got the default schedule.

    Raises
    ------
    TvmqError
        As for :func:`build`, and for a log folder that does not exist or cannot be read.
    """
    preset = get_target(target)
    tvm_target = preset.tvm_target()
    is_cuda = preset.kind == "cuda"
    database, log_dirs = tuning.open_tuning_logs(tuning_logs, preset)
    hook = _nvcc_compiles_cuda(tvm_target) if is_cuda else contextlib.nullcontext()
    try:
        with hook, tvm_target:
            fused = fuse_to_tir(mod, preset)
            prescheduled = _scheduled_kernels(fused)
            if database is not None:
                with database:
                    fused = relax.transform.MetaScheduleApplyDatabase()(fused)
            scheduled = _scheduled_kernels(fused)
            with _without_kernel_asserts():
                ex = relax.build(
                    fused, target=tvm_target, relax_pipeline=schedule_and_lower(tvm_target)
                )
    except TvmqError:
        raise
    except Exception as err:  # TVM raises many error types; a failed build is the user's to see
        raise TvmqError(
            f"building the model for target {preset.name!r} failed: {type(err).__name__}: {err}"
        ) from err
    if is_cuda:
        # Compile any CUDA source left in the executable now, so nvcc errors surface here.
        for module in _import_tree(ex.mod):
            if module.kind == "cuda" and _holds_cuda_source(module):
                _compile_ptx(module.inspect_source("cuda"), tvm_target, preset.name)
    kernels = _kernel_names(fused)
    info = BuildInfo(
        tuned=tuple(k for k in kernels if k in scheduled and k not in prescheduled),
        default=tuple(k for k in kernels if k not in scheduled),
        prescheduled=tuple(k for k in kernels if k in prescheduled),
        tuning_logs=tuple(str(d) for d in log_dirs),
    )
    return ex, info


@dataclass(frozen=True)
class BuildInfo:
    """How the kernels (TIR functions) of a build were scheduled.

    ``tuned``: from tuning records; ``default``: tvmq's default schedule (or TVM's plain
    loops where it does not apply); ``prescheduled``: kernels tvmq's passes emit already
    scheduled (e.g. the VNNI int8 dense), which tuning leaves alone; ``tuning_logs``: the
    record folders consulted.
    """

    tuned: tuple[str, ...]
    default: tuple[str, ...]
    prescheduled: tuple[str, ...] = ()
    tuning_logs: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line, e.g. ``"2 tuned, 1 default"`` (plus any prescheduled kernels)."""
        text = f"{len(self.tuned)} tuned, {len(self.default)} default"
        if self.prescheduled:
            text += f", {len(self.prescheduled)} prescheduled"
        return text

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data, for a manifest."""
        return {
            "tuned": list(self.tuned),
            "default": list(self.default),
            "prescheduled": list(self.prescheduled),
            "tuning_logs": list(self.tuning_logs),
        }


# Linker options for every exported library (GNU ld and lld both take them):
# * -s: debug info and the symbol table are a third of a small model's library and nothing
#   at run time needs them (TVM finds kernels through the dynamic symbols, kept by -s).
# * -z noseparate-code: x86-64 GNU ld otherwise puts the headers, the code and the read-only
#   data (the weights) in separate segments, each padded to a 4 KiB page: up to 8 KiB of
#   zeros per library. With it the read-only data shares the executable segment, which is
#   what GNU ld does on AArch64 (and lld everywhere) anyway.
# * -z norelro: RELRO pads the writable segment (GOT, dynamic table) to a page boundary so
#   that it can be made read-only after loading: 3 to 4 KiB of zeros on x86-64, up to
#   24 KiB on AArch64 (64 KiB pages), to protect a GOT of one or two entries (the TVM
#   error and parallel-launch functions).
# The code and the weights are unchanged: only padding goes, not anything the model runs.
_LINK_OPTIONS = ("-s", "-Wl,-z,noseparate-code", "-Wl,-z,norelro")


def export_library(
    ex: tvm.relax.VMExecutable, path: str | os.PathLike, target: TargetPreset | str
) -> None:
    """Write a built executable as one shared library for the target.

    Parameters
    ----------
    ex : tvm.relax.VMExecutable
        The result of :func:`build` for the same target.
    path : str or os.PathLike
        The ``.so`` to write. Load it on the target with ``tvm.runtime.load_module`` and run
        it with ``relax.VirtualMachine(lib, preset.device())``.
    target : TargetPreset or str
        The preset the executable was built for; its ``cc`` links the library (the system
        default C++ compiler when ``cc`` is null).

    Raises
    ------
    TvmqError
        When the preset's cross compiler is not installed (the message names the Debian
        package), or when compiling or linking fails.
    """
    preset = get_target(target)
    kwargs = {"options": list(_LINK_OPTIONS)}
    if preset.cc is not None:
        kwargs["cc"] = find_compiler(preset.cc, preset.name)
    if preset.kind == "cuda":
        kwargs["fpack_imports"] = _PTXImportPacker(preset)
    path = Path(path)
    try:
        ex.mod.export_library(str(path), **kwargs)
    except TvmqError:
        raise
    except Exception as err:  # linker and packer failures come in several types
        raise TvmqError(
            f"exporting the model for target {preset.name!r} to {path} failed: "
            f"{type(err).__name__}: {err}"
        ) from err


# --------------------------------------------------------------------------------------
# Pipelines


@contextlib.contextmanager
def _without_kernel_asserts() -> Iterator[None]:
    """Build kernels without TVM's argument checks (``tirx.disable_assert``).

    Every TIR kernel gets a wrapper that checks each argument's type, rank, dtype, device,
    shape and strides: 1.6 to 3 KB of code per kernel, most of a small model's code (the int8
    MLP's six kernels: 14 of 18 KB). Only the virtual machine calls the kernels, with tensors
    it allocated from the shapes it checked itself: the model's inputs are still checked by
    the VM (``check_tensor_info`` / ``match_shape``) and by :func:`tvmq.load`.
    """
    current = tvm.transform.PassContext.current()
    config = {**dict(current.config), "tirx.disable_assert": True}
    with tvm.transform.PassContext(opt_level=current.opt_level, config=config):
        yield


def _kernel_names(mod: tvm.IRModule) -> list[str]:
    """Names of the TIR functions of a module, sorted."""
    return sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


def _scheduled_kernels(mod: tvm.IRModule) -> set[str]:
    """Names of the TIR functions already marked ``tirx.is_scheduled``."""
    return {
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, tirx.PrimFunc) and f.attrs is not None and f.attrs.get("tirx.is_scheduled")
    }


# --------------------------------------------------------------------------------------
# CUDA: PTX compiled by nvcc


@contextlib.contextmanager
def _nvcc_compiles_cuda(target: tvm.target.Target) -> Iterator[None]:
    """Route TVM's CUDA compile hook to nvcc -> PTX while building (used where the CUDA
    runtime loads; elsewhere TVM keeps the source and _PTXImportPacker compiles it)."""
    previous = tvm_ffi.get_global_func(_CUDA_COMPILE_HOOK, allow_missing=True)
    tvm_ffi.register_global_func(
        _CUDA_COMPILE_HOOK, lambda code: _compile_ptx(code, target, None), override=True
    )
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(_CUDA_COMPILE_HOOK, previous, override=True)
        else:
            tvm_ffi.remove_global_func(_CUDA_COMPILE_HOOK)


def _compile_ptx(source: str, target: tvm.target.Target, preset_name: str | None) -> bytes:
    """PTX (NUL-terminated, as cuModuleLoadData wants) for CUDA source; cached per source."""
    from tvm.support import nvcc as tvm_nvcc

    arch = str(target.attrs["arch"])
    key = (hashlib.sha256(source.encode()).hexdigest(), arch)
    if key in _PTX_CACHE:
        _PTX_CACHE.move_to_end(key)
        return _PTX_CACHE[key]
    where = f" for target {preset_name!r}" if preset_name else ""
    if shutil.which("nvcc") is None:
        raise TvmqError(
            f"compiling CUDA kernels{where} needs nvcc, which is not on PATH: install the "
            "CUDA toolkit (tvmq embeds PTX compiled by nvcc in the library)"
        )
    try:
        with target:
            ptx = tvm_nvcc.compile_cuda(source, target_format="ptx", arch=arch, compiler="nvcc")
    except RuntimeError as err:
        # TVM's message is the whole CUDA source followed by nvcc's output: keep the output.
        log = str(err).rsplit("Compilation error:", 1)[-1].strip()
        raise TvmqError(f"nvcc failed to compile the CUDA kernels{where}: {log}") from err
    ptx = bytes(ptx).rstrip(b"\0") + b"\0"
    _PTX_CACHE[key] = ptx
    if len(_PTX_CACHE) > _PTX_CACHE_SIZE:
        _PTX_CACHE.popitem(last=False)
    return ptx


class _PTXImportPacker:
    """``fpack_imports`` for ``Module.export_library`` that embeds PTX for CUDA source.

    It packs the import tree as TVM does (``runtime.ModulePackImportsToTensor``), swaps each
    CUDA module saved as source (fmt ``"cuda"``) for PTX, and writes the blob as a C array
    named ``<prefix>__tvm_ffi__library_bin``, the symbol tvm-ffi reads when loading a
    library. Blob layout (tvm-ffi ``ProcessLibraryBin``): ``<nbytes: u64> <indptr: vec<u64>>
    <children: vec<u64>>`` then per module ``<kind: str> [<bytes>]`` (no bytes for
    ``"_lib"``); a CUDA module's bytes are ``<fmt: str> <function table> <code: bytes>``.
    """

    def __init__(self, preset: TargetPreset) -> None:
        self._preset = preset

    def __call__(
        self, mod: tvm.runtime.Module, is_system_lib: bool, prefix: str, workspace_dir: str
    ) -> str:
        if is_system_lib:
            raise TvmqError("tvmq does not export CUDA models as system libraries")
        pack = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")
        blob = pack(mod).numpy().tobytes()
        sources = [
            m.inspect_source("cuda").encode()
            for m in _import_tree(mod)
            if m.kind == "cuda" and _holds_cuda_source(m)
        ]
        if sources:
            blob = self._with_ptx(blob, sources)
        path = os.path.join(workspace_dir, f"{prefix}devc.c")
        with open(path, "w", encoding="ascii") as out:
            out.write(_c_array(f"{prefix}__tvm_ffi__library_bin", blob))
        return path

    def _with_ptx(self, blob: bytes, sources: list[bytes]) -> bytes:
        """Return the blob with every CUDA-source module replaced by its PTX."""
        reader = _BlobReader(blob)
        reader.u64()  # nbytes, recomputed below
        indptr = reader.u64_vector()
        children = reader.u64_vector()
        out = [struct.pack("<Q", len(indptr)), *(struct.pack("<Q", v) for v in indptr)]
        out += [struct.pack("<Q", len(children)), *(struct.pack("<Q", v) for v in children)]
        for _ in range(len(indptr) - 1):
            kind = reader.string()
            out.append(_pack_bytes(kind))
            if kind == b"_lib":
                continue
            payload = reader.string()
            if kind == b"cuda":
                payload = self._cuda_payload_with_ptx(payload, sources)
            out.append(_pack_bytes(payload))
        if not reader.at_end():
            raise TvmqError("unexpected data after the last module in TVM's packed library blob")
        body = b"".join(out)
        return struct.pack("<Q", len(body)) + body

    def _cuda_payload_with_ptx(self, payload: bytes, sources: list[bytes]) -> bytes:
        """Swap a CUDA module's source for PTX; modules already holding PTX/cubin pass."""
        fmt = _BlobReader(payload).string()
        if fmt != b"cuda":
            return payload
        for source in sources:
            tail = _pack_bytes(source)
            if payload.endswith(tail):
                head = payload[: len(payload) - len(tail)]
                function_table = head[len(_pack_bytes(fmt)) :]
                ptx = _compile_ptx(source.decode(), self._preset.tvm_target(), self._preset.name)
                return _pack_bytes(b"ptx") + function_table + _pack_bytes(ptx)
        raise TvmqError(
            "a CUDA module in the library holds source tvmq cannot match; "
            "it would need a CUDA compiler when loaded"
        )


class _BlobReader:
    """Little-endian reader for TVM's packed library blob."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def u64(self) -> int:
        if self._pos + 8 > len(self._data):
            raise TvmqError("TVM's packed library blob ends early")
        (value,) = struct.unpack_from("<Q", self._data, self._pos)
        self._pos += 8
        return value

    def u64_vector(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]

    def string(self) -> bytes:
        size = self.u64()
        if self._pos + size > len(self._data):
            raise TvmqError("TVM's packed library blob ends early")
        value = self._data[self._pos : self._pos + size]
        self._pos += size
        return value

    def at_end(self) -> bool:
        return self._pos == len(self._data)


def _pack_bytes(data: bytes) -> bytes:
    """Length-prefixed bytes, as TVM's binary streams write strings."""
    return struct.pack("<Q", len(data)) + data


def _c_array(symbol: str, data: bytes) -> str:
    """C source defining an exported ``const unsigned char symbol[]`` holding ``data``."""
    rows = (",".join(str(b) for b in data[i : i + 40]) for i in range(0, len(data), 40))
    return (
        "#ifdef __cplusplus\n"
        'extern "C" {\n'
        "#endif\n"
        f"extern const unsigned char {symbol}[];\n"  # external linkage even in C++
        f"const unsigned char {symbol}[{len(data)}] = {{\n" + ",\n".join(rows) + "\n};\n"
        "#ifdef __cplusplus\n"
        "}\n"
        "#endif\n"
    )


def _import_tree(mod: tvm.runtime.Module) -> list[tvm.runtime.Module]:
    """The module and everything it imports, each once."""
    seen, stack, found = set(), [mod], []
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        found.append(module)
        stack.extend(module.imports)
    return found


def _holds_cuda_source(module: tvm.runtime.Module) -> bool:
    """Whether a CUDA module still holds CUDA C++ rather than PTX/cubin."""
    return bool(module.inspect_source("cuda")) and not module.inspect_source("ptx")
