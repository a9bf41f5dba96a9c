"""Where a build's bytes go: weights by dtype, machine code, the rest of the library, the runtime.

- :func:`constant_bytes_by_dtype`: the constants (weights) of a Relax module, as the build
  embeds them (:func:`tvmq.build.build_with_info` records them in ``model.json``'s
  ``notes["weights"]``);
- :func:`library_breakdown`: a compiled ``model.so`` split into machine code (the ELF's
  executable sections), weights and everything else (the VM program, symbol tables,
  headers, padding);
- :func:`runtime_files`: the TVM runtime libraries a board needs to run any model.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

__all__ = ["constant_bytes_by_dtype", "elf_sections", "library_breakdown", "runtime_files"]

_SHF_EXECINSTR = 0x4
_SHT_NOBITS = 8  # .bss: takes no room in the file


def constant_bytes_by_dtype(mod) -> dict[str, int]:
    """Bytes of the tensor constants of every Relax function of ``mod``, per dtype.

    Sizes come from shape and dtype (sub-byte dtypes are packed), so nothing is copied
    off the device.
    """
    import tvm
    from tvm import relax

    sizes: dict[str, int] = {}

    @relax.expr_functor.visitor
    class _Consts(relax.PyExprVisitor):
        def visit_generic_const_(self, c):
            if isinstance(c.ty, relax.TensorType):
                value = c.value
                dtype = str(value.dtype)
                t = tvm.runtime.DataType(dtype)
                count = math.prod(int(n) for n in value.shape)
                sizes[dtype] = sizes.get(dtype, 0) + (count * t.bits * t.lanes + 7) // 8

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            _Consts().visit_expr(f)
    return dict(sorted(sizes.items()))


def elf_sections(path: os.PathLike) -> list[tuple[str, int, bool]]:
    """(name, bytes in the file, executable) of each section of an ELF shared library.

    Reads the section headers only (32/64-bit, either byte order); returns [] for a file
    that is not ELF.
    """
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return []
    is64, end = data[4] == 2, "<" if data[5] == 1 else ">"
    if is64:
        shoff, shentsize, shnum, shstrndx = struct.unpack_from(end + "Q10xHHH", data, 0x28)
        fmt = end + "IIQQQQ"  # name, type, flags, addr, offset, size
    else:
        shoff, shentsize, shnum, shstrndx = struct.unpack_from(end + "I10xHHH", data, 0x20)
        fmt = end + "IIIIII"
    headers = [struct.unpack_from(fmt, data, shoff + i * shentsize) for i in range(shnum)]
    if not headers or shstrndx >= len(headers):
        return []
    names_at = headers[shstrndx][4]
    out = []
    for name_off, kind, flags, _addr, _offset, size in headers[1:]:
        start = names_at + name_off
        name = data[start : data.index(b"\0", start)].decode("ascii", "replace")
        if kind != _SHT_NOBITS:
            out.append((name, size, bool(flags & _SHF_EXECINSTR)))
    return out


def library_breakdown(path: os.PathLike, weights: dict[str, int] | None) -> dict[str, int]:
    """A compiled library's bytes: ``code`` (executable sections), ``weights <dtype>`` for
    each dtype of ``weights`` (None: not known, then counted in ``other``), and ``other``
    (the rest of the file: VM program, symbol tables, headers, padding)."""
    total = Path(path).stat().st_size
    code = sum(size for _, size, executable in elf_sections(path) if executable)
    parts = {"code": code}
    for dtype, n in (weights or {}).items():
        parts[f"weights {dtype}"] = n
    parts["other"] = max(0, total - sum(parts.values()))
    return parts


def runtime_files(kind: str = "llvm") -> dict[str, int]:
    """Bytes of the TVM runtime libraries that load and run a model (this machine's copies;
    a board's build of the same release is of similar size): libtvm_runtime, libtvm_ffi,
    and libtvm_runtime_cuda for CUDA targets."""
    import tvm
    import tvm_ffi.libinfo

    found = [Path(tvm_ffi.libinfo.find_libtvm_ffi())]
    lib_dir = Path(tvm.__file__).parent / "lib"
    names = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if kind == "cuda" else [])
    found += [lib_dir / n for n in names]
    return {p.name: p.stat().st_size for p in found if p.is_file()}
