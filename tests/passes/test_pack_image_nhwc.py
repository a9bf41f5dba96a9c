"""PackImageNHWC: an NCHW image's (quantized,) padded NHWC form in one vectorized kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.build import build_with_info
from tvmq.kernels.x86_int8 import KERNEL_ATTR
from tvmq.passes import PackImageNHWC
from tvmq.passes.relax_utils import op_name, ordered_bindings

AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})


def _module(shape, *, pad_first=False, quantize=None, second_reader=False):
    """``x -> [multiply, quantize] -> permute_dims to NHWC -> pad`` (or the pad first, on
    NCHW), the padded image returned; ``second_reader`` also returns the unpadded NHWC."""
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            v, fill = x, 0.0
            if quantize is not None:
                m, zero, dtype = quantize
                v = bb.emit(relax.op.multiply(v, relax.const(m, "float32")))
                one, z = relax.const(1.0, "float32"), relax.const(zero, "int32")
                v = bb.emit(relax.op.quantize(v, one, z, axis=1, out_dtype=dtype))
                fill = float(zero)
            if pad_first:
                v = bb.emit(relax.op.nn.pad(v, [0, 0, 0, 0, 1, 2, 3, 0], "constant", fill))
                out = bb.emit_output(relax.op.permute_dims(v, [0, 2, 3, 1]))
            else:
                t = bb.emit(relax.op.permute_dims(v, [0, 2, 3, 1]))
                out = bb.emit_output(relax.op.nn.pad(t, [0, 0, 1, 2, 3, 0, 0, 0], "constant", fill))
                if second_reader:
                    out = bb.emit_output(relax.Tuple([out, bb.emit(relax.op.add(t, t))]))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x):
    vm = relax.VirtualMachine(relax.build(mod, target=AVX2), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return [o.numpy() for o in out] if isinstance(out, tvm.ir.Array) else [out.numpy()]


def _ops(mod) -> list[str]:
    return [op_name(b.value) for b in ordered_bindings(mod["main"])]


def _image_kernels(mod) -> list[str]:
    return [
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and f.attrs.get(KERNEL_ATTR) == "image_nhwc"
    ]


@pytest.mark.parametrize(
    "pad_first, quantize",
    [
        (False, None),  # a float model's input: transpose, then the conv's pad
        (True, (27.5, 130, "uint8")),  # an int8 model's: quantize, pad (zero point), transpose
        (False, (19.0, -3, "int8")),
    ],
    ids=["float", "uint8-pad-first", "int8"],
)
def test_one_kernel_and_the_same_values(pad_first, quantize):
    shape = (1, 3, 21, 37)  # 37 columns: two 16-pixel steps and a tail
    mod = _module(shape, pad_first=pad_first, quantize=quantize)
    out = PackImageNHWC(AVX2)(mod)
    assert _image_kernels(out), out.script()
    assert not {"relax.permute_dims", "relax.nn.pad", "relax.quantize"} & set(_ops(out))
    x = (np.random.default_rng(3).standard_normal(shape) * 4).astype(np.float32)
    for got, ref in zip(_run(out, x), _run(mod, x), strict=True):
        np.testing.assert_array_equal(got, ref)  # the legalized ops' bits, border included


def test_a_transpose_read_twice_keeps_its_pad_apart():
    """The NHWC image is also read unpadded: the kernel makes it, the pad stays a pad."""
    mod = _module((1, 3, 8, 20), second_reader=True)
    out = PackImageNHWC(AVX2)(mod)
    assert len(_image_kernels(out)) == 1 and "relax.nn.pad" in _ops(out)
    x = np.random.default_rng(4).standard_normal((1, 3, 8, 20)).astype(np.float32)
    for got, ref in zip(_run(out, x), _run(mod, x), strict=True):
        np.testing.assert_array_equal(got, ref)


def test_leaves_many_channels_and_gpu_targets_alone():
    mod = _module((1, 8, 8, 20))
    assert PackImageNHWC(AVX2)(mod).same_as(mod)
    image = _module((1, 3, 8, 20))
    assert PackImageNHWC(CUDA)(image).same_as(image)


def test_a_float_cnn_built_for_the_host_reads_its_image_through_the_kernel():
    """The build's CPU passes run it: a conv on a 3-channel image, vs PyTorch."""
    conv = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1).eval()
    x = np.random.default_rng(6).standard_normal((1, 3, 30, 35)).astype(np.float32)
    exported = torch.export.export(conv, (torch.from_numpy(x),))
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(exported)
    ex, info = build_with_info(mod, "host")
    assert any(k.startswith("tvmq_image_nhwc") for k in info.prescheduled), info.prescheduled
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    got = (got[0] if isinstance(got, tvm.ir.Array) else got).numpy()
    with torch.no_grad():
        ref = conv(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
