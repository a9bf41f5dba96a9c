"""The dequantize ``QuantizeDynamic`` emits after a dynamically quantized dense layer, found so
that the layer's kernel computes it before its store (x86: :class:`PackInt8DenseX86`).

After ``acc = matmul(x_q, W_q, out_dtype="int32")``, with ``params = row_qparams_u8(x)``
(each row's scale and zero point, ``(..., M, 2)`` float32), ``QuantizeDynamic`` emits::

    s_x = strided_slice(params, [last], [0], [1]);  z_x = astype(strided_slice(.., [1], [2]), int32)
    acc = subtract(acc, multiply(z_x, colsum))      # colsum: (N,) int32 constant
    y = multiply(astype(acc, float32), multiply(s_x, s_w))      # s_w: (N,) or scalar constant

and the model usually adds its bias (a float32 constant along the last axis) and a ReLU or a
GELU (:func:`~tvmq.passes.requantize_epilogue.activation_tail`).
When each op on the chain is the only reader of the one before, :func:`find_dynamic_epilogues`
returns them as a :class:`DynamicEpilogue`: the kernel reads ``params`` itself and stores the
bit-identical float32 result (:class:`tvmq.kernels.x86_int8.DynamicDequantize`); the int32
sums never go to memory and the two slices of ``params`` lose a reader.

When the layer's uint8 input is ``QuantizeDynamic``'s quantize of a float32 ``x`` with the
same ``params = row_qparams_u8(x)``::

    x_q = astype(clip(add(round(divide(x, s_x)), z_f), 0, 255), uint8)  # z_f: params[.., 1:2]

the epilogue's ``source`` is ``x``: a kernel that quantizes its own rows
(:class:`tvmq.kernels.x86_int8.RowQuantize`) can read ``x`` instead, and ``row_qparams_u8``
and the quantize ops lose a reader (all of them, once every layer reading ``x_q`` does).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from tvmq.core import qmath
from tvmq.kernels.dynamic_quant import QMAX as _QMAX
from tvmq.kernels.dynamic_quant import row_qparams_u8
from tvmq.kernels.x86_int8 import DynamicDequantize, RowQuantize

from .relax_utils import ADD, RELU, binding_map, dataflow_bindings, op_name, relax_functions
from .requantize_epilogue import ChannelAxis, activation_tail, chain_step


class DynamicEpilogue(NamedTuple):
    """What a dynamically quantized dense layer's kernel computes after its sum: the ops
    ``chain`` (their vars become the kernel's result)."""

    chain: tuple[relax.Var, ...]
    params: relax.Expr  # (..., M, 2) float32: each row's scale and zero point
    colsum: np.ndarray  # (N,) int32
    scale: np.ndarray  # (N,) float32, the weight's scale per column
    bias: np.ndarray | None  # (N,) float32
    requantize: DynamicDequantize
    source: relax.Expr | None = None  # the float32 x that the layer's x_q quantizes

    def quantized_in_kernel(self, k: int) -> DynamicEpilogue:
        """This epilogue for a kernel that reads ``source`` (``k`` columns) and quantizes its
        rows itself: no ``params`` argument."""
        rows = RowQuantize(k, qmath.SCALE_EPS)
        return self._replace(requantize=dataclasses.replace(self.requantize, quantize=rows))

    @property
    def offset(self) -> np.ndarray:
        """No constant to add to the sums (the zero point's is per row)."""
        return np.zeros(len(self.colsum), np.int32)

    def arguments(self, n_padded: int) -> list:
        """The kernel's arguments after its offset: constants padded to ``n_padded``, then
        ``params`` (the caller makes it 2-D)."""
        pad = (0, n_padded - len(self.colsum))
        columns = [self.colsum, self.scale] + ([self.bias] if self.bias is not None else [])
        params = [self.params] if self.requantize.quantize is None else []
        return [relax.const(np.pad(c, pad)) for c in columns] + params


def find_dynamic_epilogues(mod: tvm.IRModule, match_dense) -> dict[relax.Var, DynamicEpilogue]:
    """The dense layers (``match_dense(call)`` -> ``(x, x shape, W)``, else None) whose int32
    result only feeds ``QuantizeDynamic``'s dequantize (see the module docstring)."""
    values: dict[relax.Var, relax.Expr] = {}
    for _, func in relax_functions(mod):
        values.update(binding_map(func))
    found = {}
    for b, only_user in dataflow_bindings(mod):
        dense = match_dense(b.value)
        if dense is None:
            continue
        epilogue = _chain(b.var, dense[2].shape[1], only_user, values)
        if epilogue is not None:
            source = _quantized_source(dense[0], epilogue.params, values, mod)
            found[b.var] = epilogue._replace(source=source)
    return found


def quantized_rows(x_q: relax.Expr, values, mod) -> tuple[relax.Expr, relax.Expr] | None:
    """``(x, params)`` when ``x_q`` is QuantizeDynamic's quantize of ``x`` with ``params =
    row_qparams_u8(x)`` (see the module docstring), else None."""
    cast = values.get(x_q)
    clip = values.get(cast.args[0]) if op_name(cast) == "relax.astype" else None
    add = values.get(clip.args[0]) if op_name(clip) == "relax.clip" else None
    if op_name(add) != "relax.add":
        return None
    params = _column_of(add.args[1], 1, values)
    x = _quantized_source(x_q, params, values, mod) if params is not None else None
    return None if x is None else (x, params)


def _quantized_source(x_q: relax.Expr, params: relax.Expr, values, mod) -> relax.Expr | None:
    """``x`` when ``x_q`` is QuantizeDynamic's quantize of ``x`` with ``params``, which is
    ``row_qparams_u8(x)`` (see the module docstring), else None."""
    cast = values.get(x_q)
    if op_name(cast) != "relax.astype" or str(cast.attrs.dtype) != "uint8":
        return None
    clip = values.get(cast.args[0])
    if op_name(clip) != "relax.clip" or [_prim(a) for a in clip.args[1:]] != [0, _QMAX]:
        return None
    add = values.get(clip.args[0])
    if op_name(add) != "relax.add" or not params.same_as(_column_of(add.args[1], 1, values)):
        return None
    rounded = values.get(add.args[0])
    divide = values.get(rounded.args[0]) if op_name(rounded) == "relax.round" else None
    if op_name(divide) != "relax.divide":
        return None
    x, s_x = divide.args
    if not params.same_as(_column_of(s_x, 0, values)) or not _row_qparams_of(
        params, x, values, mod
    ):
        return None
    return x


def _row_qparams_of(params: relax.Expr, x: relax.Expr, values, mod) -> bool:
    """Whether ``params`` is ``call_tir(row_qparams_u8 kernel, [x])`` with QuantizeDynamic's eps."""
    call = values.get(params)
    if op_name(call) != "relax.call_tir" or not isinstance(call.args[0], tvm.ir.GlobalVar):
        return False
    args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
    if len(args) != 1 or not args[0].same_as(x) or call.args[0] not in mod:
        return False
    shape = x.ty.shape if isinstance(x.ty, relax.TensorType) else None
    if not isinstance(shape, relax.ShapeExpr) or str(x.ty.dtype) != "float32":
        return False
    want = row_qparams_u8(list(shape.values), qmath.SCALE_EPS)
    return bool(tvm_ffi.structural_equal(mod[call.args[0]], want))


def _prim(value) -> float | None:
    """The number of a constant op argument (an ``IntImm`` / ``FloatImm``), else None."""
    for _ in range(2):  # a PrimValue wraps the immediate where there is one
        value = getattr(value, "value", None)
        if isinstance(value, int | float):
            return value
    return None


def _chain(acc: relax.Var, n: int, only_user, values) -> DynamicEpilogue | None:
    chain = [acc]
    step = chain_step(chain, only_user)

    ndim = len(acc.ty.shape.values)
    columns = ChannelAxis(ndim - 1, ndim, n)
    sub = step("relax.subtract")
    zc = values.get(sub.args[1]) if sub is not None else None
    if op_name(zc) != "relax.multiply":
        return None
    z_x, colsum = zc.args
    z_cast = values.get(z_x)
    colsum = columns.constant(colsum)
    if op_name(z_cast) != "relax.astype" or str(z_cast.attrs.dtype) != "int32":
        return None
    params = _column_of(z_cast.args[0], 1, values)
    cast = step("relax.astype")
    if colsum is None or params is None or cast is None or str(cast.attrs.dtype) != "float32":
        return None
    mul = step("relax.multiply")
    scale = values.get(mul.args[1]) if mul is not None else None
    if op_name(scale) != "relax.multiply":
        return None
    s_w = columns.constant(scale.args[1])
    if s_w is None or not params.same_as(_column_of(scale.args[0], 0, values)):
        return None
    bias = _bias_add(chain, columns, only_user)
    relu = step(RELU) is not None
    activation = "" if relu else activation_tail(chain, columns, only_user)
    if str(colsum.dtype) != "int32" or str(s_w.dtype) != "float32":
        return None
    kernel = DynamicDequantize(bias=bias is not None, relu=relu, activation=activation)
    return DynamicEpilogue(tuple(chain[1:]), params, colsum, s_w, bias, kernel)


def _bias_add(chain: list, columns: ChannelAxis, only_user) -> np.ndarray | None:
    """The float32 bias (a constant along the columns) that an ``add`` reading
    ``chain[-1]`` adds, on either side (``torch.export`` writes ``add(bias, y)``); its var is
    appended to ``chain``. Else None."""
    nxt = only_user(chain[-1])
    if nxt is None or op_name(nxt[1]) != ADD or len(nxt[1].args) != 2:
        return None
    a, b = nxt[1].args
    other = b if a.same_as(chain[-1]) else a if b.same_as(chain[-1]) else None
    bias = columns.constant(other)
    if bias is None or str(bias.dtype) != "float32":
        return None
    chain.append(nxt[0])
    return bias


def _column_of(var: relax.Expr, column: int, values) -> relax.Expr | None:
    """``params`` when ``var`` is ``strided_slice(params, [last], [column], [column + 1])``
    of a ``(..., 2)`` float32 tensor, else None."""
    call = values.get(var)
    if op_name(call) != "relax.strided_slice" or len(call.args) != 4:
        return None
    params = call.args[0]
    ty = params.ty
    if not isinstance(ty, relax.TensorType) or str(ty.dtype) != "float32" or ty.shape is None:
        return None
    dims = ty.shape.values
    axes, begin, end = (_ints(a) for a in call.args[1:])
    if not isinstance(dims[-1], tvm.tirx.IntImm) or int(dims[-1]) != 2:
        return None
    if axes not in ([len(dims) - 1], [-1]) or begin != [column] or end != [column + 1]:
        return None
    return params


def _ints(t) -> list[int] | None:
    fields = getattr(t, "fields", None)
    if fields is None:
        return None
    values = [getattr(f, "value", f) for f in fields]
    return [int(v) for v in values] if all(isinstance(v, int) for v in values) else None
