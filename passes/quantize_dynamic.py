"""QuantizeDynamic: int8 weights, activation ranges computed at run time (dynamic int8).

Dynamic quantization (``tvmq.quantization.Int8Dynamic``; ONNX Runtime's
``quantize_dynamic``, PyTorch's dynamic ``nn.Linear``), on a float Relax module before
``LegalizeOps``; no calibration. Every float32 ``matmul(x, W)`` with a constant 2-D ``W``
(also ``permute_dims`` of a constant, see ``tvmq.passes.sites.list_weight_sites``) that is not
skipped becomes::

    lo  = minimum(min(x, -1), 0);  hi = maximum(max(x, -1), 0)  # per row, every call
    s_x = maximum((hi - lo) / 255, eps);  z_x = int32(clip(round(-lo / s_x), 0, 255))
    x_q = uint8(clip(round(x / s_x) + z_x, 0, 255))
    acc = matmul(x_q, W_q, out_dtype="int32")                    # W_q: int8 constant [K, N]
    acc = acc - z_x * sum_k W_q                                  # zero-point compensation
    y   = float32(acc) * (s_x * s_w)                             # s_w: [N] or scalar

``W_q`` is symmetric int8 in ``[-127, 127]`` with one scale per output channel (or per
tensor, ``weight_per_channel=False``), computed at compile time. Activations are
asymmetric uint8 (u8 x s8 suits x86 VNNI), the range ``[min(x), max(x)]`` widened to
contain 0 like ``qmath.choose_qparams``. The accumulator bound ``K * 255 * 127`` must fit
in int32 (``K`` < 66,000); larger ops stay float.

The ranges are per row of ``x`` (reduced over the last axis, kept as ``[..., M, 1]``;
``Int8Dynamic.activation_per_row``) or per tensor (``activation_per_row=False``: whole-tensor
``min``/``max`` and ``relax.quantize``, as ONNX Runtime and PyTorch do).

Limits: matmul only (conv2d stays float, recorded in the function attribute
``"tvmq.float_ops"`` like ``LowerInt8`` does). Quantized
ops are recorded in ``"tvmq.dynamic_int8"`` on their function. A rewritten matmul reads
uint8 x int8, so it is no longer a site: running the pass twice is the same as once, and
the other sites keep the names of the float model.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.core import qmath
from tvmq.kernels.dynamic_quant import row_qparams_u8

from .analysis import with_float_ops
from .quantize_weight_only import stable_sites
from .relax_utils import (
    MATMUL,
    const_f32,
    const_i32,
    const_value,
    op_name,
    relax_functions,
    site_prefix,
)
from .sites import WeightSite, site_skipped

ATTR = "tvmq.dynamic_int8"
_ACT_DTYPE = "uint8"
_QMAX = 255


def weight_qparams_int8(w: np.ndarray, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(int8 ``W_q`` [K, N], float32 ``s_w`` [N] or scalar): symmetric, restricted range."""
    w64 = w.astype(np.float64)
    if per_channel:
        lo, hi = w64.min(axis=0), w64.max(axis=0)
        scale, zp = qmath.choose_qparams(lo, hi, "int8", True, axis=1)
        # An all-zero (pruned) column quantizes to 0 with any scale.
        scale = np.where((lo == 0) & (hi == 0), np.float32(1.0), scale).astype(np.float32)
        return qmath.quantize(w, scale, zp, "int8", axis=1), scale
    scale, zp = qmath.choose_qparams(w64.min(), w64.max(), "int8", True)
    return qmath.quantize(w, scale, zp, "int8"), np.float32(scale)


