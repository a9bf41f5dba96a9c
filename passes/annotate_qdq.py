"""AnnotateQDQ: wrap the inputs of quantizable ops in ``quantize`` / ``dequantize`` pairs.

Static int8, step 1 of 3 (then :class:`FoldQuantScales`, then :class:`LowerInt8`), on a
float Relax module before ``LegalizeOps``. For every quantizable site (see
``tvmq.passes.sites.list_weight_sites``: a float32 ``matmul(x, W)`` with a constant 2-D ``W`` or
an NCHW/OIHW ``conv2d(x, W)`` with a constant ``W``) that has calibrated activation
parameters and is not skipped, it rewrites::

    y = op(x, W)
    ==>
    y = op(dequantize(quantize(x, s_x, z_x)), dequantize(quantize(W', s_w, 0, axis=c)))

``s_x, z_x`` are the calibrated per-tensor parameters of the site, looked up by its name
(``matmul_0``, ``conv2d_1``, ...). ``W'`` is the constant weight (a ``permute_dims`` of a
constant is evaluated at compile time) and ``s_w`` its scale, per output channel ``c`` and
symmetric by default. The result is still a float model (QDQ form, as in ONNX), runnable
as is; the weight ``quantize`` is folded by :class:`FoldQuantScales` and integer compute
appears only in :class:`LowerInt8`.

Tensor sites (``tvmq.passes.tensor_sites.list_tensor_sites``): a residual ``add`` of two float32
activations and a ``concat`` get their inputs wrapped the same way and their output
(after an ``add``'s following ``relu`` / ``clip``) quantized and dequantized in place,
so :class:`LowerInt8` can run them on integers::

    y = relu(add(a, b))
    ==>
    y = dequantize(quantize(relu(add(dq(q(a, s_a, z_a)), dq(q(b, s_b, z_b)))), s_y, z_y))

with ``s_a, z_a`` from ``activation_qparams["add_0:0"]``, ``s_b, z_b`` from ``"add_0:1"``
and ``s_y, z_y`` from ``"add_0"``; a concat's inputs and output all take ``"concat_0"``.
A tensor quantized twice with the same parameters (a block's output read by the next
conv and by the residual add) is quantized once.

Activation matmuls (``matmul_act`` sites: attention's ``Q @ K^T`` and ``P @ V``, both
operands non-constant) get both operands wrapped, per tensor, with the parameters of
``"matmul_act_0:0"`` / ``"matmul_act_0:1"``; their result is left as is::

    y = matmul(a, b)  ==>  y = matmul(dq(q(a, s_a, z_a)), dq(q(b, s_b, z_b)))

``skip=("matmul_act",)`` (or a site name such as ``"matmul_act_1"``) keeps them float.

Limits: per-tensor activations only; sites whose name has no entry in
``activation_qparams`` stay float. An annotated op is no longer a site, so running the
pass twice is the same as once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.core import qmath
from tvmq.errors import TvmqError

from .relax_utils import const_f32, const_i32, relax_functions, site_prefix
from .sites import WeightSite, list_weight_sites, site_skipped
from .tensor_sites import TensorSite, list_tensor_sites


def _per_name(value, name: str, default):
    """``value`` itself, or its entry for ``name`` when it is a per-name mapping."""
    return value.get(name, default) if isinstance(value, Mapping) else value


def weight_qparams(
    site: WeightSite, per_channel: bool = True
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(scale, zero_point, axis) of a site's weight: symmetric int8, per output channel
    (``per_channel``) or per tensor.

    ``axis`` is None for per-tensor parameters.
    """
    symmetric = True  # integer kernels need no weight zero-point terms
    w = site.weight.astype(np.float64)
    if per_channel:
        other = tuple(i for i in range(w.ndim) if i != site.weight_axis)
        lo, hi = w.min(axis=other), w.max(axis=other)
        scale, zp = qmath.choose_qparams(lo, hi, "int8", symmetric, axis=site.weight_axis)
        axis = site.weight_axis
    else:
        lo, hi = w.min(), w.max()
        scale, zp = qmath.choose_qparams(lo, hi, "int8", symmetric)
        axis = None
    # An all-zero (pruned) channel quantizes to 0 with any scale; 1.0 instead of the
    # epsilon floor keeps bias / (s_x * s_w) on the int32 accumulator grid.
    scale = np.where((lo == 0) & (hi == 0), np.float32(1.0), scale).astype(np.float32)
    return (scale if axis is not None else scale[()]), zp, axis


