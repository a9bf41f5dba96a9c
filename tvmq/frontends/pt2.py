"""Load ``.pt2`` files (``torch.export.save``) without running code from the file.

``torch.export.load`` is documented as unsafe for untrusted files: beside the graph (JSON)
and raw weight bytes, a ``.pt2`` archive can carry things whose loading runs code:

* weights or constants marked ``use_pickle`` in ``data/{weights,constants}/*_config.json``,
  read with ``torch.load(weights_only=False)``; ``custom_obj_*`` / ``opaque_obj_*``
  constants (TorchScript pickle, ``pickle.loads``); legacy ``.pt`` weight files and the
  pre-2.8 archive layout, read with ``torch.load`` falling back to ``weights_only=False``;
* the sample inputs (``data/sample_inputs/*.pt``), read the same way: a pickle that the
  weights-only unpickler refuses is then unpickled without restriction;
* AOTInductor shared libraries (``data/aotinductor/``), which are dlopen'ed;
* symbolic shape expressions (``expr_str``), parsed with ``sympy.sympify`` (Python ``eval``);
  and shape guards (``guards_code``), Python source that ``ExportedProgram.module()`` execs;
* node targets, resolved by ``getattr`` from the ``torch``/``operator``/``math`` modules:
  ``torch.os.system`` or ``torch.ops.load_library`` resolve too, and run when the graph runs.

:func:`check_pt2_archive` reads the archive with :mod:`zipfile` and :mod:`json` only and
refuses all of these; :func:`load_exported_program` then loads the file with
``torch.load`` held to ``weights_only=True``, so a path this check missed fails instead of
unpickling. What is left is what tvmq compiles: a static-shape graph of torch operators
with raw tensor bytes. The layout checked is that of torch 2.8 to 2.13 (archive version 0).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tvmq.errors import TvmqError
from tvmq.frontends import pt2e

__all__ = ["check_pt2_archive", "load_exported_program"]

# Entries of a plain exported program, relative to the archive's root folder.
_ALLOWED_ENTRIES = (
    re.compile(r"archive_format|archive_version|byteorder|\.data/[\w.]+"),
    re.compile(r"models/(?P<model>\w+)\.json"),
    re.compile(r"data/weights/(?P<model>\w+)_weights_config\.json"),
    re.compile(r"data/weights/weight_\d+"),
    re.compile(r"data/constants/(?P<model>\w+)_constants_config\.json"),
    re.compile(r"data/constants/tensor_\d+"),
    re.compile(r"data/sample_inputs/(?P<model>\w+)\.pt"),
    re.compile(r"extra/[^/][\w./-]*"),  # extra files: read as text, never evaluated
)
_PAYLOAD_FILE = {"weights": re.compile(r"weight_\d+"), "constants": re.compile(r"tensor_\d+")}

# Node targets that resolve to torch operators (or plain arithmetic) and nothing else; of
# torch's quantized_decomposed library only the PT2E ops tvmq imports (tvmq.frontends.pt2e).
_SAFE_TARGET = re.compile(
    r"torch\.ops\.(aten|prims|higher_order)\.[A-Za-z_]\w*(\.[A-Za-z_]\w*)?"
    r"|torch\.ops\.quantized_decomposed\.(" + "|".join(re.escape(op) for op in pt2e.SUPPORTED) + ")"
    r"|torch\._?sym_[a-z_]+"
    r"|_operator\.(getitem|add|sub|mul|truediv|floordiv|mod|pow|neg|pos|abs|eq|ne|lt|le|gt|ge"
    r"|and_|or_|xor|not_|invert|lshift|rshift)"
    r"|math\.[a-z][a-z0-9_]*"
)
_QUANTIZED_OP = re.compile(rf"torch\.ops\.{pt2e.NAMESPACE}\.[a-z]\w{{0,60}}(\.[a-z]\w{{0,20}})?")
# Symbolic shape expressions: sympy parses them with eval, so only symbol names (s0, u1),
# integer/float literals, arithmetic and the shape functions torch itself prints.
_EXPR_CHARS = re.compile(r"[\w\s+\-*/%(),<>=!&|~^]*")
_EXPR_NUMBER = re.compile(r"\b\d+\.\d+(e[+-]?\d+)?\b|\b\d+\b")
_EXPR_NAME = re.compile(r"[A-Za-z_]\w*")
_EXPR_SYMBOL = re.compile(r"[a-z]{1,3}\d+")
_EXPR_FUNCTIONS = frozenset(
    {
        # torch.utils._sympy.functions, as the deserializer names them
        *("FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt"),
        *("FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow"),
        *("FloatTrueDiv", "IntTrueDiv", "TruncToFloat", "TruncToInt", "RoundToInt"),
        *("RoundDecimal", "ToFloat", "Identity", "IsNonOverlappingAndDenseIndicator"),
        # sympy's own
        *("Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not"),
        *("True", "False", "oo", "int_oo"),
    }
)


def load_exported_program(path: Path):
    """Load a ``.pt2`` file as a ``torch.export.ExportedProgram``, executing nothing from it.

    Raises
    ------
    TvmqError
        The file is not a ``.pt2`` archive, is damaged, or holds anything whose loading
        could run code (see the module docstring); the message names the file and entry.
    """
    import torch

    check_pt2_archive(path)
    pt2e.register_ops()  # a PT2E program's quantize / dequantize ops
    try:
        with _weights_only_torch_load(path), _quiet_torch_export_log(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's version-skew warnings: the error says more
            return torch.export.load(str(path))
    except TvmqError:
        raise
    except Exception as e:  # damaged payloads, version skew: torch's message says which
        raise TvmqError(f"{path}: not a loadable torch.export program ({_brief(e)})") from None


def check_pt2_archive(path: Path) -> None:
    """Refuse a ``.pt2`` archive that is damaged or whose loading could run code.

    Reads every entry once (CRC check), parses the JSON entries and unpickles the sample
    inputs weights-only; nothing from the file is executed or evaluated.
    """
    with _open_zip(path) as archive:
        root, entries = _archive_entries(path, archive)
        models = _check_layout(path, entries)
        for model in sorted(models):
            for kind in ("weights", "constants"):
                name = f"data/{kind}/{model}_{kind}_config.json"
                if name in entries:
                    config = _read_json(path, archive, root + name)
                    _check_payload_config(path, name, config, kind, entries)
            program_name = f"models/{model}.json"
            _check_program(path, program_name, _read_json(path, archive, root + program_name))
            sample = f"data/sample_inputs/{model}.pt"
            if sample in entries:
                _check_sample_inputs(path, sample, _read(path, archive, root + sample))


# -- the archive --------------------------------------------------------------------------


@contextlib.contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    if path.stat().st_size == 0:
        raise TvmqError(f"{path}: empty file, not a .pt2 archive saved with torch.export.save")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise TvmqError(
            f"{path}: not a .pt2 archive saved with torch.export.save (not a complete zip "
            f"file: {_brief(e)})"
        ) from None
    with archive:
        try:  # every entry's CRC: torch would load flipped weight bytes without a word
            damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise TvmqError(f"{path}: damaged .pt2 archive ({_brief(e)})") from None
        if damaged is not None:
            raise TvmqError(f"{path}: damaged .pt2 archive (entry {damaged!r} fails its CRC check)")
        yield archive


def _archive_entries(path: Path, archive: zipfile.ZipFile) -> tuple[str, set[str]]:
    """The root folder (``name/``) and every file entry relative to it."""
    names = [n for n in archive.namelist() if not n.endswith("/")]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise TvmqError(
            f"{path}: not a .pt2 archive saved with torch.export.save (files are not under "
            "one root folder; archives from torch < 2.8 are not read: save it again)"
        )
    root = roots.pop() + "/"
    return root, {n[len(root) :] for n in names}


def _check_layout(path: Path, entries: set[str]) -> set[str]:
    """Every entry is a known part of a plain exported program; return the model names."""
    if "archive_format" not in entries or not any(e.startswith("models/") for e in entries):
        raise TvmqError(
            f"{path}: not a .pt2 archive saved with torch.export.save (no archive_format or "
            "models/ entry)"
        )
    models = set()
    for entry in sorted(entries):
        match = next((m for p in _ALLOWED_ENTRIES if (m := p.fullmatch(entry))), None)
        if match is None or ".." in entry.split("/"):
            raise TvmqError(
                f"{path}: holds {entry!r}, which is not part of a plain torch.export program "
                "(compiled code, pickled objects or an old layout); tvmq does not load it"
            )
        if entry.startswith("models/"):
            models.add(match["model"])
    return models


def _read(path: Path, archive: zipfile.ZipFile, name: str) -> bytes:
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise TvmqError(f"{path}: damaged entry {name!r} ({_brief(e)})") from None


def _read_json(path: Path, archive: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(_read(path, archive, name))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TvmqError(f"{path}: damaged entry {name!r} (not JSON: {_brief(e)})") from None


# -- what the entries say -----------------------------------------------------------------


def _check_payload_config(path: Path, name: str, config: Any, kind: str, entries: set[str]):
    """Weights/constants are raw tensor bytes: no ``use_pickle``, no custom or opaque objects."""
    items = config.get("config") if isinstance(config, dict) else None
    if not isinstance(items, dict):
        raise TvmqError(f"{path}: damaged entry {name!r} (no 'config' table)")
    for fqn, meta in items.items():
        if not isinstance(meta, dict):
            raise TvmqError(f"{path}: damaged entry {name!r} (entry {fqn!r} is not a table)")
        file = meta.get("path_name")
        if meta.get("use_pickle") is not False or not isinstance(file, str):
            raise TvmqError(
                f"{path}: {kind[:-1]} {fqn!r} is stored as a pickle ({name}: use_pickle), "
                "and unpickling can run code; tvmq loads raw tensor data only"
            )
        if not _PAYLOAD_FILE[kind].fullmatch(file) or not isinstance(meta.get("tensor_meta"), dict):
            raise TvmqError(
                f"{path}: {kind[:-1]} {fqn!r} is a {file!r} object, not tensor data; tvmq "
                "loads raw tensor data only (no custom or opaque objects)"
            )
        if f"data/{kind}/{file}" not in entries:
            raise TvmqError(f"{path}: damaged archive ({name} names data/{kind}/{file}, absent)")


def _check_program(path: Path, name: str, program: Any) -> None:
    """No shape guard code, no code in shape expressions, node targets are torch operators."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise TvmqError(f"{path}: damaged entry {name!r} (no graph_module)")
    if program.get("guards_code"):
        raise TvmqError(
            f"{path}: the program carries Python guard code (from dynamic shapes), which "
            "loading would execute; export it with static shapes for tvmq"
        )
    for key, value in _walk(program):
        if key in ("target", "as_operator"):  # the schema's only two operator fields
            if not isinstance(value, str) or not _SAFE_TARGET.fullmatch(value) or "__" in value:
                if isinstance(value, str) and _QUANTIZED_OP.fullmatch(value):
                    raise TvmqError(
                        f"{path}: quantized op {value[len('torch.ops.') :]} is not supported; "
                        f"tvmq imports PT2E static quantization ({', '.join(pt2e.SUPPORTED)})"
                    )
                raise TvmqError(
                    f"{path}: a node calls {str(value)[:80]!r}, which is not a torch operator; "
                    "tvmq loads graphs of torch operators only"
                )
        elif key == "expr_str" and not _is_safe_expr(value):
            raise TvmqError(
                f"{path}: a symbolic shape {str(value)[:80]!r} is not a plain shape expression "
                "(loading would evaluate it as Python); tvmq needs static shapes"
            )


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in nested JSON, depth first, without recursion limits."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                yield key, value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _is_safe_expr(expr: Any) -> bool:
    if not isinstance(expr, str) or not _EXPR_CHARS.fullmatch(expr):
        return False
    names = _EXPR_NAME.findall(_EXPR_NUMBER.sub(" ", expr))
    return all(n in _EXPR_FUNCTIONS or _EXPR_SYMBOL.fullmatch(n) for n in names)