def activation_qparams_dynamic(
    x: np.ndarray, per_row: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The run-time ``(s_x, z_x)`` the pass computes, in numpy (float32 like the graph):
    ``[..., M, 1]`` arrays per row, else scalars."""
    x = np.asarray(x, dtype=np.float32)
    kw = {"axis": -1, "keepdims": True} if per_row else {}
    lo = np.minimum(x.min(**kw), np.float32(0))
    hi = np.maximum(x.max(**kw), np.float32(0))
    s = np.maximum((hi - lo) / np.float32(_QMAX), np.float32(qmath.SCALE_EPS)).astype(np.float32)
    z = np.clip(np.rint(-lo / s), 0, _QMAX).astype(np.int32)
    return s, z


def quantize_activation(x: np.ndarray, s_x: np.ndarray, z_x: np.ndarray) -> np.ndarray:
    """``uint8(clip(round(x / s_x) + z_x, 0, 255))`` as the graph computes it (numpy)."""
    return np.clip(np.rint(x / s_x) + z_x, 0, _QMAX).astype(_ACT_DTYPE)


def dynamic_matmul_reference(
    x: np.ndarray, w: np.ndarray, per_channel: bool = True, per_row: bool = True
) -> np.ndarray:
    """numpy reference of one rewritten ``matmul(x, W)`` (float32 result)."""
    w_q, s_w = weight_qparams_int8(np.asarray(w, dtype=np.float32), per_channel)
    s_x, z_x = activation_qparams_dynamic(x, per_row)
    x_q = quantize_activation(x, s_x, z_x)
    acc = x_q.astype(np.int64) @ w_q.astype(np.int64)
    acc = acc - z_x.astype(np.int64) * w_q.astype(np.int64).sum(axis=0)
    return (acc.astype(np.float32) * (s_x * s_w).astype(np.float32)).astype(np.float32)


@mutator
class _Rewriter(PyExprMutator):
    """Emits the dynamic int8 compute in place of each planned matmul."""

    def __init__(
        self, mod: tvm.IRModule, plans: dict[relax.Call, tuple[np.ndarray, np.ndarray]], per_row
    ):
        super().__init__(mod)
        self.plans = plans
        self.per_row = per_row
        self.quantized: list[tuple[relax.Expr, tuple]] = []

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        plan = self.plans.get(call)
        if plan is None:
            return super().visit_call_(call)
        w_q, s_w = plan
        emit = self.builder_.emit
        x = self.visit_expr(call.args[0])
        key = self._source(x)
        quantized = next((q for k, q in self.quantized if _same_key(k, key)), None)
        if quantized is None:
            quantized = self._quantize(x)
            self.quantized.append((key, quantized))
        x_q, s_x, z_x = quantized
        acc = emit(relax.op.matmul(x_q, relax.const(w_q, "int8"), out_dtype="int32"))
        col_sum = w_q.astype(np.int64).sum(axis=0)
        acc = emit(relax.op.subtract(acc, relax.op.multiply(z_x, const_i32(col_sum))))
        scale = emit(relax.op.multiply(s_x, const_f32(s_w)))
        return relax.op.multiply(relax.op.astype(acc, "float32"), scale)

    def visit_binding_block_(self, block):
        self.quantized = []  # an activation quantized in one block is reused there only
        return super().visit_binding_block_(block)

    def visit_dataflow_block_(self, block):
        self.quantized = []
        return super().visit_dataflow_block_(block)

    def _source(self, x: relax.Expr) -> tuple[relax.Expr, tuple]:
        """``(tensor, shape)``: ``x`` seen through reshapes (each torch Linear reshapes its
        input on its own), so that matmuls of one activation share its quantization."""
        shape = tuple(x.ty.shape.values) if isinstance(x.ty.shape, relax.ShapeExpr) else None
        src = x
        while isinstance(src, relax.Var):
            value = self.lookup_binding(src)
            if not (isinstance(value, relax.Call) and op_name(value) == "relax.reshape"):
                break
            src = value.args[0]
        return src, shape

    def _quantize(self, x: relax.Expr) -> tuple[relax.Expr, relax.Expr, relax.Expr]:
        """``(x_q, s_x, z_x)`` for activation ``x``, emitted once per block and reused."""
        emit = self.builder_.emit
        shape = x.ty.shape if isinstance(x.ty, relax.TensorType) else None
        if self.per_row and isinstance(shape, relax.ShapeExpr):  # one kernel for the ranges
            kernel = self.builder_.add_func(
                row_qparams_u8(list(shape.values), qmath.SCALE_EPS), "row_qparams_u8"
            )
            params_ty = relax.TensorType([*shape.values[:-1], 2], "float32")
            params = emit(relax.call_tir(kernel, [x], out_ty=params_ty))
            axis = [len(shape.values) - 1]
            s_x = emit(relax.op.strided_slice(params, axis, [0], [1]))
            z_f = emit(relax.op.strided_slice(params, axis, [1], [2]))
        else:
            zero = const_f32(0.0)
            rows = {"axis": -1, "keepdims": True} if self.per_row else {}
            lo = emit(relax.op.minimum(relax.op.min(x, **rows), zero))
            hi = emit(relax.op.maximum(relax.op.max(x, **rows), zero))
            s_x = emit(
                relax.op.maximum(
                    relax.op.divide(relax.op.subtract(hi, lo), const_f32(float(_QMAX))),
                    const_f32(qmath.SCALE_EPS),
                )
            )
            z_f = emit(
                relax.op.clip(relax.op.round(relax.op.divide(relax.op.negative(lo), s_x)), 0, _QMAX)
            )
        z_x = emit(relax.op.astype(z_f, "int32"))
        if self.per_row:  # relax.quantize takes one scale per tensor or per axis entry
            q = relax.op.add(relax.op.round(relax.op.divide(x, s_x)), z_f)
            x_q = emit(relax.op.astype(relax.op.clip(q, 0, _QMAX), _ACT_DTYPE))
        else:
            x_q = emit(relax.op.quantize(x, s_x, z_x, axis=-1, out_dtype=_ACT_DTYPE))
        return x_q, s_x, z_x


def _same_key(a: tuple[relax.Expr, tuple], b: tuple[relax.Expr, tuple]) -> bool:
    if not a[0].same_as(b[0]) or a[1] is None or b[1] is None or len(a[1]) != len(b[1]):
        return False
    return all(tvm_ffi.structural_equal(p, q) for p, q in zip(a[1], b[1], strict=True))


def _is_dynamic_matmul(call: relax.Call, bindings) -> bool:
    """Whether a matmul is one this pass wrote: uint8 x int8 constant -> int32."""
    if op_name(call) != MATMUL or len(call.args) != 2:
        return False
    x, w = call.args
    return (
        str(x.ty.dtype) == _ACT_DTYPE
        and str(call.ty.dtype) == "int32"
        and const_value(w, bindings) is not None
    )


def _fits_int32(k: int) -> bool:
    return k * _QMAX * 127 < 2**31


@tvm.transform.module_pass(opt_level=0, name="QuantizeDynamic")
class QuantizeDynamic:
    """Dynamic int8 matmul: int8 weights at compile time, uint8 activation ranges at run time.

    Parameters
    ----------
    weight_per_channel : bool
        Weight scales per output channel (else per tensor).
    activation_per_row : bool
        Activation ranges per row of the matmul input (else per tensor).
    skip : sequence of str
        Sites to leave float (site names, fnmatch patterns or op kinds).
    only_vars : collection of str, optional
        Quantize only the matmuls bound to these variable names (how static int8 hands its
        ``dynamic`` sites over after ``LowerInt8``, which renumbers the sites).
    """

    def __init__(
        self,
        *,
        weight_per_channel: bool = True,
        activation_per_row: bool = True,
        skip: Sequence[str] = (),
        only_vars: Collection[str] | None = None,
    ):
        self.weight_per_channel = bool(weight_per_channel)
        self.activation_per_row = bool(activation_per_row)
        self.skip = (skip,) if isinstance(skip, str) else tuple(skip)
        self.only_vars = None if only_vars is None else frozenset(only_vars)

    def plan(self, site: WeightSite) -> str | None:
        """Why `site` stays float, or None when the pass quantizes it."""
        if site_skipped(site, self.skip):
            return "skipped by the scheme"
        if self.only_vars is not None and site.var.name not in self.only_vars:
            return "not selected for dynamic quantization"
        if site.kind != "matmul":
            return "dynamic int8 handles matmul only"
        if not _fits_int32(site.weight.shape[0]):
            return f"K={site.weight.shape[0]} overflows the int32 accumulator"
        return None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        rewriter = None  # one for the module: the kernels it adds get unique names
        for gv, func in relax_functions(mod):
            plans, names = {}, []
            for site in stable_sites(func, site_prefix(gv), _is_dynamic_matmul):
                if self.plan(site) is None:
                    plans[site.call] = weight_qparams_int8(site.weight, self.weight_per_channel)
                    names.append(site.name)
            if not plans:
                continue
            rewriter = rewriter or _Rewriter(mod, {}, self.activation_per_row)
            rewriter.plans = plans
            new = relax.analysis.remove_all_unused(rewriter.visit_expr(func))
            old = [str(n) for n in func.attrs[ATTR]] if func.attrs and ATTR in func.attrs else []
            new = new.with_attr(ATTR, [*old, *names])
            new = with_float_ops(new)
            updates[gv] = new
        if not updates:
            return mod
        new_mod = mod.clone()
        for gv, func in rewriter.builder_.get().functions_items():
            if isinstance(func, tvm.tirx.PrimFunc) and gv not in mod:
                new_mod[gv] = func  # the activation quantize kernels
        for gv, func in updates.items():
            new_mod[gv] = func
        return new_mod
