"""PackImageNHWC: an NCHW image of a few channels to padded NHWC in one vectorized kernel.

Rewrites, on LLVM CPU targets with SIMD, after the conv passes made a CNN channels last::

    t = permute_dims(x, [0, 2, 3, 1])      # x: (N, C, H, W), C <= 4 (an image), static
    p = nn.pad(t, [0, 0, top, bottom, left, right, 0, 0], "constant", v)   # optional

or the pad first (``nn.pad(x, [0, 0, 0, 0, top, bottom, left, right])`` then the
``permute_dims``; an int8 model's quantized input) into::

    p = call_tir(image_nhwc, x)           # (N, top + H + bottom, left + W + right, C)

(:func:`tvmq.kernels.cpu_image.image_nhwc`). TVM's lowering of the pair walks the NHWC
output three values a pixel; the kernel moves 16 pixels of every channel a step. A pad
or transpose that something else also reads is left alone (the pair would then run twice),
as are images of more than four channels and non-constant pads.

MobileNetV3-small on one thread of an Intel Xeon (AVX-512, AMX), 224x224 RGB, in the
model: fp32's ``transpose + pad`` 97 -> 61 us, int8's ``quantize + pad + transpose`` 47 -> 30
us (the image comes from L3 there; alone in cache the kernel takes 25 / 10 us).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.kernels.cpu_float_conv import simd_lanes_and_registers
from tvmq.kernels.cpu_image import MAX_CHANNELS, ImageQuantize, image_nhwc

from .channels_last import TO_NHWC, permute_axes
from .relax_utils import (
    PAD,
    QUANTIZE,
    dataflow_bindings,
    emit_binding,
    op_name,
    relax_functions,
    scalar_value,
    spatial_pad,
    static_shape,
)

MULTIPLY = "relax.multiply"
_DTYPES = frozenset({"float32", "float16", "bfloat16", "uint8", "int8", "uint16"})


def _image(x: relax.Expr) -> tuple[int, int, int, int] | None:
    shape = static_shape(x)
    if shape is None or len(shape) != 4 or not 1 <= shape[1] <= MAX_CHANNELS or 0 in shape:
        return None
    return shape if str(x.ty.dtype) in _DTYPES else None


def find_images(mod: tvm.IRModule) -> dict[relax.Var, tuple]:
    """``{var: (x, padding, fill)}``: each var bound to the NHWC (padded) form of an NCHW
    image ``x`` that :class:`PackImageNHWC` computes in one kernel (module docstring)."""
    values, plan = {}, {}
    for binding, _ in dataflow_bindings(mod):
        values[binding.var] = binding.value
    for binding, only_user in dataflow_bindings(mod):
        call = binding.value
        if permute_axes(call) != TO_NHWC:
            continue
        x, padding, fill = call.args[0], (0, 0, 0, 0), 0.0
        source = values.get(x)
        if op_name(source) == PAD and only_user(x) is not None:
            found = spatial_pad(source, nchw=True)
            if found is not None:
                x, (padding, fill) = source.args[0], found
        if _image(x) is None:
            continue
        var, after = binding.var, only_user(binding.var)
        if after is not None and op_name(after[1]) == PAD and not any(padding):
            found = spatial_pad(after[1], nchw=False)
            if found is not None:
                var, (padding, fill) = after[0], found
        quantize = _quantize(x, values, only_user)
        if quantize is not None:
            x, quantize = quantize
        plan[var] = (x, padding, fill, quantize)
    return plan


def _quantize(x: relax.Expr, values: dict, only_user) -> tuple[relax.Expr, ImageQuantize] | None:
    """``(image, quantize)`` of an int8 model's quantized input, ``x = quantize(multiply(image,
    m), 1, z)`` with scalar constants (``QuantizeByMultiply``'s form), each var read once: the
    kernel quantizes the float32 image as it moves it."""
    q = values.get(x)
    if op_name(q) != QUANTIZE or only_user(x) is None or only_user(q.args[0]) is None:
        return None
    m = values.get(q.args[0])
    if op_name(m) != MULTIPLY or str(m.args[0].ty.dtype) != "float32":
        return None
    scale, zero, multiplier = (scalar_value(v) for v in (q.args[1], q.args[2], m.args[1]))
    if scale != 1 or zero is None or multiplier is None or _image(m.args[0]) is None:
        return None
    return m.args[0], ImageQuantize(float(multiplier), int(zero), str(q.attrs.out_dtype))


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan: dict):
        super().__init__(mod)
        self.plan = plan
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        found = self.plan.get(binding.var)
        if found is None:
            super().visit_var_binding_(binding)
            return
        x, padding, fill, quantize = found
        shape, dtype = _image(x), str(x.ty.dtype)
        key = (shape, dtype, padding, fill, quantize)
        if key not in self.kernels:
            n, c, h, w = shape
            name = f"tvmq_image_nhwc_{c}x{h}x{w}" + ("_quantize" if quantize else "")
            kernel = image_nhwc(shape, dtype, padding, fill, quantize)
            self.kernels[key] = self.builder_.add_func(kernel, name)
        out = relax.TensorType(binding.var.ty.shape, quantize.dtype if quantize else dtype)
        call = relax.call_tir(self.kernels[key], [self.visit_expr(x)], out_ty=out)
        self.set_var_remap(binding.var, emit_binding(self.builder_, binding.var, call))


@tvm.transform.module_pass(opt_level=0, name="PackImageNHWC")
class PackImageNHWC:
    """Compute an NCHW image's padded NHWC form in one vectorized kernel (module docstring).

    Parameters
    ----------
    target : tvm.target.Target or dict or str, optional
        The build target (default: the current one); the pass is a no-op off LLVM CPU
        targets with SIMD.
    """

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if simd_lanes_and_registers(self.target) is None:
            return mod
        plan = find_images(mod)
        if not plan:
            return mod
        rewriter = _Rewriter(mod, plan)
        for gv, func in relax_functions(mod):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