def _check_sample_inputs(path: Path, name: str, data: bytes) -> None:
    """torch retries a weights-only failure without restriction: refuse such a pickle first."""
    import pickle

    import torch

    if not data:
        return
    try:
        with warnings.catch_warnings():  # a crafted pickle's protocol warning is not the news
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, AttributeError) as e:
        raise TvmqError(
            f"{path}: the sample inputs ({name}) are not plain tensors (unpickling them could "
            f"run code: {_brief(e, 120)})"
        ) from None


# -- loading ------------------------------------------------------------------------------


@contextlib.contextmanager
def _weights_only_torch_load(path: Path) -> Iterator[None]:
    """While loading, ``torch.load(..., weights_only=False)`` raises instead of unpickling."""
    import torch

    real_load = torch.load

    def guarded_load(*args, **kwargs):
        if kwargs.get("weights_only") is False:
            raise TvmqError(
                f"{path}: loading needs unrestricted unpickling, which can run code; refused"
            )
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    torch.load = guarded_load
    try:
        yield
    finally:
        torch.load = real_load


@contextlib.contextmanager
def _quiet_torch_export_log() -> Iterator[None]:
    """torch.export.load logs a traceback before re-raising; tvmq reports one line instead."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _brief(error: BaseException, limit: int = 200) -> str:
    """An exception as one short line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