@mutator
class _Annotator(PyExprMutator):
    """Rewrites the calls of the chosen sites; everything else is copied.

    ``plans``: weight-site call -> plan; ``tensor_plans``: tensor-site call -> per-input
    (scale, zp, dtype); ``outputs``: var -> (scale, zp, dtype) quantized after its binding.
    """

    def __init__(self, mod: tvm.IRModule, plans: dict, tensor_plans: dict, outputs: dict):
        super().__init__(mod)
        self.plans = plans
        self.tensor_plans = tensor_plans
        self.outputs = outputs
        self.cache: dict[tuple, relax.Var] = {}  # (var, scale, zp, dtype) -> its QDQ copy

    # A cached QDQ var is only visible inside its block.
    def visit_dataflow_block_(self, block):
        self.cache = {}
        return super().visit_dataflow_block_(block)

    def visit_binding_block_(self, block):
        self.cache = {}
        return super().visit_binding_block_(block)

    def _qdq(self, expr: relax.Expr, qparams, dtype: str) -> relax.Expr:
        """``dequantize(quantize(expr))``, emitted once per (tensor, parameters)."""
        s_x, z_x = qparams
        key = (expr, float(s_x), int(z_x), dtype) if isinstance(expr, relax.Var) else None
        if key is not None and key in self.cache:
            return self.cache[key]
        x = self.visit_expr(expr)
        sx, zx = const_f32(s_x), const_i32(z_x)
        xq = self.builder_.emit(relax.op.quantize(x, sx, zx, axis=-1, out_dtype=dtype))
        xdq = self.builder_.emit(relax.op.dequantize(xq, sx, zx, axis=-1, out_dtype="float32"))
        if key is not None:
            self.cache[key] = xdq
        return xdq

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        out = self.outputs.get(binding.var)
        if out is None:
            super().visit_var_binding_(binding)
            return
        (s_y, z_y), dtype = out
        bb = self.builder_
        y = bb.emit(self.visit_expr(binding.value), name_hint=binding.var.name)
        sy, zy = const_f32(s_y), const_i32(z_y)
        yq = bb.emit(relax.op.quantize(y, sy, zy, axis=-1, out_dtype=dtype))
        ydq = relax.op.dequantize(yq, sy, zy, axis=-1, out_dtype="float32")
        # An output var of a dataflow block stays one (R.output).
        dataflow_out = bb.current_block_is_dataflow() and not isinstance(
            binding.var, relax.DataflowVar
        )
        ydq = bb.emit_output(ydq) if dataflow_out else bb.emit(ydq)
        self.set_var_remap(binding.var, ydq)
        self.cache[(binding.var, float(s_y), int(z_y), dtype)] = ydq

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        tplan = self.tensor_plans.get(call)
        if tplan is not None:
            site, params = tplan
            args = [
                self._qdq(x, qp, dtype) for x, (qp, dtype) in zip(site.inputs, params, strict=True)
            ]
            if site.kind == "concat":
                args = [relax.Tuple(args)]
            return relax.Call(call.op, args, call.attrs, call.ty_args, call.span)
        plan = self.plans.get(call)
        if plan is None:
            return super().visit_call_(call)
        site, (s_x, z_x), act_dtype, (s_w, z_w, w_axis) = plan
        xdq = self._qdq(site.activation, (s_x, z_x), act_dtype)
        axis = -1 if w_axis is None else w_axis
        z_w = np.asarray(z_w)
        # Symmetric weights have zero point 0 everywhere: keep it a scalar.
        sw, zw = const_f32(s_w), const_i32(z_w.flat[0] if np.all(z_w == z_w.flat[0]) else z_w)
        w = relax.const(site.weight.astype("float32"), "float32")
        wq = self.builder_.emit(relax.op.quantize(w, sw, zw, axis=axis, out_dtype="int8"))
        wdq = self.builder_.emit(relax.op.dequantize(wq, sw, zw, axis=axis, out_dtype="float32"))
        return relax.Call(call.op, [xdq, wdq], call.attrs, call.ty_args, call.span)


