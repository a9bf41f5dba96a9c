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
