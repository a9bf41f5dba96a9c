"""The float requantize ``LowerInt8`` emits after an int8 conv / dense layer, found so that the
layer's kernel computes it before its store (x86: :class:`PackInt8ConvX86`, :class:`PackInt8DenseX86`).

After the int32 accumulator ``acc`` of a layer, ``LowerInt8`` emits (``requantize="float"``)::

    [add(acc, offset)] -> [relu] -> astype(float32) -> multiply(., m) -> quantize(., 1.0, z)
    -> [clip(lo, hi)]

or, for a float result, ``[add(acc, offset)] -> [relu] -> dequantize(., s, 0, axis)`` [->
an activation, GELU, SiLU or hardswish, maybe between reshapes: :func:`activation_tail`],
where
``offset`` (int32), ``m`` and ``s`` (float32) are constants per output channel (broadcast along
one axis: NCHW axis 1 for a conv, the last axis for a dense layer). When each op is the only
reader of the one before, :func:`requantize_chain` returns them as a :class:`RequantizeEpilogue`
(a :class:`tvmq.kernels.x86_int8.Requantize` plus the constants): a kernel computing the same
float32 operations in the same order stores the bit-identical int8 / uint8 (or float32)
result, and the int32 sums never go to memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import NamedTuple

import numpy as np
from tvm import relax

from tvmq.kernels.x86_int8 import Requantize, ResidualAdd

from .quantize_by_multiply import reciprocal_scale
from .relax_utils import (
    ADD,
    CLIP,
    DEQUANTIZE,
    GELU,
    QUANTIZE,
    RELU,
    clip_bounds,
    is_tensor_const,
    op_name,
    scalar_value,
    static_shape,
)


class RequantizeEpilogue(NamedTuple):
    """What a layer's kernel computes after its sum: the ops ``chain`` (their vars become the
    kernel's result) of ``LowerInt8``'s float requantize."""

    chain: tuple[relax.Var, ...]
    offset: np.ndarray  # (channels,) int32, added first
    multiplier: np.ndarray  # (channels,) float32
    requantize: Requantize
    residual: relax.Var | None = None  # R of a requantize.residual (see with_residual_add)

    def arguments(self, n_padded: int) -> list:
        """The kernel's arguments after its offset: the multiplier, padded to ``n_padded``."""
        pad = (0, n_padded - len(self.multiplier))
        return [relax.const(np.pad(self.multiplier, pad).astype(np.float32), "float32")]

    def without_residual(self) -> RequantizeEpilogue:
        """The epilogue up to the requantized result (where the kernel cannot take ``R``)."""
        if self.residual is None:
            return self
        # chain: ..., q, astype, [subtract], multiply, add, quantize [, clip]
        i = len(self.chain) - 1
        while i >= 0 and _is_integer(self.chain[i]):
            i -= 1
        while i >= 0 and not _is_integer(self.chain[i]):
            i -= 1
        requantize = dataclasses.replace(self.requantize, residual=None)
        return self._replace(chain=self.chain[: i + 1], requantize=requantize, residual=None)


def _is_integer(var: relax.Var) -> bool:
    return str(var.ty.dtype) in ("int8", "uint8")


class ChannelAxis(NamedTuple):
    """Where a layer's output channels are: ``axis`` of an ``ndim``-D result, ``channels`` long."""

    axis: int  # >= 0
    ndim: int
    channels: int

    def constant(self, c) -> np.ndarray | None:
        """A constant broadcast along the channel axis only, as a ``(channels,)`` array."""
        if c is None or not is_tensor_const(c):
            return None
        value = c.value.numpy()
        if value.ndim > self.ndim or value.size not in (1, self.channels):
            return None
        full = value.reshape((1,) * (self.ndim - value.ndim) + value.shape)
        if value.size > 1 and full.shape[self.axis] != self.channels:
            return None
        return np.ascontiguousarray(np.broadcast_to(full.reshape(-1), (self.channels,)))

    def is_axis(self, axis: int) -> bool:
        return axis in (self.axis, self.axis - self.ndim)


def chain_step(chain: list, only_user):
    """``step(name)``: the next op's call when it is ``name`` on ``chain``'s last var, whose
    only reader it is (its var is then appended to ``chain``), else None."""

    def step(name: str):
        nxt = only_user(chain[-1])
        if nxt is None or op_name(nxt[1]) != name or not nxt[1].args[0].same_as(chain[-1]):
            return None
        chain.append(nxt[0])
        return nxt[1]

    return step


