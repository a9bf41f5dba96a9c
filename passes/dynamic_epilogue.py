"""The dequantize ``QuantizeDynamic`` emits after a dynamically quantized dense layer, found so
that the layer's kernel computes it before its store (x86: :class:`PackInt8DenseX86`).

After ``acc = matmul(x_q, W_q, out_dtype="int32")``, with ``params = row_qparams_u8(x)``
(each row's scale and zero point, ``(..., M, 2)`` float32), ``QuantizeDynamic`` emits::

    s_x = strided_slice(params, [last], [0], [1]);  z_x = astype(strided_slice(.., [1], [2]), int32)
    acc = subtract(acc, multiply(z_x, colsum))      # colsum: (N,) int32 constant
    y = multiply(astype(acc, float32), multiply(s_x, s_w))      # s_w: (N,) or scalar constant

and the model usually adds its bias (a float32 constant along the last axis) and a ReLU.
When each op on the chain is the only reader of the one before, :func:`find_dynamic_epilogues`
returns them as a :class:`DynamicEpilogue`: the kernel reads ``params`` itself and stores the
bit-identical float32 result (:class:`tvmq.kernels.x86_int8.DynamicDequantize`); the int32
sums never go to memory and the two slices of ``params`` lose a reader.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax

from tvmq.kernels.x86_int8 import DynamicDequantize

from .relax_utils import ADD, RELU, binding_map, dataflow_bindings, op_name, relax_functions
from .requantize_epilogue import ChannelAxis, chain_step


class DynamicEpilogue(NamedTuple):
    """What a dynamically quantized dense layer's kernel computes after its sum: the ops
    ``chain`` (their vars become the kernel's result)."""

    chain: tuple[relax.Var, ...]
    params: relax.Expr  # (..., M, 2) float32: each row's scale and zero point
    colsum: np.ndarray  # (N,) int32
    scale: np.ndarray  # (N,) float32, the weight's scale per column
    bias: np.ndarray | None  # (N,) float32
    requantize: DynamicDequantize

    @property
    def offset(self) -> np.ndarray:
        """No constant to add to the sums (the zero point's is per row)."""
        return np.zeros(len(self.colsum), np.int32)

    def arguments(self, n_padded: int) -> list:
        """The kernel's arguments after its offset: constants padded to ``n_padded``, then
        ``params`` (the caller makes it 2-D)."""
        pad = (0, n_padded - len(self.colsum))
        columns = [self.colsum, self.scale] + ([self.bias] if self.bias is not None else [])
        return [relax.const(np.pad(c, pad)) for c in columns] + [self.params]


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
            found[b.var] = epilogue
    return found


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
    bias = None
    nxt = only_user(chain[-1])
    if nxt is not None and op_name(nxt[1]) == ADD and len(nxt[1].args) == 2:
        bias = columns.constant(nxt[1].args[1])
        if bias is not None and (str(bias.dtype) != "float32" or step(ADD) is None):
            bias = None
    relu = step(RELU) is not None
    if str(colsum.dtype) != "int32" or str(s_w.dtype) != "float32":
        return None
    kernel = DynamicDequantize(bias=bias is not None, relu=relu)
    return DynamicEpilogue(tuple(chain[1:]), params, colsum, s_w, bias, kernel)


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
