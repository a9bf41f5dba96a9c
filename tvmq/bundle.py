"""``tvmq bundle``: a folder that runs a compiled model with TVM's runtime only.

A GPU server or a board often has no room or network for the 100 MB TVM wheel (its compiler
library alone is 248 MB unpacked). A bundle carries only what running takes::

    run.py           the runner: python run.py [-i inputs.npz] [-o outputs.npz] [--repeat N]
    bundle.json      what the bundle holds (format "tvmq-bundle/1"); written last
    model/           the build as tvmq compile wrote it (model.so, model.json)
    python/tvm/      the Python files that ``import tvm`` loads with the runtime only, and
                     lib/libtvm_runtime.so (+ libtvm_runtime_cuda.so for a CUDA build)
    python/tvmq/     tvmq.load and the runner's helpers (standard library, tvm, numpy)
    python/typing_extensions.py
    wheels/          the apache-tvm-ffi wheel for the board's Python and CPU; run.py unpacks
                     it into _deps/ when that version is not installed

The board needs Python and numpy, nothing else. Which Python files ship is not a list kept
here: a subprocess imports the runtime-only TVM and tvmq's loader and reports the files it
loaded, so the bundle holds exactly what ``import tvm`` reads without the compiler.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from tvmq.errors import TvmqError, first_line
from tvmq.machine import library_arch, this_machine
from tvmq.manifest import Manifest
from tvmq.output import _check_writable, _make_unique_dir, _swappable, recover, swap_dirs
from tvmq.runtime import verified_library

FORMAT = "tvmq-bundle/1"
BUNDLE_MANIFEST = "bundle.json"
ENTRIES = ("run.py", "model", "python", "wheels", BUNDLE_MANIFEST)
CACHE = "_deps"  # run.py's unpacked wheel: the bundle's own, replaced with it
MIN_PYTHON = (3, 11)  # tvmq's loader (datetime.UTC, dataclass features)
_PLATFORMS = {"x86_64": "manylinux_2_28_x86_64", "aarch64": "manylinux_2_28_aarch64"}
_RUNNER = Path(__file__).with_name("bundle_run.py")

# Imported in a subprocess with the runtime only; it prints the files it loaded.
_TRACE = """
import json, sys
from pathlib import Path
import tvm, tvm.base
from tvm.runtime import vm
import tvmq.runtime, tvmq.cli_options, tvmq.output_file, tvmq.tuning_offline, typing_extensions
assert tvm.base._RUNTIME_ONLY and "tvm.relax" not in sys.modules, "the compiler was loaded"
roots = {n: Path(sys.modules[n].__file__).resolve().parent for n in ("tvm", "tvmq")}
roots["typing_extensions"] = Path(typing_extensions.__file__).resolve()
files = []
for name, mod in list(sys.modules.items()):
    top, f = name.split(".")[0], getattr(mod, "__file__", None)
    if top in roots and f and f.endswith(".py"):
        src = Path(f).resolve()
        root = roots[top] if top != "typing_extensions" else src
        if src == root or root in src.parents:
            files.append([str(src), str(src.relative_to(root.parent))])
print(json.dumps(sorted(files)))
"""


@dataclass(frozen=True)
class Bundle:
    """A written bundle: where, for which Python and platform, and its size in bytes."""

    path: Path
    python: str
    platform: str
    bytes: int
    parts: dict  # "model", "tvm runtime", "apache-tvm-ffi wheel" -> bytes

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.parts.items())
        return (
            f"wrote {self.path} ({self.bytes / 2**20:.1f} MiB: {parts}; "
            f"Python {self.python}, {self.platform}); run it with: python {self.path}/run.py"
        )


def parse_python(text: str | None) -> str:
    """``"3.12"`` checked; None means this interpreter's version."""
    if text is None:
        return f"{sys.version_info[0]}.{sys.version_info[1]}"
    m = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
    if not m or (int(m[1]), int(m[2])) < MIN_PYTHON or int(m[1]) != 3:
        raise TvmqError(
            f"--python {text!r}: give the board's Python as 3.N with N >= {MIN_PYTHON[1]}, e.g. 3.12"
        )
    return f"{int(m[1])}.{int(m[2])}"