def requantize_chain(
    start: Sequence[relax.Var],
    where: ChannelAxis,
    only_user,
    quantize_activation: Collection[str] = (),
) -> RequantizeEpilogue | None:
    """The requantize ops after ``start[-1]`` (see the module docstring), else None.

    ``start`` is the accumulator's var followed by ops on it that the kernel's result already
    includes (a dense layer's reshape back to its leading dims): the returned ``chain`` holds
    them and the requantize ops. ``only_user``: see :func:`relax_utils.dataflow_bindings`.
    An activation (named in ``quantize_activation``) after the dequantize that is quantized again
    by a scalar scale (``quantize(., s, zero)``, computed as ``QuantizeByMultiply`` does,
    ``x * float32(1 / s)``, or already ``multiply(., c)``, ``quantize(., 1, zero)``; [->
    ``clip``]: an EfficientNet block's SiLU before its depthwise conv) joins the chain too
    (:class:`Requantize`'s ``rescale``)."""
    chain = list(start)  # each var the only reader of the one before
    step = chain_step(chain, only_user)

    def channel_const(name: str, dtype: str) -> np.ndarray | None:
        """The per-channel constant operand of a next ``name`` op of ``dtype``."""
        nxt = only_user(chain[-1])
        call = nxt[1] if nxt is not None else None
        if op_name(call) != name or len(call.args) != 2:
            return None
        c = where.constant(call.args[1])
        if c is None or str(c.dtype) != dtype or step(name) is None:
            return None
        return c

    offset = channel_const(ADD, "int32")
    offset = np.zeros(where.channels, np.int32) if offset is None else offset
    relu = step(RELU) is not None
    dequantize = step(DEQUANTIZE)
    if dequantize is not None:
        activation = activation_tail(chain, where, only_user)
        found = _dequantize(tuple(chain[1:]), dequantize, offset, relu, where, activation)
        if found is None or activation not in quantize_activation:
            return found
        rescale, scale = _scalar_multiply(chain, only_user), 1.0
        nxt = only_user(chain[-1])
        if rescale is None and nxt is not None and op_name(nxt[1]) == QUANTIZE:
            # quantize(., s, zero), which QuantizeByMultiply makes x * (1 / s) and scale 1
            scale, rescale = scalar_value(nxt[1].args[1]), reciprocal_scale(nxt[1].args[1])
            rescale = 1.0 if scale == 1.0 else rescale
        stored = _quantize_tail(chain, only_user, scale) if rescale is not None else None
        if stored is None:
            return found
        requantize = Requantize(*stored, relu=relu, activation=activation, rescale=rescale)
        return found._replace(chain=tuple(chain[1:]), requantize=requantize)
    cast = step("relax.astype")
    if cast is None or str(cast.attrs.dtype) != "float32":
        return None
    multiplier = channel_const("relax.multiply", "float32")
    stored = _quantize_tail(chain, only_user) if multiplier is not None else None
    if stored is None:
        return None
    return RequantizeEpilogue(tuple(chain[1:]), offset, multiplier, Requantize(*stored, relu=relu))


def activation_tail(chain: list, where: ChannelAxis, only_user) -> str:
    """The activation (a :data:`~tvmq.kernels.fast_math.ACTIVATIONS` name) that reads
    ``chain[-1]``'s float32 result, maybe between reshapes that keep the channels the last
    axis (a transformer FFN's ``(M, N)`` -> ``(1, M, N)`` and back), else ``""``; its ops
    are appended to ``chain``. Forms: ``gelu(x)`` (erf), ``silu(x)`` or ``x * sigmoid(x)``,
    hardswish as PyTorch decomposes it, ``(x * clip(x + 3, 0, 6)) / 6`` (the clip maybe split
    into a lower and an upper one), or as the ONNX importer writes it, ``x * (clip(x + 3, 0,
    6) / 6)``. Each op is the only reader of the one before, but ``x``, read by the
    activation's first op and its multiply."""
    found = list(chain)
    step = chain_step(found, only_user)

    def reshape():
        nxt = only_user(found[-1])
        if where.axis != where.ndim - 1 or nxt is None or op_name(nxt[1]) != "relax.reshape":
            return
        shape = static_shape(nxt[0])
        if shape is not None and shape[-1] == where.channels:
            step("relax.reshape")

    reshape()
    name = next((n for op, n in _SINGLE_OP if step(op) is not None), "")
    name = name or _gated(found, only_user) or _relu6(found, only_user)
    if not name:
        return ""
    reshape()
    chain[:] = found
    return name


_SINGLE_OP = ((GELU, "gelu"), ("relax.nn.silu", "silu"))


def _relu6(chain: list, only_user) -> str:
    """``"relu6"`` for a ``clip(x, 0, 6)`` of ``chain[-1]`` (appended to ``chain``), else
    ``""``: MobileNetV2's last conv, whose result the float average pool reads."""
    nxt = only_user(chain[-1])
    if nxt is None or op_name(nxt[1]) != CLIP or clip_bounds(nxt[1]) != (0.0, 6.0):
        return ""
    return "relu6" if chain_step(chain, only_user)(CLIP) is not None else ""


