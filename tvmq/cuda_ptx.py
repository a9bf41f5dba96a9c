"""CUDA device code as PTX compiled by ``nvcc``, embedded in the exported library.

TVM 0.27 generates CUDA C++ and compiles it through the ``tvm_callback_cuda_compile``
hook: with NVRTC (the ``cuda-python`` package) by default, and only where the CUDA
runtime library loads, i.e. on a machine with an NVIDIA driver. Elsewhere the module
keeps the CUDA *source*, and whoever loads the ``.so`` must compile it. tvmq instead
always embeds PTX compiled by ``nvcc`` for the preset's ``arch``: during
:func:`tvmq.build.build` it routes the hook to nvcc, and on a machine without the driver
:func:`tvmq.build.export_library` compiles the kept source and writes PTX into the library
in its place.

:func:`nvcc_compiles_cuda` routes the hook while building, :func:`compile_cuda_sources`
surfaces nvcc errors at build time, and :class:`PTXImportPacker` is the ``fpack_imports``
of ``export_library`` that swaps kept CUDA source for PTX.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
from collections import OrderedDict
from collections.abc import Iterator

import tvm
import tvm_ffi

from tvmq.errors import TvmqError
from tvmq.targets import TargetPreset

__all__ = ["PTXImportPacker", "compile_cuda_sources", "nvcc_compiles_cuda"]

_CUDA_COMPILE_HOOK = "tvm_callback_cuda_compile"
_PTX_CACHE: OrderedDict[tuple[str, str], bytes] = OrderedDict()
_PTX_CACHE_SIZE = 16


def compile_cuda_sources(
    mod: tvm.runtime.Module, target: tvm.target.Target, preset_name: str
) -> None:
    """Compile (and cache) the CUDA source any module of `mod` kept, so nvcc errors surface
    when building rather than when exporting."""
    for module in _import_tree(mod):
        if module.kind == "cuda" and _holds_cuda_source(module):
            _compile_ptx(module.inspect_source("cuda"), target, preset_name)


@contextlib.contextmanager
def nvcc_compiles_cuda(target: tvm.target.Target) -> Iterator[None]:
    """Route TVM's CUDA compile hook to nvcc -> PTX while building (used where the CUDA
    runtime loads; elsewhere TVM keeps the source and PTXImportPacker compiles it)."""
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


class PTXImportPacker:
    """``fpack_imports`` for ``Module.export_library`` that embeds PTX for CUDA source.

    It packs the import tree as TVM does (``runtime.ModulePackImportsToTensor``), swaps each
    CUDA module saved as source (fmt ``"cuda"``) for PTX, and writes the blob (``.incbin`` in
    an assembly file) as ``<prefix>__tvm_ffi__library_bin``, the symbol tvm-ffi reads when
    loading a library. Blob layout (tvm-ffi ``ProcessLibraryBin``): ``<nbytes: u64> <indptr: vec<u64>>
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
        # Assembly that includes the blob's bytes, not a C array of them: g++ needs more
        # than 130 bytes of memory per array byte (MiniLM w8 at batch 32, a 142 MB blob:
        # over 19 GB, the link failed), the assembler's .incbin just copies them.
        data = os.path.join(workspace_dir, f"{prefix}devc.bin")
        with open(data, "wb") as out:
            out.write(blob)
        path = os.path.join(workspace_dir, f"{prefix}devc.S")
        with open(path, "w", encoding="utf-8") as out:
            out.write(_asm_blob(f"{prefix}__tvm_ffi__library_bin", data))
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


def _asm_blob(symbol: str, data_path: str) -> str:
    """GNU assembly defining a global read-only ``symbol`` holding the file's bytes (any ELF
    target: x86-64 and aarch64 alike)."""
    quoted = data_path.replace("\\", "\\\\").replace('"', '\\"')
    return (
        '.section .rodata,"a"\n'
        f".global {symbol}\n"
        f".type {symbol}, %object\n"
        ".balign 8\n"
        f"{symbol}:\n"
        f'.incbin "{quoted}"\n'
        f".size {symbol}, . - {symbol}\n"
        '.section .note.GNU-stack,"",%progbits\n'  # no executable stack
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
