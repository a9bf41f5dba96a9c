"""Which CPU architecture a compiled library is for, and whether that is this machine's.

Standard library only: a runtime-only bundle ships this module (see :mod:`tvmq.bundle`).
"""

from __future__ import annotations

import platform

_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def triple_arch(triple: str) -> str:
    """The architecture part of an LLVM triple, normalised (``arm64-apple-...`` -> ``aarch64``)."""
    arch = triple.split("-", 1)[0].lower()
    return _MACHINE_ALIASES.get(arch, arch)


def this_machine() -> str:
    """This machine's architecture, spelled like an LLVM triple's first part."""
    machine = platform.machine().lower()
    return _MACHINE_ALIASES.get(machine, machine)


def library_arch(target: dict) -> str:
    """The CPU architecture of the library a manifest's ``target`` describes.

    The CPU code is the host's for a GPU target. A target without a triple was compiled
    for the machine that compiled it: this one, unless the manifest says it was cross-compiled
    (then the architecture is unknown and ``"unknown"`` is returned).
    """
    cpu = target.get("host") if target.get("kind") == "cuda" else target.get("tvm_target")
    triple = cpu.get("mtriple") if isinstance(cpu, dict) else None
    if isinstance(triple, str) and triple and triple != "detect":
        return triple_arch(triple)
    return "unknown" if target.get("cross_compiled") else this_machine()


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux reports them (``/proc/cpuinfo``), empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def amx_granted() -> bool:
    """Whether this process may run AMX int8 tile code: the CPU lists ``amx_tile`` and
    ``amx_int8`` and Linux grants the tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)``, which a hypervisor or an old kernel can refuse)."""
    if this_machine() != "x86_64" or not {"amx_tile", "amx_int8"} <= cpu_flags():
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, REQ_XCOMP_PERM, XTILEDATA
    except (OSError, AttributeError):
        return False


# LLVM's names of the x86 features tvmq's kernels use, and Linux's (/proc/cpuinfo) for them.
_X86_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "amx-tile": "amx_tile",
    "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16",
}


def missing_cpu_features(features) -> list[str]:
    """The x86 features of a library (LLVM names, as a manifest lists them) that this CPU
    lacks, or that its OS refuses (AMX tile state); empty off x86 or where /proc/cpuinfo
    says nothing."""
    flags = cpu_flags()
    if this_machine() != "x86_64" or not flags:
        return []
    missing = [f for f in features if f in _X86_FLAGS and _X86_FLAGS[f] not in flags]
    if any(f.startswith("amx-") for f in features) and not missing and not amx_granted():
        missing = [f for f in features if f.startswith("amx-")]
    return missing
