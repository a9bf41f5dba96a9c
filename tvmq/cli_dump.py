"""``tvmq compile --dump KINDS DIR``: what was compiled, as text files a person can read.

``ir`` -> ``DIR/model.relax.py`` (the Relax module after tvmq's passes, before lowering),
``ll`` -> ``DIR/model.ll`` (LLVM IR) and ``asm`` -> ``DIR/model.s`` (assembly) of the
built library's LLVM modules (``Module.inspect_source``). DIR is created if needed; a file
already there with one of these names is never replaced (checked before the compile).
"""

from __future__ import annotations

from pathlib import Path

from tvmq.cli_options import UsageError

__all__ = ["DUMP_FILES", "dump_files", "write_dumps"]

DUMP_FILES = {"ir": "model.relax.py", "ll": "model.ll", "asm": "model.s"}


def dump_files(args) -> dict[str, Path] | None:
    """--dump as {kind: file to write}; refuses existing files and a DIR that is a file."""
    if args.dump is None:
        return None
    kinds, folder = args.dump
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--dump {kinds} {folder}: {folder} is a file, not a folder")
    files = {k: folder / DUMP_FILES[k] for k in dict.fromkeys(kinds.split(","))}
    taken = [str(p) for p in files.values() if p.exists()]
    if taken:
        raise UsageError(
            f"--dump: {', '.join(taken)} already exist(s); tvmq does not replace files it did "
            "not just write: give another folder or remove them"
        )
    return files


def _llvm_modules(module) -> list:
    found = [module] if module.kind == "llvm" else []
    for imported in module.imports:
        found += _llvm_modules(imported)
    return found


def write_dumps(art, files: dict[str, Path] | None) -> list[Path]:
    """Write the requested dumps of a :class:`~tvmq.compiler.CompiledArtifact`."""
    if not files:
        return []
    texts = {}
    if "ir" in files:
        texts["ir"] = art.mod.script(show_meta=False)
    llvm = _llvm_modules(art.executable.mod)
    for kind, fmt in (("ll", "ll"), ("asm", "asm")):
        if kind in files:
            texts[kind] = "\n".join(m.inspect_source(fmt) for m in llvm)
    written = []
    for kind, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x") as f:  # "x": never replace a file that appeared meanwhile
            f.write(texts[kind])
        written.append(path)
    return written
