"""Tensor sites: the weightless ops static int8 quantizes, and the tensors calibration observes.

A *tensor site* is an op with no weight whose inputs and output are quantized so that
it can run on integers: a residual ``add`` of two activations (``add_0``) or a
``concat`` (``concat_0``), numbered per kind, apart from the weight sites (whose names
therefore do not change). It observes several tensors: ``add_0:0`` / ``add_0:1`` (the
operands) and ``add_0`` (the result, after a following ``relu`` / ``clip``, which the
integer add absorbs); a concat observes only its result ``concat_0``, and its inputs
are quantized with the result's parameters (as TFLite does), so the concat itself is
exact on integers.

An *activation matmul* (``matmul_act_0``, a tensor site of kind ``"matmul_act"``) is a
float32 ``matmul(a, b)`` of two non-constant operands of rank >= 2 -- attention's
``Q @ K^T`` and ``P @ V``. It observes both operands (``matmul_act_0:0``,
``matmul_act_0:1``), per tensor, and not its result: :class:`LowerInt8` runs it as an
integer matmul with run-time zero-point terms and requantizes (or dequantizes) its
int32 result like a weight site's.

Weight sites and the naming rules are in :mod:`.sites`; tensor sites are numbered per kind,
apart from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm_ffi
from tvm import relax

from .relax_utils import (
    ADD,
    CONCAT,
    DEQUANTIZE,
    MATMUL,
    binding_map,
    clip_bounds,
    const_value,
    float_dtype,
    op_name,
    ordered_bindings,
    resolve,
    user_counts,
)
from .sites import is_activation_matmul

__all__ = ["ObservedTensor", "TensorSite", "list_observed_tensors", "list_tensor_sites"]


@dataclass(frozen=True, eq=False)
class TensorSite:
    """One weightless op (``add`` / ``concat`` / ``matmul_act``) whose inputs get quantized."""

    index: int
    name: str
    kind: str  # "add", "concat" or "matmul_act"
    var: relax.Var  # the binding var of the op
    call: relax.Call
    inputs: tuple[relax.Expr, ...]  # the float operands, in order
    input_names: tuple[str, ...]  # the calibration name whose parameters each input takes
    # The float tensor that is quantized: `var`, or its relu / clip; None for a matmul_act,
    # whose int32 result is requantized by whatever quantizes it next.
    output: relax.Var | None

    @property
    def observed(self) -> list[tuple[str, relax.Expr]]:
        """(calibration name, tensor) of each tensor to observe, without repeats."""
        out = dict(zip(self.input_names, self.inputs, strict=True))
        if self.output is not None:
            out[self.name] = self.output
        return list(out.items())


@dataclass(frozen=True)
class ObservedTensor:
    """A tensor that calibration observes (``.activation``) under ``.name``."""

    name: str
    kind: str
    activation: relax.Expr
    index: int


def _activation_operand(expr: relax.Expr, bindings) -> bool:
    """A float32 tensor that is not a constant (a dequantize counts: it is annotated)."""
    return (
        isinstance(expr.ty, relax.TensorType)
        and float_dtype(expr)
        and const_value(expr, bindings) is None
    )


def _tuple_fields(expr: relax.Expr, bindings) -> list[relax.Expr] | None:
    expr = resolve(expr, bindings)
    return list(expr.fields) if isinstance(expr, relax.Tuple) else None


# Ops that take a quantized tensor and stay integer (or are integer sites themselves).
_INTEGER_CONSUMERS = frozenset(
    {
        "relax.matmul",
        "relax.nn.conv2d",
        ADD,
        CONCAT,
        "relax.nn.max_pool2d",
        "relax.reshape",
        "relax.nn.relu",
        "relax.clip",
    }
)


def _feeds_only_integer_ops(var: relax.Var, func: relax.Function, bindings) -> bool:
    """Whether every reader of `var` (through tuples) is an op that runs on integers.

    An integer add or concat only pays when its result stays integer: one that feeds a
    float op (a LayerNorm after a transformer's residual add, the function's output)
    is quantized and dequantized again, which adds error and saves no float work. On
    all-MiniLM-L6-v2, quantizing those residual adds dropped the static-int8 embeddings'
    minimum cosine to float from 0.99 to 0.72 (bench/bench_peers.py); quantizing DeiT-tiny's
    class-token concat (read by the float add of the position embeddings, then the residual
    stream) dropped its output's worst cosine to float from 0.9993 to 0.967.
    """
    readers: dict[relax.Var, list] = {}
    for b in ordered_bindings(func):
        value = b.value
        args = value.fields if isinstance(value, relax.Tuple) else getattr(value, "args", [])
        for a in args:
            if isinstance(a, relax.Var):
                readers.setdefault(a, []).append(b)
    body = func.body.body if isinstance(func.body, relax.SeqExpr) else func.body
    returned: set = set()
    relax.analysis.post_order_visit(
        body, lambda e: returned.add(e) if isinstance(e, relax.Var) else None
    )
    todo, seen = [var], set()
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in returned:
            return False
        for b in readers.get(v, []):
            if isinstance(b.value, relax.Tuple):
                todo.append(b.var)
            elif op_name(b.value) == ADD:
                # An add runs on integers only as a tensor site: two activations, its own
                # result integer-bound too. With a constant (ViT's position embeddings
                # after the class-token concat) it is a float op.
                if any(const_value(a, bindings) is not None for a in b.value.args):
                    return False
                todo.append(b.var)
            elif op_name(b.value) not in _INTEGER_CONSUMERS:
                return False
    return True


def _matmul_act_site(b: relax.VarBinding, bindings, prefix: str, counters) -> TensorSite | None:
    """The ``matmul_act`` site of binding `b` (numbered in `counters`), else None."""
    if not is_activation_matmul(b.value, bindings):
        return None
    index = counters["matmul_act"]
    counters["matmul_act"] += 1
    inputs = tuple(b.value.args)
    if all(op_name(resolve(a, bindings)) == DEQUANTIZE for a in inputs):
        return None  # already annotated
    name = f"{prefix}matmul_act_{index}"
    return TensorSite(
        index=index,
        name=name,
        kind="matmul_act",
        var=b.var,
        call=b.value,
        inputs=inputs,
        input_names=(f"{name}:0", f"{name}:1"),
        output=None,
    )


def list_tensor_sites(func: relax.Function, prefix: str = "") -> list[TensorSite]:
    """The ``add`` / ``concat`` / ``matmul_act`` tensor sites of `func`, in dataflow order.

    An ``add`` qualifies when both operands are float32 activations (not constants: a
    bias add belongs to its matmul / conv2d) of the result's shape; a ``concat`` when
    all its inputs are float32 activations; either only when its result feeds nothing
    but integer ops (:func:`_feeds_only_integer_ops`). A ``matmul`` qualifies when
    :func:`is_activation_matmul` holds, wherever its result goes. Ops already in QDQ form
    (every input a ``dequantize``) keep their index but are not returned, so annotating
    is idempotent.
    """
    bindings = binding_map(func)
    users = user_counts(func)
    readers: dict[relax.Var, list[relax.Expr]] = {}
    for b in ordered_bindings(func):
        if isinstance(b.value, relax.Call):
            for arg in b.value.args[:1]:
                if isinstance(arg, relax.Var):
                    readers.setdefault(arg, []).append(b)
    sites: list[TensorSite] = []
    counters = {"add": 0, "concat": 0, "matmul_act": 0}
    for b in ordered_bindings(func):
        value = b.value
        name = op_name(value)
        if not isinstance(b, relax.VarBinding) or name not in (ADD, CONCAT, MATMUL):
            continue
        if not float_dtype(value):
            continue
        if name == MATMUL:
            site = _matmul_act_site(b, bindings, prefix, counters)
            if site is not None:
                sites.append(site)
            continue
        if name == ADD:
            inputs = list(value.args)
            out_shape = value.ty.shape
            if not all(_activation_operand(a, bindings) for a in inputs):
                continue
            if out_shape is None or any(
                a.ty.shape is None or not tvm_ffi.structural_equal(a.ty.shape, out_shape)
                for a in inputs
            ):
                continue
            kind = "add"
        else:
            inputs = _tuple_fields(value.args[0], bindings)
            if not inputs or not all(_activation_operand(a, bindings) for a in inputs):
                continue
            kind = "concat"
        site_name = f"{prefix}{kind}_{counters[kind]}"
        counters[kind] += 1
        if all(op_name(resolve(a, bindings)) == DEQUANTIZE for a in inputs):
            continue  # already annotated
        output = b.var
        # A relu / clip right after an add is absorbed by the integer add (its clamp).
        nxt = readers.get(b.var, [])
        if kind == "add" and users.get(b.var, 0) == 1 and len(nxt) == 1:
            act = nxt[0]
            if clip_bounds(act.value) is not None and float_dtype(act.value):
                output = act.var
        if not _feeds_only_integer_ops(output, func, bindings):
            continue
        if kind == "add":
            input_names = tuple(f"{site_name}:{i}" for i in range(len(inputs)))
        else:
            input_names = (site_name,) * len(inputs)
        sites.append(
            TensorSite(
                index=counters[kind] - 1,
                name=site_name,
                kind=kind,
                var=b.var,
                call=value,
                inputs=tuple(inputs),
                input_names=input_names,
                output=output,
            )
        )
    return sites


def list_observed_tensors(func: relax.Function, prefix: str = "") -> list[ObservedTensor]:
    """What calibration observes besides the weight sites' inputs: tensor sites' tensors."""
    out = []
    for site in list_tensor_sites(func, prefix):
        for name, expr in site.observed:
            out.append(ObservedTensor(name, site.kind, expr, site.index))
    return out
