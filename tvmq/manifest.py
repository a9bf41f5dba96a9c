"""``model.json``: what a compiled tvmq directory holds, so every artefact says what it is."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tvmq.errors import TvmqError
from tvmq.frontends.model import TensorSpec

FORMAT = "tvmq-model/1"
MANIFEST = "model.json"
LIBRARY = "model.so"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_of(path: os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    """The contents of ``model.json``."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    target: dict  # {"name", "description", "tvm_target", "cc"}
    compression: dict = field(default_factory=dict)  # what was applied, e.g. {"quantize": {...}}
    library: dict = field(default_factory=dict)  # {"file", "bytes", "sha256"}
    source: str = ""
    versions: dict = field(default_factory=dict)  # {"tvmq", "tvm"}
    created: str = ""
    notes: dict = field(default_factory=dict)  # free-form facts: float ops left, tuning...
    # Every file tvmq wrote into the folder, model.json included: a rebuild replaces these
    # and nothing else. Manifests from before this field mean model.json + the library.
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "created": self.created or datetime.now(UTC).isoformat(timespec="seconds"),
            "source": self.source,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "target": self.target,
            "compression": self.compression,
            "library": self.library,
            "versions": self.versions,
            "notes": self.notes,
            "files": sorted(set(self.files) | {MANIFEST}),
        }

    def write(self, directory: os.PathLike) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def read(cls, directory: os.PathLike) -> Manifest:
        path = Path(directory) / MANIFEST
        if not Path(directory).is_dir():
            raise TvmqError(f"{directory}: no such directory (expected the output of tvmq compile)")
        if not path.is_file():
            raise TvmqError(f"{directory}: no {MANIFEST} here; is this a tvmq compile output?")
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict):
                raise TypeError(f"a JSON {type(d).__name__}, not an object")
            if d.get("format") != FORMAT:
                raise TvmqError(f"{path}: format {d.get('format')!r}, this tvmq reads {FORMAT!r}")
            _check_fields(d)
            return cls(
                inputs=[TensorSpec.from_json(s) for s in d["inputs"]],
                outputs=[TensorSpec.from_json(s) for s in d["outputs"]],
                target=d["target"],
                compression=d.get("compression", {}),
                library=d["library"],
                source=d.get("source", ""),
                versions=d.get("versions", {}),
                created=d.get("created", ""),
                notes=d.get("notes", {}),
                files=d.get("files") or [MANIFEST, d["library"].get("file", LIBRARY)],
            )
        except (
            json.JSONDecodeError,
            UnicodeDecodeError,
            KeyError,
            TypeError,
            ValueError,
            AttributeError,
        ) as e:
            raise TvmqError(f"{path}: damaged manifest ({type(e).__name__}: {e})") from None


def add_files(directory: os.PathLike, names: list[str]) -> None:
    """List more files in a build's ``model.json`` (``"files"``): tvmq then owns them, and the
    next build into the folder replaces or removes them. Rewritten atomically, every other
    field as it was."""
    path = Path(directory) / MANIFEST
    Manifest.read(directory)  # a damaged or foreign manifest is refused, never rewritten
    d = json.loads(path.read_text())
    d["files"] = sorted(
        set(d.get("files") or [MANIFEST, d["library"].get("file", LIBRARY)]) | set(names)
    )
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(d, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TvmqError(f"{path}: cannot update ({e.strerror or e})") from None


def _check_fields(d: dict) -> None:
    """Raise ValueError naming the first field of ``model.json`` that is not what tvmq wrote.

    Every later use (loading the library, matching inputs) trusts these types; a hand-edited
    or truncated manifest is refused here in one line instead of failing somewhere inside.
    """
    for key in ("inputs", "outputs"):
        specs = d.get(key)
        if not isinstance(specs, list):
            raise ValueError(f"field {key!r} must be a list of tensors")
        for i, spec in enumerate(specs):
            _check_spec(spec, f"{key}[{i}]")
    for key in ("target", "library"):
        if not isinstance(d.get(key), dict):
            raise ValueError(f"field {key!r} must be an object")
    for key in ("compression", "versions", "notes"):
        if not isinstance(d.get(key, {}), dict):
            raise ValueError(f"field {key!r} must be an object")
    lib = d["library"]
    file = lib.get("file")
    # A bare file name: the library is always the one inside the compiled directory.
    if not isinstance(file, str) or not file or file in (".", "..") or re.search(r"[/\\]", file):
        raise ValueError(f"field 'library.file' must be a file name in the directory, got {file!r}")
    if "sha256" in lib and not (
        isinstance(lib["sha256"], str) and _SHA256.fullmatch(lib["sha256"])
    ):
        raise ValueError(f"field 'library.sha256' is not a sha256 hex digest: {lib['sha256']!r}")
    if not isinstance(d["target"].get("name", ""), str):
        raise ValueError("field 'target.name' must be a string")
    files = d.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise ValueError("field 'files' must be a list of file names")


def _check_spec(spec, where: str) -> None:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"field {where!r} must be an object with a string 'name'")
    shape = spec.get("shape")
    # A str is a symbolic dim: a name ("batch"), or for an output an expression of names.
    if not isinstance(shape, list) or not all(
        (type(n) is int and n >= 0) or (isinstance(n, str) and n) for n in shape
    ):
        raise ValueError(
            f"field '{where}.shape' must be a list of non-negative integers and dim names"
        )
    if where.startswith("inputs") and not all(type(n) is int or n.isidentifier() for n in shape):
        raise ValueError(f"field '{where}.shape' has a symbolic dim that is not a name")
    if not isinstance(spec.get("dtype"), str) or not spec["dtype"]:
        raise ValueError(f"field '{where}.dtype' must be a dtype name")
    bound = spec.get("index_bound")
    if bound is not None and not (type(bound) is int and bound > 0):
        raise ValueError(f"field '{where}.index_bound' must be a positive integer")
