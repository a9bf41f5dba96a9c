"""PruneMagnitude: zero the smallest-magnitude entries of constant matmul/conv2d weights.

Unstructured pruning on a float Relax module, before ``LegalizeOps`` and before any
quantization or weight clustering (both read the pruned weights). A *weight site* is a
``matmul(x, W)`` with a constant 2-D ``W`` (also ``W = permute_dims(constant)``, as the
PyTorch importer writes ``nn.Linear``) or an NCHW/OIHW ``conv2d(x, W)`` with a constant
``W``. Sites are named ``matmul_0``, ``conv2d_1``, ... in dataflow order (the same names
the calibration/int8 passes use); functions other than ``main`` prefix their name.

For every site of at least ``min_size`` elements, the ``round(sparsity * size)`` entries of
smallest ``|w|`` become exactly 0.0 (``scope="layer"``: per tensor; ``scope="global"``: one
threshold over all sites together). Ties are broken by position (the earlier entry in
site order, then row-major order, is pruned first), so the result is deterministic and
pruning to the same sparsity twice equals pruning once. Biases, batch-norm parameters
and weights under ``min_size`` are left alone. Shapes do not change: the zeros only pay
off with sparse kernels or compression; :func:`sparsity_report` reads what was reached
back from the IR.

Shared helpers for the other pruning passes (weight sites, constant replacement) live
here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.errors import TvmqError

MATMUL = "relax.matmul"
CONV2D = "relax.nn.conv2d"
PERMUTE_DIMS = "relax.permute_dims"


@dataclass(frozen=True, eq=False)
class WeightSite:
    """One matmul/conv2d whose weight is a constant, and how the op sees that constant."""

    name: str
    kind: str  # "matmul" (op layout [K, N]) or "conv2d" (op layout OIHW)
    var: relax.Var  # binding var of the op's result
    call: relax.Call
    const: tvm.ir.Constant  # the constant tensor in the IR
    perm: tuple[int, ...]  # op-layout weight = const.transpose(perm)

    @property
    def op_weight(self) -> np.ndarray:
        """The weight as the op reads it: [K, N] for matmul, OIHW for conv2d."""
        return np.transpose(self.const.value.numpy(), self.perm)

    @property
    def output_axis(self) -> int:
        """Output-channel axis of :attr:`op_weight`."""
        return 1 if self.kind == "matmul" else 0

    @property
    def reduction_axes(self) -> tuple[int, ...]:
        """Axes of :attr:`op_weight` summed over (K, or I, H, W)."""
        return (0,) if self.kind == "matmul" else (1, 2, 3)

    def const_from_op_layout(self, w: np.ndarray) -> tvm.ir.Constant:
        """A new constant holding op-layout `w`, in the original constant's layout."""
        inverse = np.argsort(self.perm)
        data = np.ascontiguousarray(np.transpose(w, inverse)).astype(self.const.value.dtype)
        return relax.const(data, str(self.const.value.dtype))


def op_name(expr) -> str | None:
    """The op name of a Call to a Relax op, else None."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def is_tensor_const(expr) -> bool:
    """Whether `expr` is a constant tensor."""
    return isinstance(expr, tvm.ir.Constant) and isinstance(expr.ty, relax.TensorType)


def ordered_bindings(func: relax.Function) -> list:
    """The bindings of `func` in program order."""
    if not isinstance(func.body, relax.SeqExpr):
        return []
    return [b for block in func.body.blocks for b in block.bindings]


def binding_map(func: relax.Function) -> dict:
    """Every var bound in `func` to its value."""
    return {b.var: b.value for b in ordered_bindings(func) if isinstance(b, relax.VarBinding)}


def relax_functions(mod: tvm.IRModule) -> list:
    """(GlobalVar, Function) for the Relax functions of `mod`, ``main`` first."""
    out = [(gv, f) for gv, f in mod.functions.items() if isinstance(f, relax.Function)]
    out.sort(key=lambda item: (item[0].name_hint != "main", item[0].name_hint))
    return out


def site_prefix(gv: tvm.ir.GlobalVar) -> str:
    """Site-name prefix of a function: empty for ``main``."""
    return "" if gv.name_hint == "main" else f"{gv.name_hint}/"


def _float32(expr) -> bool:
    ty = expr.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32"


def _resolve_weight(arg, bindings) -> tuple[tvm.ir.Constant, tuple[int, ...]] | None:
    if is_tensor_const(arg):
        return arg, tuple(range(arg.value.numpy().ndim))
    value = bindings.get(arg) if isinstance(arg, relax.Var) else None
    if op_name(value) == PERMUTE_DIMS and is_tensor_const(value.args[0]):
        ndim = len(value.args[0].value.shape)
        axes = value.attrs.axes
        perm = tuple(reversed(range(ndim))) if axes is None else tuple(int(a) for a in axes)
        return value.args[0], perm
    return None


def weight_sites(func: relax.Function, prefix: str = "") -> list[WeightSite]:
    """The matmul/conv2d ops of `func` with a constant float32 weight, in dataflow order."""
    bindings = binding_map(func)
    sites: list[WeightSite] = []
    for b in ordered_bindings(func):
        call = b.value
        name = op_name(call)
        if name not in (MATMUL, CONV2D) or len(call.args) != 2:
            continue
        if is_tensor_const(call.args[0]) or not (_float32(call.args[1]) and _float32(call)):
            continue
        found = _resolve_weight(call.args[1], bindings)
        if found is None:
            continue
        const, perm = found
        if name == MATMUL:
            if len(perm) != 2:
                continue
            kind = "matmul"
        else:
            attrs = call.attrs
            if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != (
                "NCHW",
                "OIHW",
                "NCHW",
            ):
                continue
            kind = "conv2d"
        sites.append(WeightSite(f"{prefix}{kind}_{len(sites)}", kind, b.var, call, const, perm))
    return sites


def module_weight_sites(mod: tvm.IRModule) -> list[WeightSite]:
    """:func:`weight_sites` of every Relax function of `mod`."""
    out: list[WeightSite] = []
    for gv, func in relax_functions(mod):
        out.extend(weight_sites(func, site_prefix(gv)))
    return out


@mutator
class _ConstantReplacer(PyExprMutator):
    """Swaps constants by identity; everything else is copied."""

    def __init__(self, mod, mapping):
        super().__init__(mod)
        self.mapping = mapping

    def visit_generic_const_(self, const):
        return self.mapping.get(const, const)


def replace_constants(mod: tvm.IRModule, mapping: dict) -> tvm.IRModule:
    """`mod` with each constant in `mapping` (old -> new expr) replaced; same shapes expected."""
    if not mapping:
        return mod
    updates = {}
    for gv, func in relax_functions(mod):
        new = _ConstantReplacer(mod, mapping).visit_expr(func)
        if not new.same_as(func):
            updates[gv] = new
    return update_functions(mod, updates)


def update_functions(mod: tvm.IRModule, updates: dict) -> tvm.IRModule:
    """A copy of `mod` with some functions replaced."""
    if not updates:
        return mod
    out = tvm.IRModule(dict(mod.functions.items()), mod.attrs)
    for gv, func in updates.items():
        out[gv] = func
    return out


def count_to_prune(sparsity: float, size: int) -> int:
    """``round(sparsity * size)``, halves rounded up."""
    return int(np.floor(sparsity * size + 0.5))


def _mask_smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask (flat) of the `k` smallest |values|, ties to the lower index."""
    mask = np.zeros(values.size, dtype=bool)
    if k > 0:
        order = np.argsort(np.abs(values.ravel()), kind="stable")
        mask[order[:k]] = True
    return mask