def _gated(chain: list, users) -> str:
    """SiLU or hardswish as ``x * g(x)`` on ``x = chain[-1]``: the name, the ops appended to
    ``chain``; else ``""``."""
    x = chain[-1]
    readers = users.readers(x)
    if len(readers) != 2:
        return ""
    for (gate, g), (product, p) in (readers, readers[::-1]):
        if op_name(p) != "relax.multiply" or not _reads(p, x):
            continue
        if op_name(g) == "relax.sigmoid" and _reads(p, gate) and _only_reader(users, gate, product):
            chain += [gate, product]
            return "silu"
        relu6 = _relu6_of_x_plus_3(x, gate, g, users)
        if relu6 is None:
            continue
        t, ops = relu6
        after = users(product)
        if _reads(p, t) and _only_reader(users, t, product) and after and _divides_by_6(after[1]):
            chain += [*ops, product, after[0]]  # (x * t) / 6
            return "hardswish"
        t6 = users(t)
        if t6 and _divides_by_6(t6[1]) and _reads(p, t6[0]) and _only_reader(users, t6[0], product):
            chain += [*ops, t6[0], product]  # x * (t / 6)
            return "hardswish_divide_first"
    return ""


def _only_reader(users, var: relax.Var, reader: relax.Var) -> bool:
    nxt = users(var)
    return nxt is not None and nxt[0].same_as(reader)


def _reads(call: relax.Call, var: relax.Var) -> bool:
    """Whether ``var`` is one of the two operands of the binary op ``call``."""
    return len(call.args) == 2 and any(a.same_as(var) for a in call.args)


def _relu6_of_x_plus_3(x, var, call, users):
    """``(t, vars)`` for ``t = clip(add(x, 3), 0, 6)`` starting at ``var = call``, the clip
    maybe split into ``clip(., 0, inf)`` and ``clip(., -inf, 6)`` (each ``max(min(v, hi),
    lo)``: together ``min(max(v, 0), 6)`` for any non-NaN ``v``), each op the only reader of
    the one before; else None."""
    if op_name(call) != ADD or not call.args[0].same_as(x) or scalar_value(call.args[1]) != 3.0:
        return None
    if str(call.args[1].ty.dtype) != "float32":
        return None
    ops, lo, hi = [var], -_INF, _INF
    while lo != 0.0 or hi != 6.0:
        nxt = users(ops[-1])
        bounds = clip_bounds(nxt[1]) if nxt and op_name(nxt[1]) == CLIP else None
        if bounds is None or bounds[0] not in (0.0, -_INF) or bounds[1] not in (6.0, _INF):
            return None
        ops.append(nxt[0])
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return ops[-1], ops


_INF = float("inf")


def _divides_by_6(call) -> bool:
    return (
        op_name(call) == "relax.divide"
        and scalar_value(call.args[1]) == 6.0
        and str(call.args[1].ty.dtype) == "float32"
    )


def _scalar_multiply(chain: list, only_user) -> float | None:
    """The float32 scalar constant ``c`` of a ``multiply(chain[-1], c)`` that only reads
    ``chain[-1]`` (appended to ``chain``), else None."""
    nxt = only_user(chain[-1])
    call = nxt[1] if nxt is not None else None
    if op_name(call) != "relax.multiply" or len(call.args) != 2:
        return None
    c = call.args[1]
    if not is_tensor_const(c) or str(c.ty.dtype) != "float32" or c.value.numpy().size != 1:
        return None
    if chain_step(chain, only_user)("relax.multiply") is None:
        return None
    return float(c.value.numpy().reshape(()))


def _quantize_tail(chain: list, only_user, scale: float = 1.0) -> tuple[str, int, int, int] | None:
    """``quantize(., scale, zero)`` to int8 / uint8 [-> ``clip``] after ``chain[-1]``
    (appended to ``chain``): ``(dtype, zero, lo, hi)``, else None."""
    step = chain_step(chain, only_user)
    quantize = step(QUANTIZE)
    if quantize is None or str(quantize.attrs.out_dtype) not in ("int8", "uint8"):
        return None
    found, zero = (scalar_value(a) for a in quantize.args[1:])
    if found != scale or not isinstance(zero, int):
        return None
    dtype = str(quantize.attrs.out_dtype)
    info = np.iinfo(dtype)
    lo, hi = int(info.min), int(info.max)
    nxt = only_user(chain[-1])
    bounds = clip_bounds(nxt[1]) if nxt and op_name(nxt[1]) == CLIP else None
    if bounds is not None and step(CLIP) is not None:
        lo, hi = max(lo, int(bounds[0])), min(hi, int(bounds[1]))
    return dtype, zero, lo, hi


