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

A site also carries the names its layer has in the source model (:attr:`WeightSite.layer_names`:
a PyTorch module path such as ``encoder.0.fc``, an ONNX node name), which the frontends
record on the op's span (``relax_utils.layer_span``; :mod:`.site_names` tags them); skip lists
match those too (``skip=("classifier*",)``).

Ops without a weight that static int8 still runs on integers (a residual ``add``, a
``concat``, attention's activation matmuls) are *tensor sites*: :mod:`.tensor_sites`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from tvmq.core.selectors import AFTER, is_skipped, resolve_op

from .relax_utils import (
    CONV2D,
    DEQUANTIZE,
    MATMUL,
    QUANTIZE,
    apply_layout,
    binding_map,
    const_source,
    const_value,
    float_dtype,
    layer_names,
    op_name,
    ordered_bindings,
    relax_functions,
    resolve,
    site_prefix,
    undo_layout,
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
        elif site_skipped(site, (sel,)):
            return True
    return False


def site_skipped(site, skip) -> bool:
    """Whether a skip list selects `site` (a weight or tensor site) by name, layer name or kind."""
    return is_skipped(site.name, site.kind, skip, getattr(site, "layer_names", ()))


def site_label(site) -> str:
    """``matmul_2`` or, with a source-model name, ``matmul_2 [classifier]`` (for messages)."""
    names = getattr(site, "layer_names", ())
    return f"{site.name} [{names[0]}]" if names else site.name


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
    # Names in the source model, the frontend's choice first (PyTorch module path; ONNX
    # node name, then the module path / weight name it found); empty when unknown.
    layer_names: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        """The layer's name in the source model ("" when the frontend recorded none)."""
        return self.layer_names[0] if self.layer_names else ""

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
                layer_names=layer_names(b.value),
            )
        )
    return sites


def module_weight_sites(mod: tvm.IRModule) -> list[WeightSite]:
    """The weight sites of every Relax function of `mod` (see :func:`list_weight_sites`)."""
    sites: list[WeightSite] = []
    for gv, func in relax_functions(mod):
        sites.extend(list_weight_sites(func, site_prefix(gv)))
    return sites
