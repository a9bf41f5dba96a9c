"""tvmq's layers: imports only point down.

    driver   tvmq.* not listed below: frontends, calibration, quantization (the quantize()
             handlers, collection, accuracy control), compression, compiler, build, tuning,
             runtime, rpc, cli, demo, distill, pruning, targets, manifest, cpu_schedule
       |
    passes   tvmq.passes.* (the passes/ folder): Relax -> Relax transformations, the site
       |     model (sites.py), shared Relax helpers (relax_utils.py), analyses (analysis.py)
    core     tvmq.core.* (qmath, schemes, compression configs, selectors, observer names),
             tvmq.errors, tvmq.kernels.* (hand-written TIR kernels)

The rule: a module may import its own layer and the layers below it, never one above
(core -> passes / driver and passes -> driver are errors). Every import counts, including
those inside functions, and importing ``a.b.c`` also runs the packages ``a.b`` (their
``__init__``), so those must be allowed too. The root package ``tvmq`` is a facade: it
imports nothing eagerly and resolves its public names lazily (``tvmq.compile``...).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("tvmq.core", "tvmq.errors", "tvmq.kernels")
RANK = {"core": 0, "passes": 1, "driver": 2}


def layer(module: str) -> str:
    if module == "tvmq" or any(module == c or module.startswith(c + ".") for c in CORE):
        return "core"
    if module == "tvmq.passes" or module.startswith("tvmq.passes."):
        return "passes"
    return "driver"


def _module_files() -> dict[str, Path]:
    """Module name -> file, for tvmq/ and passes/ (installed as tvmq.passes)."""
    out = {}
    for top, prefix in (("tvmq", ("tvmq",)), ("passes", ("tvmq", "passes"))):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = [*prefix, *path.relative_to(ROOT / top).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _module_files()


def _is_package(module: str) -> bool:
    return MODULES.get(module, Path()).name == "__init__.py"


def _imports(module: str, source: str):
    """(imported module, line, inside a function?) for every import in `source`."""
    tree = ast.parse(source)
    package = module if _is_package(module) else module.rpartition(".")[0]
    in_function: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            in_function.update(n for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        local = node in in_function
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, local
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in MODULES else target), node.lineno, local


def _loaded(target: str) -> list[str]:
    """`target` and the packages above it that importing it runs (not the root facade)."""
    parts = target.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1)]


def upward_imports(sources: dict[str, tuple[str, str]]) -> list[str]:
    """The upward imports in `sources` (module -> (file name, source text))."""
    bad = []
    for module, (name, source) in sources.items():
        for target, line, local in _imports(module, source):
            if target != "tvmq" and not target.startswith("tvmq."):
                continue
            for loaded in _loaded(target):
                if RANK[layer(loaded)] > RANK[layer(module)]:
                    where = "in a function" if local else "at the top"
                    msg = f"{name}:{line} ({layer(module)}) imports {loaded} ({layer(loaded)}) {where}"
                    if msg not in bad:  # `from a import b, c` is one import
                        bad.append(msg)
    return bad


def _sources() -> dict[str, tuple[str, str]]:
    return {m: (p.relative_to(ROOT).as_posix(), p.read_text()) for m, p in MODULES.items()}


def test_imports_only_point_down():
    assert upward_imports(_sources()) == []


def import_cycles(sources: dict[str, tuple[str, str]]) -> list[list[str]]:
    """Cycles of modules importing each other (any import, top or function-local).

    A module importing its own package (``tvmq.calibration.mse`` -> ``tvmq.calibration``)
    is no cycle: the package is already being imported.
    """
    graph = {m: set() for m in sources}
    for module, (_, source) in sources.items():
        for target, _, _ in _imports(module, source):
            for loaded in _loaded(target):
                if loaded in graph and not (module + ".").startswith(loaded + "."):
                    graph[module].add(loaded)
    cycles, done = [], set()

    def walk(module, path):
        if module in path:
            cycles.append(path[path.index(module) :] + [module])
            return
        if module in done:
            return
        for nxt in sorted(graph[module]):
            walk(nxt, [*path, module])
        done.add(module)

    for module in sorted(graph):
        walk(module, [])
    return cycles


def test_no_import_cycles():
    # tvmq.build <-> tvmq.tuning was one: both now take the lowering phases from
    # tvmq.lowering and the compiler lookup from tvmq.toolchain.
    assert import_cycles(_sources()) == []
    assert import_cycles(
        {"tvmq.a": ("a.py", "from tvmq.b import f\n"), "tvmq.b": ("b.py", "import tvmq.a\n")}
    ) == [["tvmq.a", "tvmq.b", "tvmq.a"]]


def test_every_module_is_classified():
    # A new top-level folder under tvmq/ must be placed deliberately: core is a short list.
    assert {m for m in MODULES if layer(m) == "core"} >= {"tvmq.core.qmath", "tvmq.errors"}
    assert "tvmq.passes.sites" in MODULES and layer("tvmq.passes.sites") == "passes"


def test_root_package_imports_nothing_eagerly():
    source = (ROOT / "tvmq" / "__init__.py").read_text()
    eager = [t for t, _, local in _imports("tvmq", source) if t.startswith("tvmq") and not local]
    assert eager == []


def test_importing_the_passes_loads_no_driver_module():
    code = (
        "import sys, tvmq.passes\nprint(' '.join(m for m in sys.modules if m.startswith('tvmq')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    assert "tvmq.passes.sites" in out
    assert [m for m in out if layer(m) == "driver"] == []


def test_detects_an_upward_import():
    # The check itself: a core module importing the driver inside a function is caught, and
    # so is a pass importing a driver package through one of its submodules.
    sources = {
        "tvmq.core.fake": ("fake.py", "def f():\n    from .. import compiler\n"),
        "tvmq.passes.fake": ("fake2.py", "from tvmq.quantization import qmath\n"),
        "tvmq.passes.fine": ("fine.py", "from tvmq.core import qmath\nfrom . import sites\n"),
    }
    assert upward_imports(sources) == [
        "fake.py:2 (core) imports tvmq.compiler (driver) in a function",
        "fake2.py:1 (passes) imports tvmq.quantization (driver) at the top",
    ]