def with_residual_add(
    epilogue: RequantizeEpilogue, only_user, values: dict, defined
) -> RequantizeEpilogue:
    """``epilogue`` extended by ``LowerInt8``'s float add of its int8 / uint8 result ``q`` and
    another int8 / uint8 tensor ``r`` of its shape (a residual block's skip connection)::

        add(multiply([subtract](astype(q), z_q), s_q),
            multiply([subtract](astype(r), z_r), s_r)) -> quantize(., 1, z) [-> clip]

    (the terms in either order, scalar constants), each op read only by the next, ``r`` a
    var ``defined(r)`` before the layer: the kernel stores the sum
    (:class:`~tvmq.kernels.x86_int8.ResidualAdd`) and ``residual`` is ``r``. Else
    ``epilogue`` unchanged. ``values``: var -> bound value of the dataflow blocks."""
    rq = epilogue.requantize
    if rq.dtype == "float32" or rq.residual is not None or not epilogue.chain:
        return epilogue
    chain = list(epilogue.chain)
    q = chain[-1]
    found = _add_after(q, only_user)
    terms = [_term_of(t, values, only_user) for t in found[1].args] if found else [None]
    if None in terms or len(terms) != 2:
        return epilogue
    q_term, r_term = terms if terms[0].source.same_as(q) else terms[::-1]
    r = r_term.source
    if not q_term.source.same_as(q) or r.same_as(q) or not defined(r):
        return epilogue
    if static_shape(r) is None or static_shape(r) != static_shape(q):
        return epilogue
    chain += [*q_term.vars, found[0]]
    stored = _quantize_tail(chain, only_user)
    if stored is None:
        return epilogue
    residual = ResidualAdd(
        str(r.ty.dtype), q_term.zero, q_term.scale, r_term.zero, r_term.scale, *stored
    )
    requantize = dataclasses.replace(rq, residual=residual)
    return epilogue._replace(chain=tuple(chain), requantize=requantize, residual=r)


def _add_after(var: relax.Var, only_user):
    """``(var, call)`` of the ``add`` that ``var``'s dequantized term feeds (``astype``,
    [``subtract``], ``multiply``, then the add: each the only reader of the one before), else
    None; :func:`_term_of` checks the ops between."""
    for _ in range(4):
        nxt = only_user(var)
        if nxt is None or op_name(nxt[1]) == ADD:
            return nxt
        var = nxt[0]
    return None


class _Term(NamedTuple):
    """``multiply([subtract](astype(source, float32), zero), scale)``: one operand of
    ``LowerInt8``'s float add, its vars in order (astype, [subtract], multiply)."""

    source: relax.Var
    zero: int
    scale: float
    vars: tuple[relax.Var, ...]


def _term_of(term: relax.Expr, values: dict, only_user) -> _Term | None:
    """``term`` as a :class:`_Term` of an int8 / uint8 var, each of its vars read only by the
    next op, else None."""
    found, names = [], []
    expr = term
    for name in ("relax.multiply", "relax.subtract", "relax.astype"):
        call = values.get(expr) if isinstance(expr, relax.Var) else None
        if op_name(call) != name:
            if name == "relax.subtract":
                found.append(None)
                continue
            return None
        if only_user(expr) is None:
            return None
        found.append(call)
        names.append(expr)
        expr = call.args[0]
    multiply, subtract, cast = found
    scale = scalar_value(multiply.args[1])
    zero = 0 if subtract is None else _integral(scalar_value(subtract.args[1]))
    r = cast.args[0]
    if str(cast.attrs.dtype) != "float32" or not isinstance(scale, float) or zero is None:
        return None
    if not isinstance(r, relax.Var) or str(r.ty.dtype) not in ("int8", "uint8"):
        return None
    return _Term(r, zero, scale, tuple(reversed(names)))


def _integral(value) -> int | None:
    """An integral float (a zero point ``LowerInt8`` subtracts in float32) as an int."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _dequantize(
    chain, call, offset, relu, where: ChannelAxis, activation: str
) -> RequantizeEpilogue | None:
    """The chain through ``call = dequantize(., scale, 0, axis)`` to float32 (then its
    ``activation``)."""
    _, scale, zero = call.args
    if str(call.attrs.out_dtype) != "float32":
        return None
    if not is_tensor_const(scale) or not is_tensor_const(zero) or zero.value.numpy().any():
        return None
    s = scale.value.numpy().reshape(-1)
    if s.size not in (1, where.channels) or (
        s.size > 1 and not where.is_axis(int(call.attrs.axis))
    ):
        return None
    multiplier = np.ascontiguousarray(np.broadcast_to(s, (where.channels,)), dtype=np.float32)
    requantize = Requantize("float32", 0, 0, 0, relu=relu, activation=activation)
    return RequantizeEpilogue(chain, offset, multiplier, requantize)