def make_bundle(
    build_dir: os.PathLike,
    output_dir: os.PathLike,
    python: str | None = None,
    tvm_runtime: os.PathLike | None = None,
) -> Bundle:
    """Write a runtime-only bundle of the tvmq build in ``build_dir`` to ``output_dir``.

    ``python`` is the board's Python version (default: this one's). TVM's runtime libraries
    come from ``tvm_runtime`` when given (a folder with ``libtvm_runtime.so`` built for the
    board's CPU), else from this TVM when the build's CPU is this machine's, else from the
    apache-tvm wheel for the build's CPU (downloaded, 100 MB).

    Raises
    ------
    TvmqError
        ``build_dir`` is not a tvmq build (or its library is damaged); ``output_dir`` is a file,
        or a non-empty folder that is not a tvmq bundle, or holds files tvmq did not write;
        the Python version is malformed or has no apache-tvm-ffi wheel; the build's CPU has
        no TVM runtime wheel. Nothing is written then.
    """
    python = parse_python(python)
    build = Path(build_dir)
    manifest = Manifest.read(build)
    verified_library(build, manifest)
    arch = library_arch(manifest.target)
    if arch not in _PLATFORMS:
        raise TvmqError(
            f"{build}: compiled for CPU '{arch}'; bundles are made for {sorted(_PLATFORMS)}"
        )
    platform = _PLATFORMS[arch]
    if tvm_runtime is not None and not Path(tvm_runtime).is_dir():
        raise TvmqError(f"--tvm-runtime {tvm_runtime}: no such directory")
    out = Path(output_dir).resolve()
    if out == build.resolve() or out in build.resolve().parents:
        raise TvmqError(f"{out}: is the build folder or holds it; give a new folder for the bundle")
    _check_output(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TvmqError(f"{out}: cannot write here ({e.strerror})") from None
    stage = _make_unique_dir(out.parent, f".{out.name}.tmp-{os.getpid()}-")
    try:
        parts = _write(stage, build, manifest, arch, python, platform, tvm_runtime)
        _commit(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return Bundle(out, python, platform, sum(parts.values()), parts)


# --------------------------------------------------------------------------------------
# The output folder


def bundle_entries(folder: Path) -> list[str] | None:
    """The entries tvmq wrote in ``folder`` when it holds a tvmq bundle, else None."""
    try:
        d = json.loads((folder / BUNDLE_MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        return None
    return [*ENTRIES, CACHE]


def _check_output(out: Path) -> None:
    """Before any work: ``out`` is missing, empty, or a tvmq bundle with nothing of the user's."""
    recover(out)  # the staging and swap folders of killed runs
    _check_writable(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise TvmqError(f"{out}: exists and is not a directory")
    names = sorted(os.listdir(out))
    if not names:
        pass
    elif (ours := bundle_entries(out)) is None:
        raise TvmqError(f"{out}: not empty and not a tvmq bundle; choose another directory")
    elif others := [n for n in names if n not in ours]:
        raise TvmqError(
            f"{out}: holds files tvmq did not write ({', '.join(others[:5])}); "
            "move them, or choose another directory"
        )
    if not _swappable(out):
        raise TvmqError(f"{out}: is the working directory or a mount point; give another folder")


def _commit(stage: Path, out: Path) -> None:
    """Put the staged bundle at ``out`` in one step (rename, or exchange with the old one)."""
    _check_output(out)  # the folder may have changed while the bundle was written
    try:
        if not out.exists() or not os.listdir(out):
            os.replace(stage, out)  # rename(2) replaces an empty folder
        else:
            swap_dirs(stage, out)
            shutil.rmtree(stage, ignore_errors=True)  # now the old bundle
    except OSError as e:
        raise TvmqError(f"{out}: writing the bundle failed ({e.strerror or e})") from None


# --------------------------------------------------------------------------------------
# What goes in


def _write(
    stage: Path,
    build: Path,
    manifest: Manifest,
    arch: str,
    python: str,
    platform: str,
    tvm_runtime: os.PathLike | None,
) -> dict:
    """Fill the staging folder; return the bytes of its parts."""
    model = stage / "model"
    model.mkdir()
    for name in manifest.files:
        if (build / name).is_file():
            shutil.copy2(build / name, model / name)
    py = stage / "python"
    for src, rel in _runtime_python_files():
        (py / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, py / rel)
    libs = ["libtvm_runtime.so"] + (
        ["libtvm_runtime_cuda.so"] if manifest.target.get("kind") == "cuda" else []
    )
    _copy_runtime_libs(libs, arch, py / "tvm" / "lib", tvm_runtime)
    wheel = _download_ffi_wheel(python, platform, stage / "wheels")
    shutil.copyfile(_RUNNER, stage / "run.py")
    versions = {
        "tvmq": manifest.versions.get("tvmq", ""),
        "tvm": metadata.version("apache-tvm"),
        "tvm_ffi": metadata.version("apache-tvm-ffi"),
    }
    info = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": "model",
        "target": manifest.target.get("name"),
        "kind": manifest.target.get("kind", "llvm"),
        "arch": arch,
        "python": python,
        "platform": platform,
        "wheel": f"wheels/{wheel.name}",
        "runtime_libraries": libs,
        "versions": versions,
    }
    (stage / BUNDLE_MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    return {
        "model": _size(model),
        "tvm runtime": _size(py) + _size(stage / "run.py"),
        "apache-tvm-ffi wheel": _size(stage / "wheels"),
    }


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@functools.cache
def _runtime_python_files() -> list[tuple[str, str]]:
    """(source, path in python/) of every file a runtime-only ``import tvm`` and tvmq's loader read."""
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    proc = subprocess.run(
        [sys.executable, "-c", _TRACE], env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise RuntimeError(f"importing the runtime-only TVM failed:\n{proc.stderr}")
    return [tuple(pair) for pair in json.loads(proc.stdout.strip().splitlines()[-1])]


def _copy_runtime_libs(names: list[str], arch: str, dest: Path, source: os.PathLike | None) -> None:
    """TVM's runtime libraries for ``arch`` into ``dest``, each checked to be code for it."""
    dest.mkdir(parents=True, exist_ok=True)
    if source is None and arch == this_machine():
        import tvm.base

        source = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    if source is not None:
        for name in names:
            if not (Path(source) / name).is_file():
                raise TvmqError(f"{Path(source) / name}: no such file (TVM's runtime library)")
            shutil.copy2(Path(source) / name, dest / name)
    else:  # another CPU: the apache-tvm wheel for it (pip's cache may keep it for next time)
        wheel = _downloaded(f"apache-tvm=={metadata.version('apache-tvm')}", None, _PLATFORMS[arch])
        with zipfile.ZipFile(wheel) as z:
            for name in names:
                try:
                    (dest / name).write_bytes(z.read(f"tvm/lib/{name}"))
                except KeyError:
                    raise TvmqError(f"{wheel.name}: has no tvm/lib/{name}") from None
                (dest / name).chmod(0o755)
    for name in names:
        found = _elf_arch(dest / name)
        if found != arch:
            where = source or "the apache-tvm wheel"
            raise TvmqError(f"{name} from {where} is code for {found}, the build is for {arch}")


_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm", 243: "riscv"}


def _elf_arch(path: Path) -> str:
    """The CPU a shared library's code is for (ELF ``e_machine``), or "not an ELF file"."""
    head = path.read_bytes()[:20]
    if head[:4] != b"\x7fELF":
        return "not an ELF file"
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(machine, f"ELF machine {machine}")


def _download_ffi_wheel(python: str, platform: str, dest: Path) -> Path:
    """The apache-tvm-ffi wheel of this install's version for ``python`` on ``platform``."""
    dest.mkdir()
    wheel = _downloaded(f"apache-tvm-ffi=={metadata.version('apache-tvm-ffi')}", python, platform)
    shutil.copyfile(wheel, dest / wheel.name)
    return dest / wheel.name


@functools.cache
def _downloaded(requirement: str, python: str | None, platform: str) -> Path:
    """A wheel downloaded once per process (into a folder removed when the process ends)."""
    tmp = Path(tempfile.mkdtemp(prefix="tvmq-wheels-"))
    atexit.register(shutil.rmtree, tmp, True)
    return _pip_download(requirement, python, platform, tmp)


def _pip_download(requirement: str, python: str | None, platform: str, dest: Path) -> Path:
    """``pip download`` one binary wheel (no dependencies) into ``dest``; its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    cmd += ["--no-deps", "--only-binary=:all:", "--platform", platform, "-d", str(dest)]
    if python is not None:
        cmd += ["--python-version", python, "--implementation", "cp"]
    try:
        proc = subprocess.run(cmd + [requirement], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise TvmqError(
            f"pip download {requirement} took over 15 minutes; is PyPI reachable?"
        ) from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or [proc.stderr]
        for_python = f" for Python {python}" if python else ""
        raise TvmqError(
            f"no {requirement} wheel{for_python} on {platform} "
            f"(pip: {first_line(RuntimeError(errors[-1]))})"
        )
    return wheels[0]
