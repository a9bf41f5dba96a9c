"""tvmq's one site model: the layers that compression and quantization work on, and their names.

A *weight site* (:class:`WeightSite`, :func:`list_weight_sites`) is one matmul or conv2d
whose weight is a compile-time constant. Sites are numbered in dataflow order and named
``<kind>_<index>`` (``conv2d_0``, ``matmul_3``; functions other than ``main`` prefix their
name: ``encode/matmul_0``). Pruning, weight sharing, sparse kernels, quantization and
calibration all take their sites from here, so ``PruneConfig(skip=("matmul_1",))`` and
``Int8Static(skip=("matmul_1",))`` name the same layer, and calibration
(``tvmq.quantization.collect``) records activation statistics under the names that
:class:`AnnotateQDQ` reads back. The selector syntax of skip lists is
:mod:`tvmq.core.selectors`.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from tvmq.core.selectors import AFTER, is_skipped, resolve_op

from .relax_utils import (
    ADD,
    CONCAT,
    CONV2D,
    DEQUANTIZE,
    MATMUL,
    QUANTIZE,
    apply_layout,
    binding_map,
    clip_bounds,
    const_source,
    const_value,
    float_dtype,
    op_name,
    ordered_bindings,
    relax_functions,
    resolve,
    site_prefix,
    undo_layout,
    user_counts,
)

#: Op kinds a site can have, with the op they come from.
SITE_OPS = {MATMUL: "matmul", CONV2D: "conv2d"}
# Ops a producer is seen through when resolving ``after:<op>``.
_LOOK_THROUGH = ("relax.reshape", "relax.permute_dims")


def site_producer(site: WeightSite, bindings) -> str | None:
    """The op that produces `site`'s activation, seen through reshapes / permutes."""
    expr = resolve(site.activation, bindings)
    while op_name(expr) in _LOOK_THROUGH:
        expr = resolve(expr.args[0], bindings)
    return op_name(expr)


def selects(site: WeightSite, selectors, bindings) -> bool:
    """Whether any of `selectors` (see :func:`check_site_selector`) selects `site`."""
    producer = None
    for sel in selectors or ():
        if sel.startswith(AFTER):
            producer = producer or site_producer(site, bindings) or ""
            if producer == resolve_op(sel[len(AFTER) :]):
                return True
        elif is_skipped(site.name, site.kind, (sel,)):
            return True
    return False


def select_sites(func: relax.Function, selectors, prefix: str = "") -> list[WeightSite]:
    """The sites of `func` (:func:`list_weight_sites`) that `selectors` select."""
    if not selectors:
        return []
    bindings = binding_map(func)
    return [s for s in list_weight_sites(func, prefix) if selects(s, selectors, bindings)]


@dataclass(frozen=True, eq=False)
class WeightSite:
    """One matmul / conv2d whose weight is a constant: where it is, what it reads, its weight.

    Every pass that works per layer (pruning, weight sharing, sparse kernels, quantization)
    and calibration take their sites from :func:`list_weight_sites`, so a name like
    ``matmul_3`` means the same layer to all of them.
    """

    index: int
    name: str
    kind: str  # "matmul" or "conv2d"
    var: relax.Var  # the binding var holding the op's result
    call: relax.Call
    activation: relax.Expr  # the float input that calibration observes
    weight: np.ndarray  # float weight in the layout the op reads ([K, N] or OIHW)
    weight_axis: int  # output-channel axis of `weight`
    output_axis: int  # output-channel axis of the op's result
    const: tvm.ir.Constant  # the constant in the IR that `weight` is a view of
    layout: tuple = ()  # const -> weight: ("permute", axes) / ("reshape", shape) steps

    @property
    def op_weight(self) -> np.ndarray:
        """The weight as the op reads it: [K, N] for matmul, OIHW for conv2d."""
        return self.weight

    @property
    def reduction_axes(self) -> tuple[int, ...]:
        """Axes of :attr:`op_weight` summed over (K, or I, H, W)."""
        return (0,) if self.kind == "matmul" else (1, 2, 3)

    @property
    def perm(self) -> tuple[int, ...] | None:
        """op-layout weight = ``const.transpose(perm)``; None when a reshape is involved."""
        ndim = len(self.const.value.shape)
        perm = tuple(range(ndim))
        for kind, arg in self.layout:
            if kind != "permute":
                return None
            perm = tuple(perm[a] for a in arg)
        return perm

    def const_from_op_layout(self, w: np.ndarray) -> tvm.ir.Constant:
        """A new constant holding op-layout `w`, in the original constant's layout."""
        dtype = str(self.const.value.dtype)
        data = undo_layout(np.asarray(w), self.layout, self.const.value.shape)
        return relax.const(np.ascontiguousarray(data).astype(dtype), dtype)


