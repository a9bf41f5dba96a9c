"""tvmq: compress neural networks and compile them for real hardware with Apache TVM.

The Python API mirrors the CLI::

    art = tvmq.compile(model, "host", example_inputs=(x,), output_dir="build/")
    m = tvmq.load("build/")
    y = m(x_numpy)

Each step returns ordinary TVM objects (``tvm.IRModule``, ``tvm.relax.Executable``).
The verbs ``tvmq.quantize``, ``tvmq.compress`` and ``tvmq.distill`` are also there, and
every subpackage (``tvmq.quantization``, ``tvmq.pruning``, ``tvmq.passes``...) is reachable
as an attribute after a bare ``import tvmq``. Everything is imported lazily, on first use,
so that ``import tvmq.errors`` or the CLI's ``--help`` stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute in it)
_EXPORTS = {
    "compile": "tvmq.compiler",
    "compress": ("tvmq.compression", "apply_compression"),
    "distill": "tvmq.distillation",
    "quantize": "tvmq.quantization",
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
        module, attr = (
            _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
        )
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")  # a subpackage or module
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'tvmq' has no attribute {name!r}")
