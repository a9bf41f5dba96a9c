"""The common shape of an imported model: a Relax IRModule plus its input/output signature."""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"])


@dataclass
class ImportedModel:
    """A model in Relax form.

    Weights are bound into ``mod["main"]`` as ``relax.Constant`` nodes (no params dict):
    tvmq's passes see, rewrite and quantize them directly, and the compiled library
    embeds them.
    """

    mod: tvm.IRModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: str = ""  # "pytorch", "onnx" or "relax"
    meta: dict = field(default_factory=dict)