def _annotated_weight(expr: relax.Expr, bindings) -> bool:
    """Whether a weight is already in QDQ form: ``dequantize`` of a constant or of its quantize."""
    dq = resolve(expr, bindings)
    if op_name(dq) != DEQUANTIZE:
        return False
    src = resolve(dq.args[0], bindings)
    if op_name(src) == QUANTIZE:
        src = src.args[0]
    return const_value(src, bindings) is not None


def is_activation_matmul(call: relax.Expr, bindings) -> bool:
    """Whether `call` is a float32 ``matmul`` of two non-constant operands of rank >= 2.

    An operand in QDQ form (a ``dequantize`` of an activation) counts; a weight
    (a constant, or a ``dequantize`` of one) does not.
    """
    if op_name(call) != MATMUL or len(call.args) != 2 or not float_dtype(call):
        return False
    for arg in call.args:
        ty = arg.ty
        if not isinstance(ty, relax.TensorType) or ty.ndim < 2 or not float_dtype(arg):
            return False
        if _weight_like(arg, bindings):
            return False
    return True


def _weight_like(expr: relax.Expr, bindings) -> bool:
    """A constant or a dequantized constant, seen through ``permute_dims`` / ``reshape``."""
    expr = resolve(expr, bindings)
    while op_name(expr) in ("relax.permute_dims", "relax.reshape"):
        expr = resolve(expr.args[0], bindings)
    return const_value(expr, bindings) is not None or _annotated_weight(expr, bindings)


def site_of_call(call: relax.Call, bindings) -> tuple | None:
    """(kind, source, weight_axis, output_axis) if `call` is a weight site or an annotated one.

    ``source`` is :func:`~tvmq.passes.relax_utils.const_source`'s ``(constant, steps)``, or
    None for an op already in QDQ form (it still takes an index).
    """
    name = op_name(call)
    if name not in SITE_OPS or len(call.args) != 2:
        return None
    act, w = call.args
    if not (float_dtype(act) and float_dtype(w) and float_dtype(call)):
        return None
    if const_value(act, bindings) is not None:
        return None
    source = const_source(w, bindings)
    if source is None and not _annotated_weight(w, bindings):
        return None
    ndim = w.ty.ndim
    if name == MATMUL:
        if ndim != 2 or act.ty.ndim < 1:
            return None
        return "matmul", source, 1, call.ty.ndim - 1
    attrs = call.attrs
    if (
        attrs.data_layout != "NCHW"
        or attrs.kernel_layout != "OIHW"
        or attrs.out_layout != "NCHW"
        or ndim != 4
    ):
        return None
    return "conv2d", source, 0, 1


def list_weight_sites(func: relax.Function, prefix: str = "") -> list[WeightSite]:
    """The weight sites of `func`, in dataflow order.

    A site is a float32 ``matmul(x, W)`` with a constant 2-D ``W`` (also ``W`` given as
    ``permute_dims`` / ``reshape`` of a constant, as the PyTorch importer writes
    ``nn.Linear``), or a float32 NCHW/OIHW ``conv2d(x, W)`` with a constant ``W``; ``x`` is
    a float32 activation, not a constant. Ops already in QDQ form
    (weight ``dequantize`` of a constant, or activation a ``dequantize``) keep their index,
    so names stay stable when a module is annotated in steps, but are not returned.
    """
    bindings = binding_map(func)
    sites: list[WeightSite] = []
    index = 0
    for b in ordered_bindings(func):
        if not isinstance(b, relax.VarBinding) or not isinstance(b.value, relax.Call):
            continue
        found = site_of_call(b.value, bindings)
        if found is None:
            continue
        kind, source, waxis, oaxis = found
        act = b.value.args[0]
        name = f"{prefix}{kind}_{index}"
        index += 1
        if source is None or op_name(bindings.get(act)) == DEQUANTIZE:
            continue
        const, layout = source
        sites.append(
            WeightSite(
                index=index - 1,
                name=name,
                kind=kind,
                var=b.var,
                call=b.value,
                activation=act,
                weight=apply_layout(const.value.numpy(), layout),
                weight_axis=waxis,
                output_axis=oaxis,
                const=const,
                layout=layout,
            )
        )
    return sites


def module_weight_sites(mod: tvm.IRModule) -> list[WeightSite]:
    """The weight sites of every Relax function of `mod` (see :func:`list_weight_sites`)."""
    sites: list[WeightSite] = []
    for gv, func in relax_functions(mod):
        sites.extend(list_weight_sites(func, site_prefix(gv)))
    return sites


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


def _feeds_only_integer_ops(var: relax.Var, func: relax.Function) -> bool:
    """Whether every reader of `var` (through tuples) is an op that runs on integers.

    An integer add or concat only pays when its result stays integer: one that feeds a
    float op (a LayerNorm after a transformer's residual add, the function's output)
    is quantized and dequantized again, which adds error and saves no float work. On
    all-MiniLM-L6-v2, quantizing those residual adds dropped the static-int8 embeddings'
    minimum cosine to float from 0.99 to 0.72 (bench/bench_peers.py).
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
        if not _feeds_only_integer_ops(output, func):
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
