"""``model.json``: what a compiled tvmq directory holds, so every artefact says what it is."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tvmq.errors import TvmqError
from tvmq.frontends.model import TensorSpec

FORMAT = "tvmq-model/1"
MANIFEST = "model.json"
LIBRARY = "model.so"


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
            if d.get("format") != FORMAT:
                raise TvmqError(f"{path}: format {d.get('format')!r}, this tvmq reads {FORMAT!r}")
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
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise TvmqError(f"{path}: damaged manifest ({type(e).__name__}: {e})") from None