def _check_qparams(name: str, value) -> tuple[float, int]:
    try:
        scale, zp = value
        scale, zp = float(scale), int(zp)
    except (TypeError, ValueError):
        raise TvmqError(
            f"activation_qparams[{name!r}] must be a (scale, zero_point) pair, got {value!r}"
        ) from None
    if not np.isfinite(scale) or scale <= 0:
        raise TvmqError(f"activation_qparams[{name!r}] has scale {scale}; it must be > 0")
    return scale, zp


@tvm.transform.module_pass(opt_level=0, name="AnnotateQDQ")
class AnnotateQDQ:
    """Insert QDQ pairs around the activation and constant weight of each quantizable op.

    Parameters
    ----------
    activation_qparams : Mapping[str, tuple[float, int]]
        Site name -> calibrated per-tensor ``(scale, zero_point)`` of its activation input,
        for ``scheme.activation_dtype``.
    activation_dtype : str or Mapping[str, str]
        "int8" or "uint8" for every tensor, or per tensor name (the keys of
        ``activation_qparams``; names not in the mapping are "int8").
    weight_per_channel : bool or Mapping[str, bool]
        Weight scales per output channel (else per tensor), for every site or per site name
        (names not in the mapping are per channel). Weights are always symmetric.
    skip : sequence of str
        Sites to leave float: fnmatch patterns of site names, or op names such as
        "conv2d" / "relax.matmul" / "dense" (``tvmq.core.selectors``).
    """

    def __init__(
        self,
        activation_qparams: Mapping[str, tuple[float, int]],
        *,
        activation_dtype: str | Mapping[str, str] = "int8",
        weight_per_channel: bool | Mapping[str, bool] = True,
        skip: Sequence[str] = (),
    ):
        self.activation_qparams = {
            str(k): _check_qparams(str(k), v) for k, v in dict(activation_qparams).items()
        }
        self.activation_dtype = activation_dtype
        self.weight_per_channel = weight_per_channel
        self.skip = (skip,) if isinstance(skip, str) else tuple(skip)

    def _dtype(self, name: str, qp: tuple[float, int]) -> str:
        """The activation dtype of tensor `name`, checked against its zero point."""
        dtype = _per_name(self.activation_dtype, name, "int8")
        if dtype not in ("int8", "uint8"):
            raise TvmqError(f"activation_dtype must be 'int8' or 'uint8', got {dtype!r}")
        lo, hi = qmath.qrange(dtype)
        if not lo <= qp[1] <= hi:
            raise TvmqError(
                f"{name}: zero point {qp[1]} is outside the {dtype} range "
                f"[{lo}, {hi}]; were the parameters chosen for another dtype?"
            )
        return dtype

    def _per_channel(self, name: str) -> bool:
        return bool(_per_name(self.weight_per_channel, name, True))

    def _tensor_plan(self, site: TensorSite, skip) -> tuple[list, tuple | None] | None:
        """(per-input (qparams, dtype), output (qparams, dtype) or None), or None: stay float.

        A ``matmul_act`` has no output parameters: its result is requantized by whatever
        quantizes it next, or dequantized.
        """
        if site_skipped(site, skip):
            return None
        names = [*site.input_names] + ([site.name] if site.output is not None else [])
        if any(n not in self.activation_qparams for n in names):
            return None
        params = [
            (self.activation_qparams[n], self._dtype(n, self.activation_qparams[n])) for n in names
        ]
        if site.output is None:
            return params, None
        return params[:-1], params[-1]

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        skip = self.skip
        updates = {}
        for gv, func in relax_functions(mod):
            plans = {}
            for site in list_weight_sites(func, site_prefix(gv)):
                qp = self.activation_qparams.get(site.name)
                if qp is None or site_skipped(site, skip):
                    continue
                dtype = self._dtype(site.name, qp)
                plans[site.call] = (
                    site,
                    qp,
                    dtype,
                    weight_qparams(site, self._per_channel(site.name)),
                )
            tensor_plans, outputs = {}, {}
            for site in list_tensor_sites(func, site_prefix(gv)):
                found = self._tensor_plan(site, skip)
                if found is not None:
                    tensor_plans[site.call] = (site, found[0])
                    if found[1] is not None:
                        outputs[site.output] = found[1]
            if not plans and not tensor_plans:
                continue
            new_func = _Annotator(mod, plans, tensor_plans, outputs).visit_expr(func)
            updates[gv] = relax.analysis.remove_all_unused(new_func)
        if not updates:
            return mod
        mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(mod.functions, mod.attrs)
        for gv, func in updates.items():
            mod[gv] = func
        return mod