def sparsity_report(mod: tvm.IRModule) -> dict:
    """Zeros per weight site, read from the IR.

    Returns ``{"sites": {name: {"kind", "shape", "size", "zeros", "sparsity"}}, "size",
    "zeros", "sparsity"}``; the totals cover every constant matmul/conv2d weight.
    """
    sites = {}
    size = zeros = 0
    for s in module_weight_sites(mod):
        w = s.op_weight
        z = int(np.count_nonzero(w == 0))
        sites[s.name] = {
            "kind": s.kind,
            "shape": list(w.shape),
            "size": int(w.size),
            "zeros": z,
            "sparsity": z / w.size if w.size else 0.0,
        }
        size += int(w.size)
        zeros += z
    return {"sites": sites, "size": size, "zeros": zeros, "sparsity": zeros / size if size else 0.0}


@tvm.transform.module_pass(opt_level=0, name="PruneMagnitude")
class PruneMagnitude:
    """Zero the smallest-|w| entries of constant matmul/conv2d weights.

    Parameters
    ----------
    sparsity : float
        Fraction of entries to zero, in [0, 1).
    scope : {"layer", "global"}
        ``"layer"``: every eligible tensor reaches `sparsity`; ``"global"``: one magnitude
        threshold over all eligible tensors, so their total reaches `sparsity`.
    min_size : int
        Weights with fewer elements are left dense (first/last tiny layers hurt most).
    skip : sequence of str
        Site names (``"matmul_1"``) to leave dense.
    """

    def __init__(self, sparsity: float, scope: str = "layer", min_size: int = 256, skip=()) -> None:
        if not 0.0 <= float(sparsity) < 1.0:
            raise TvmqError(f"sparsity must be in [0, 1), got {sparsity}")
        if scope not in ("layer", "global"):
            raise TvmqError(f"scope must be 'layer' or 'global', got {scope!r}")
        if int(min_size) < 0:
            raise TvmqError(f"min_size must be >= 0, got {min_size}")
        self.sparsity = float(sparsity)
        self.scope = scope
        self.min_size = int(min_size)
        self.skip = frozenset(str(s) for s in skip)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        sites = [
            s
            for s in module_weight_sites(mod)
            if s.name not in self.skip and s.const.value.numpy().size >= self.min_size
        ]
        # A constant shared by two ops is pruned once.
        unique: dict = {}
        for s in sites:
            unique.setdefault(s.const, s)
        sites = list(unique.values())
        if not sites or self.sparsity == 0.0:
            return mod
        arrays = [s.const.value.numpy() for s in sites]
        masks = []
        if self.scope == "layer":
            masks = [_mask_smallest(a, count_to_prune(self.sparsity, a.size)) for a in arrays]
        else:
            flat = np.concatenate([a.ravel() for a in arrays])
            mask = _mask_smallest(flat, count_to_prune(self.sparsity, flat.size))
            offsets = np.cumsum([0] + [a.size for a in arrays])
            masks = [mask[offsets[i] : offsets[i + 1]] for i in range(len(arrays))]
        mapping = {}
        for s, a, m in zip(sites, arrays, masks, strict=True):
            if not np.any(m & (a.ravel() != 0)):
                continue  # already pruned: keep the very same constant
            new = a.copy().ravel()
            new[m] = 0.0
            mapping[s.const] = relax.const(new.reshape(a.shape), str(a.dtype))
        return replace_constants(mod, mapping)
