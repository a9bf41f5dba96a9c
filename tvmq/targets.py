"""Hardware target presets: one JSON file per board or chip, loaded as :class:`TargetPreset`.

The presets ship as package data in ``tvmq._targets`` (the repository's ``targets/`` folder).
Each file holds one JSON object with exactly these fields:

``name``
    The preset's name, equal to the file name without ``.json``.
``description``
    One line saying which hardware the preset is for.
``target``
    The TVM 0.27 target as a JSON dict (``{"kind": "llvm", "mcpu": ...}``), or a TVM tag with
    overrides (``{"tag": "nvidia/nvidia-a100", "arch": "sm_80"}``). TVM 0.27 rejects the old
    command-line string form.
``host``
    The host (CPU) target dict of a GPU preset, or ``null``.
``cc``
    The C++ compiler that links the exported ``.so`` (a cross compiler such as
    ``aarch64-linux-gnu-g++``), or ``null`` for the system default.
``features``
    The ISA features the preset promises: LLVM feature names for CPUs (``"avx512vnni"``,
    ``"dotprod"``), ``fp16``/``bf16``/``int8``/``tensorcore``/``fp8`` for CUDA GPUs.
``rpc_key``
    A suggested TVM RPC tracker key for the board, or ``null``.
``notes``
    Free text: caveats, sources, what to change for close relatives of the hardware.

The value ``"detect"`` (for ``mtriple``, ``mcpu`` and ``num-cores`` of an ``llvm`` target, and
for ``features``) is replaced by what this machine reports when the preset is loaded; the
``host`` preset uses it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import tvm
from tvm.target import Target
from tvm.target import codegen as _llvm

from tvmq.errors import TvmqError, first_line
from tvmq.machine import amx_granted, cpu_flags, this_machine, triple_arch

__all__ = ["TargetPreset", "get_target", "list_targets"]

_DETECT = "detect"
_FIELDS = ("name", "description", "target", "host", "cc", "features", "rpc_key", "notes")
# Features reported for a detected CPU: the ones tvmq's kernels care about.
_DETECTABLE_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vnni",
    "avx512bf16",
    "amx-tile",
    "amx-int8",
    "amx-bf16",
    "neon",
    "dotprod",
    "fullfp16",
    "i8mm",
    "sve",
)
# Oldest compute capability with each CUDA feature a preset may list.
_CUDA_FEATURE_MIN_ARCH = {
    "fp16": (5, 3),
    "int8": (6, 1),
    "tensorcore": (7, 0),
    "bf16": (8, 0),
    "fp8": (8, 9),
}


@dataclass(frozen=True)
class TargetPreset:
    """A named hardware target: the TVM target plus what it takes to link and run for it.

    Instances are immutable; ``target`` and ``host`` are read-only mappings. Build one from a
    JSON file with :func:`get_target`, or derive a variant with :func:`dataclasses.replace`.
    """

    name: str
    description: str
    target: Mapping[str, Any] = field(hash=False)
    host: Mapping[str, Any] | None = field(hash=False)
    cc: str | None
    features: tuple[str, ...]
    rpc_key: str | None
    notes: str

    def tvm_target(self) -> tvm.target.Target:
        """Return the TVM target, with ``host`` attached when the preset has one."""
        target = _thaw(self.target)
        if self.host is None:
            return Target(target)
        return Target(target, host=_thaw(self.host))

    def to_json(self) -> dict[str, Any]:
        """The preset as plain JSON data (with ``"detect"`` values already resolved)."""
        return {
            "name": self.name,
            "description": self.description,
            "target": _thaw(self.target),
            "host": _thaw(self.host),
            "cc": self.cc,
            "features": list(self.features),
            "rpc_key": self.rpc_key,
            "notes": self.notes,
        }

    @property
    def kind(self) -> Literal["llvm", "cuda"]:
        """The TVM target kind: ``"llvm"`` for CPUs, ``"cuda"`` for NVIDIA GPUs."""
        return self.tvm_target().kind.name

    @property
    def device_type(self) -> Literal["cpu", "cuda"]:
        """The device the compiled model runs on, as ``tvm.device()`` spells it."""
        return "cuda" if self.kind == "cuda" else "cpu"

    def device(self, index: int = 0) -> tvm.runtime.Device:
        """Return ``tvm.device(self.device_type, index)``."""
        return tvm.device(self.device_type, index)

    @property
    def cpu_triple(self) -> str | None:
        """The LLVM triple of the CPU code (the host's, for GPU presets); None means native."""
        tvm_target = self.tvm_target()
        cpu = tvm_target.host if self.kind == "cuda" else tvm_target
        if cpu is None:
            return None
        return cpu.attrs.get("mtriple") or None

    @property
    def is_cross_compiled(self) -> bool:
        """Whether the CPU code is for another architecture than this machine's.

        Such a library must be linked with a cross compiler (``cc``) and cannot be loaded
        here; run it on the board, e.g. over TVM RPC with ``rpc_key``.
        """
        if self.cc is not None:
            return True
        triple = self.cpu_triple
        return triple is not None and triple_arch(triple) != this_machine()


def list_targets() -> list[TargetPreset]:
    """Return every preset shipped with tvmq, sorted by name."""
    return [get_target(name) for name in _preset_names()]


def get_target(target: str | os.PathLike | TargetPreset) -> TargetPreset:
    """Look up a preset.

    Parameters
    ----------
    target : str, os.PathLike or TargetPreset
        A shipped preset's name (``"rasp4b"``), a path to a JSON file with the preset schema
        (see the module docstring), or a preset, which is returned unchanged.

    Returns
    -------
    TargetPreset

    Raises
    ------
    TvmqError
        For an unknown name (the message lists the known ones), or a file that is not valid
        JSON or breaks the schema (the message names the file and the field).
    """
    if isinstance(target, TargetPreset):
        return target
    if isinstance(target, os.PathLike) or (
        isinstance(target, str) and (target.endswith(".json") or os.sep in target)
    ):
        path = Path(target)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise TvmqError(f"cannot read target preset file {path}: {err.strerror}") from err
        return _parse(text, str(path), expected_name=None)
    if not isinstance(target, str):
        raise TvmqError(
            f"a target must be a preset name, a JSON file path or a TargetPreset, "
            f"not {type(target).__name__}"
        )
    if target not in _preset_names():
        raise TvmqError(
            f"unknown target {target!r}; known targets: {', '.join(_preset_names())} "
            "(or give the path of a preset JSON file)"
        )
    text = (files("tvmq._targets") / f"{target}.json").read_text(encoding="utf-8")
    return _parse(text, f"{target}.json", expected_name=target)


def _preset_names() -> list[str]:
    """Names of the shipped presets."""
    folder = files("tvmq._targets")
    return sorted(
        entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json")
    )


def _parse(text: str, source: str, expected_name: str | None) -> TargetPreset:
    """Parse and validate one preset file's text; ``source`` names it in errors."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TvmqError(
            f"target preset {source} is not valid JSON: {err.msg} (line {err.lineno})"
        ) from err
    if not isinstance(data, dict):
        raise TvmqError(f"target preset {source} must hold a JSON object")

    def bad(field_name: str, why: str) -> TvmqError:
        return TvmqError(f"target preset {source}: field {field_name!r} {why}")

    missing = [name for name in _FIELDS if name not in data]
    if missing:
        raise bad(missing[0], "is missing")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise bad(unknown[0], f"is not a preset field (the fields are {', '.join(_FIELDS)})")

    for name in ("name", "description", "notes"):
        if not isinstance(data[name], str):
            raise bad(name, "must be a string")
    if not data["name"]:
        raise bad("name", "must not be empty")
    if expected_name is not None and data["name"] != expected_name:
        raise bad("name", f"is {data['name']!r} but the file is {expected_name}.json")
    if "\n" in data["description"]:
        raise bad("description", "must be one line")
    for name in ("cc", "rpc_key"):
        if data[name] is not None and not (isinstance(data[name], str) and data[name]):
            raise bad(name, "must be a non-empty string or null")
    if not isinstance(data["target"], dict) or not (
        "kind" in data["target"] or "tag" in data["target"]
    ):
        raise bad("target", 'must be a TVM target dict with a "kind" or a "tag"')
    if data["host"] is not None and not isinstance(data["host"], dict):
        raise bad("host", "must be a TVM target dict or null")
    features = data["features"]
    if features != _DETECT and not (
        isinstance(features, list) and all(isinstance(f, str) and f for f in features)
    ):
        raise bad("features", f'must be a list of feature names or "{_DETECT}"')

    target = _resolve_detect(data["target"])
    tvm_targets = {}
    for name, value in (("target", target), ("host", data["host"])):
        if value is None:
            continue
        # TVM only logs an unknown mcpu and falls back to a generic CPU: check it first.
        mcpu, triple = value.get("mcpu"), value.get("mtriple") or _llvm.llvm_get_system_triple()
        if value.get("kind") == "llvm" and mcpu and not _llvm.llvm_is_valid_cpu(mcpu, triple):
            raise bad(name, f"has mcpu {mcpu!r}, which LLVM does not know for {triple}")
        try:
            tvm_targets[name] = Target(value)
        except Exception as err:  # TVM raises several error types for a bad target dict
            raise bad(name, f"is rejected by TVM: {first_line(err)}") from err
    if features == _DETECT:
        features = _detect_features(tvm_targets["target"])
    else:
        absent = _missing_features(tvm_targets["target"], features)
        if absent:
            raise bad("features", f"lists {', '.join(absent)}, which the target does not have")

    return TargetPreset(
        name=data["name"],
        description=data["description"],
        target=_freeze(target),
        host=None if data["host"] is None else _freeze(data["host"]),
        cc=data["cc"],
        features=tuple(features),
        rpc_key=data["rpc_key"],
        notes=data["notes"],
    )


def _resolve_detect(target: dict[str, Any]) -> dict[str, Any]:
    """Replace ``"detect"`` values of an llvm target with this machine's."""
    detected = {
        "mtriple": _llvm.llvm_get_system_triple,
        "mcpu": _llvm.llvm_get_system_cpu,
        "num-cores": _usable_cpu_count,
    }
    resolved = dict(target)
    for key, value in target.items():
        if value == _DETECT:
            if key not in detected:
                raise TvmqError(
                    f'"{_DETECT}" is only supported for {", ".join(detected)}, not {key!r}'
                )
            resolved[key] = detected[key]()
    if target.get("mcpu") == _DETECT:
        hidden = _hidden_features(resolved)
        if hidden:
            resolved["mattr"] = [*resolved.get("mattr", ()), *(f"+{f}" for f in hidden)]
    return resolved


# Linux's names (/proc/cpuinfo) of features that a hypervisor's CPU model can hide from
# LLVM's host detection, and LLVM's names for them.
_FLAG_FEATURES = {"avx512_bf16": "avx512bf16"}
_AMX_FLAGS = {"amx_tile": "amx-tile", "amx_int8": "amx-int8", "amx_bf16": "amx-bf16"}


def _hidden_features(target: dict[str, Any]) -> list[str]:
    """Features this CPU has that LLVM's CPU name for it lacks (a VM may report an older
    model, e.g. Rocket Lake for a Sapphire Rapids): AVX512-BF16 from the kernel's flags,
    AMX where the OS also grants this process the tile state."""
    if triple_arch(str(target.get("mtriple", ""))) != "x86_64" or this_machine() != "x86_64":
        return []
    llvm = Target({"kind": "llvm", **{k: v for k, v in target.items() if k != "kind"}})
    flags = cpu_flags()
    known = {**_FLAG_FEATURES, **(_AMX_FLAGS if amx_granted() else {})}
    wanted = [llvm_name for flag, llvm_name in known.items() if flag in flags]
    return [f for f in wanted if not _llvm.llvm_cpu_has_features(f, llvm)]


def _usable_cpu_count() -> int:
    """CPUs this process may run on (respects affinity masks, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _detect_features(target: Target) -> list[str]:
    """The features in _DETECTABLE_FEATURES that LLVM reports for an llvm target."""
    if target.kind.name != "llvm":
        return []
    return [f for f in _DETECTABLE_FEATURES if _llvm.llvm_cpu_has_features(f, target)]


def _missing_features(target: Target, features: list[str]) -> list[str]:
    """The listed features that the target does not have (LLVM names or CUDA capabilities)."""
    if target.kind.name == "llvm":
        return [f for f in features if not _llvm.llvm_cpu_has_features(f, target)]
    if target.kind.name == "cuda":
        arch = str(target.attrs.get("arch", ""))
        digits = "".join(ch for ch in arch if ch.isdigit())
        if not arch.startswith("sm_") or len(digits) < 2:
            return list(features)
        version = (int(digits[:-1]), int(digits[-1]))
        return [f for f in features if version < _CUDA_FEATURE_MIN_ARCH.get(f, (999, 0))]
    return []


def _freeze(value: Any) -> Any:
    """Deep read-only copy of parsed JSON: dicts become mappingproxies, lists tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Inverse of _freeze, for handing the data to TVM."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value
