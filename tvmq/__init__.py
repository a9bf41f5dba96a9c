"""tvmq: compress neural networks and compile them for real hardware with Apache TVM.

The Python API mirrors the CLI::

    art = tvmq.compile(model, "host", example_inputs=(x,), output_dir="build/")
    m = tvmq.load("build/")
    y = m(x_numpy)

Each step returns ordinary TVM objects (``tvm.IRModule``, ``tvm.relax.Executable``).
Names are imported lazily so that ``import tvmq.errors`` or the CLI's ``--help`` stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "compile": "tvmq.compiler",
    "CompiledArtifact": "tvmq.compiler",
    "TvmqError": "tvmq.errors",
    "ImportedModel": "tvmq.frontends",
    "TensorSpec": "tvmq.frontends",
    "import_model": "tvmq.frontends",
    "CompiledModel": "tvmq.runtime",
    "load": "tvmq.runtime",
    "TargetPreset": "tvmq.targets",
    "get_target": "tvmq.targets",
    "list_targets": "tvmq.targets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tvmq' has no attribute {name!r}")
