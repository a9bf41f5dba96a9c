"""PackBf16ConvX86: float32 convs on bf16 AMX tiles read from their padded input, checked
against PyTorch on bf16-rounded operands (exact up to float32 sums) and against float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.kernels.x86_amx_bf16 import bf16_bits, bf16_to_float
from tvmq.passes.pack_bf16_conv_x86 import PackBf16ConvX86

SAPPHIRERAPIDS = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})


def _kernel_names(mod) -> list[str]:
    return [
        str(gv.name_hint) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    ]


def _conv_module(x_shape, w: np.ndarray, bias: np.ndarray, padding: int, strides: int = 1):
    """conv2d(x, W) + bias, ReLU (what FoldBatchNorm leaves of a CNN block)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            conv = relax.op.nn.conv2d(x, relax.const(w), strides=strides, padding=padding)
            y = bb.emit(conv)
            y = bb.emit(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1))))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.amx
@pytest.mark.parametrize(
    ("x_shape", "o", "k", "padding"),
    [((1, 64, 10, 9), 40, 3, 1), ((2, 32, 7, 7), 64, 3, 1), ((1, 96, 8, 8), 32, 1, 0)],
)
def test_bf16_conv_reads_its_padded_input_into_tiles(rng, x_shape, o, k, padding):
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal((o, x_shape[1], k, k)) / 10).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    mod = PackBf16ConvX86(SAPPHIRERAPIDS)(_conv_module(x_shape, w, bias, padding))
    names = _kernel_names(mod)
    assert any(n.startswith("tvmq_bf16_conv_amx") and n.endswith("_bias_act") for n in names)
    vm = relax.VirtualMachine(tvm.compile(mod, target=SAPPHIRERAPIDS), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()

    def conv(a, b):
        t = torch.nn.functional.conv2d(torch.from_numpy(a), torch.from_numpy(b), padding=padding)
        return torch.relu(t + torch.from_numpy(bias).reshape(1, -1, 1, 1)).numpy()

    rounded = conv(*(bf16_to_float(bf16_bits(a)) for a in (x, w)))
    scale = np.abs(rounded).max()
    assert np.abs(got - rounded).max() / scale < 1e-5  # float32 sums of exact bf16 products
    assert np.abs(got - conv(x, w)).max() / scale < 2e-2


@pytest.mark.amx
@pytest.mark.parametrize(
    ("strides1", "k2"), [(1, 3), (2, 3), (1, 1)], ids=["direct", "gathered", "unpadded-reader"]
)
def test_a_conv_read_only_by_a_bf16_conv_writes_its_padded_bf16_input(rng, strides1, k2):
    """conv1 -> conv2: conv1's kernel stores its result as conv2's padded input, rounded to
    bf16 (no float32 result and no conversion kernel between them); the numbers are those
    of the two convs with their inputs rounded, as before."""
    x_shape = (1, 64, 14, 12)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w1 = (rng.standard_normal((64, 64, 3, 3)) / 10).astype(np.float32)
    w2 = (rng.standard_normal((32, 64, k2, k2)) / 10).astype(np.float32)
    b1, b2 = (rng.standard_normal(o).astype(np.float32) for o in (64, 32))
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x_shape, "float32"))

    def block(data, w, b, strides, padding):
        y = bb.emit(relax.op.nn.conv2d(data, relax.const(w), strides=strides, padding=padding))
        y = bb.emit(relax.op.add(y, relax.const(b.reshape(1, -1, 1, 1))))
        return relax.op.nn.relu(y)

    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(block(xv, w1, b1, strides1, 1))
            out = bb.emit_output(block(y, w2, b2, 1, k2 // 2))
        bb.emit_func_output(out)
    mod = PackBf16ConvX86(SAPPHIRERAPIDS)(bb.get())
    names = _kernel_names(mod)
    assert sum(n.endswith("_bias_act_to_bf16") for n in names) == 1, names
    assert sum(n.startswith("tvmq_to_bf16_padded") for n in names) == 1, names  # x's only
    assert not any("from_bf16" in n for n in names)  # the float32 result: never computed
    vm = relax.VirtualMachine(tvm.compile(mod, target=SAPPHIRERAPIDS), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()

    def conv(a, w, b, strides, padding):
        a, w = (torch.from_numpy(bf16_to_float(bf16_bits(v))) for v in (a, w))
        t = torch.nn.functional.conv2d(a, w, stride=strides, padding=padding)
        return torch.relu(t + torch.from_numpy(b).reshape(1, -1, 1, 1)).numpy()

    want = conv(conv(x, w1, b1, strides1, 1), w2, b2, 1, k2 // 2)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.amx
@pytest.mark.parametrize("activation", ["relu6", "silu"])
def test_a_depthwise_conv_between_bf16_convs_reads_and_writes_bf16(rng, activation):
    """expand (1x1) -> activation -> depthwise 3x3 -> ReLU6 -> project (1x1), MobileNet's
    block: the expansion stores bf16 bits (its SiLU too, in the store), the depthwise kernel
    widens them as it reads and stores bf16 bits for the projection: no float32 activation
    and no conversion kernel inside the block. Numbers: PyTorch's, each conv's input rounded
    to bf16."""
    x_shape, e = (1, 32, 12, 10), 96
    x = rng.standard_normal(x_shape).astype(np.float32)
    w1 = (rng.standard_normal((e, 32, 1, 1)) / 5).astype(np.float32)
    wd = (rng.standard_normal((e, 1, 3, 3)) / 3).astype(np.float32)
    w2 = (rng.standard_normal((24, e, 1, 1)) / 10).astype(np.float32)
    b1, bd, b2 = (rng.standard_normal(o).astype(np.float32) for o in (e, e, 24))
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x_shape, "float32"))

    def conv(data, w, b, groups=1):
        y = bb.emit(
            relax.op.nn.conv2d(data, relax.const(w), padding=w.shape[-1] // 2, groups=groups)
        )
        return bb.emit(relax.op.add(y, relax.const(b.reshape(1, -1, 1, 1))))

    with bb.function("main", [xv]):
        with bb.dataflow():
            y = conv(xv, w1, b1)
            if activation == "silu":
                y = bb.emit(relax.op.multiply(y, bb.emit(relax.op.sigmoid(y))))
            else:
                y = bb.emit(relax.op.clip(y, 0.0, 6.0))
            y = bb.emit(relax.op.clip(conv(y, wd, bd, groups=e), 0.0, 6.0))
            out = bb.emit_output(conv(y, w2, b2))
        bb.emit_func_output(out)
    mod = PackBf16ConvX86(SAPPHIRERAPIDS)(bb.get())
    names = _kernel_names(mod)
    assert sum(n.startswith("tvmq_float_depthwise_bf16_to_bf16") for n in names) == 1, names
    assert sum(n.endswith("_bias_act_to_bf16") for n in names) == 1, names  # the expansion
    assert sum(n.startswith("tvmq_to_bf16_padded") for n in names) == 1, names  # x's only
    assert "R.sigmoid(" not in mod["main"].script()
    vm = relax.VirtualMachine(tvm.compile(mod, target=SAPPHIRERAPIDS), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()

    def rounded(a):
        return torch.from_numpy(bf16_to_float(bf16_bits(np.ascontiguousarray(a))))

    def tconv(a, w, b, groups=1):
        t = torch.nn.functional.conv2d(a, w, padding=w.shape[-1] // 2, groups=groups)
        return t + torch.from_numpy(b).reshape(1, -1, 1, 1)

    y = tconv(rounded(x), rounded(w1), b1)
    y = y * torch.sigmoid(y) if activation == "silu" else y.clamp(0, 6)
    y = tconv(rounded(y.numpy()), torch.from_numpy(wd), bd, groups=e).clamp(0, 6)
    want = tconv(rounded(y.numpy()), rounded(w2), b2).numpy()
    err = np.abs(got - want) / np.abs(want).max()
    # float32 sums in another order may round a few intermediates to the next bf16 value
    assert np.median(err) < 1e-5 and err.max() < 1e-2


@pytest.mark.amx
@pytest.mark.parametrize(
    ("x_shape", "o", "strides"), [((1, 64, 10, 9), 64, 1), ((1, 64, 14, 14), 128, 2)]
)
def test_a_residual_add_joins_the_bf16_conv_kernel(rng, x_shape, o, strides):
    """``relu(conv(x) + bias + r)`` (a ResNet block's end) is one kernel, direct or gathered:
    the skip is added in the store, no float32 add of two activations is left."""
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal((o, x_shape[1], 3, 3)) / 10).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    oh, ow = (x_shape[2] - 1) // strides + 1, (x_shape[3] - 1) // strides + 1
    r = rng.standard_normal((1, o, oh, ow)).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x_shape, "float32"))
    rv = relax.Var("r", relax.TensorType(r.shape, "float32"))
    with bb.function("main", [xv, rv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), strides=strides, padding=1))
            y = bb.emit(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1))))
            y = bb.emit(relax.op.add(y, rv))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    mod = PackBf16ConvX86(SAPPHIRERAPIDS)(bb.get())
    assert sum(n.endswith("_bias_residual_act") for n in _kernel_names(mod)) == 1
    assert "R.add(" not in mod["main"].script()
    vm = relax.VirtualMachine(tvm.compile(mod, target=SAPPHIRERAPIDS), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(r)).numpy()
    xr, wr = (torch.from_numpy(bf16_to_float(bf16_bits(a))) for a in (x, w))
    t = torch.nn.functional.conv2d(xr, wr, stride=strides, padding=1)
    want = torch.relu(t + torch.from_numpy(bias).reshape(1, -1, 1, 1) + torch.from_numpy(r))
    scale = np.abs(want.numpy()).max()
    assert np.abs(got - want.numpy()).max() / scale < 1e-5


@pytest.mark.amx
@pytest.mark.parametrize("k", [1, 3], ids=["unpadded-reader", "padded-reader"])
def test_a_block_input_read_by_a_conv_and_a_skip_stays_bf16(rng, k):
    """Two ResNet bottleneck ends: ``y1 = relu(conv_a(x) + b + x)`` read by the next block's
    conv and by its skip, ``relu(conv_c(relu(conv_b(y1))) + b + y1)``. Where conv_b reads
    ``y1`` unpadded (1x1), conv_a stores it as bf16 bits and conv_c adds those (no float32
    block output, no conversion kernel), the skip rounded to bf16 as OpenVINO's; a padded
    reader (3x3) keeps the float32 result and its conversion."""
    x_shape = (1, 64, 9, 10)
    x = rng.standard_normal(x_shape).astype(np.float32)
    ws = [(rng.standard_normal((64, 64, kk, kk)) / 10).astype(np.float32) for kk in (1, k, 1)]
    bs = [rng.standard_normal(64).astype(np.float32) for _ in ws]
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x_shape, "float32"))

    def conv(data, i, skip=None):
        pad = ws[i].shape[-1] // 2
        y = bb.emit(relax.op.nn.conv2d(data, relax.const(ws[i]), padding=pad))
        y = bb.emit(relax.op.add(y, relax.const(bs[i].reshape(1, -1, 1, 1))))
        y = y if skip is None else bb.emit(relax.op.add(y, skip))
        return relax.op.nn.relu(y)

    with bb.function("main", [xv]):
        with bb.dataflow():
            y1 = bb.emit(conv(xv, 0, xv))
            out = bb.emit_output(conv(bb.emit(conv(y1, 1)), 2, y1))
        bb.emit_func_output(out)
    mod = PackBf16ConvX86(SAPPHIRERAPIDS)(bb.get())
    names = _kernel_names(mod)
    bits = k == 1
    assert sum(n.endswith("_residual_act_to_bf16") for n in names) == bits, names
    assert sum(n.endswith("_residual_act_bf16") for n in names) == bits, names
    assert sum(n.startswith("tvmq_to_bf16_padded") for n in names) == 1 + (not bits), names
    vm = relax.VirtualMachine(tvm.compile(mod, target=SAPPHIRERAPIDS), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()

    def rounded(a):
        return torch.from_numpy(bf16_to_float(bf16_bits(np.asarray(a))))

    def tconv(a, i, skip=None):
        t = torch.nn.functional.conv2d(rounded(a), rounded(ws[i]), padding=ws[i].shape[-1] // 2)
        t = t + torch.from_numpy(bs[i]).reshape(1, -1, 1, 1)
        return torch.relu(t if skip is None else t + skip).numpy()

    y1 = tconv(x, 0, torch.from_numpy(x))
    skip = rounded(y1) if bits else torch.from_numpy(y1)
    want = tconv(tconv(y1, 1), 2, skip)
    err = np.abs(got - want) / np.abs(want).max()
    # float32 sums in another order may round a few intermediates to the next bf16 value
    assert np.median(err) < 1e-5 and err.max() < 1e-2
    exact = tconv(tconv(y1, 1), 2, torch.from_numpy(y1) if bits else rounded(y1))
    assert np.abs(got - exact).max() > np.abs(got - want).max()  # the skip's rounding shows


@pytest.mark.amx
@pytest.mark.parametrize(
    ("x_shape", "o", "k", "strides", "padding"),
    [((1, 3, 32, 30), 64, 7, 2, 3), ((1, 64, 14, 14), 128, 3, 2, 1), ((2, 40, 9, 11), 24, 1, 2, 0)],
    ids=["rgb-stem-7x7", "3x3-stride-2", "1x1-stride-2"],
)
def test_other_convs_gather_their_blocks_into_tiles(rng, x_shape, o, k, strides, padding):
    """Strided convs and channels off 32 (an RGB stem): each block of output pixels
    im2col'd into a panel in cache, then the same tiles as the direct kernel."""
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal((o, x_shape[1], k, k)) / 10).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    mod = _conv_module(x_shape, w, bias, padding, strides)
    mod = PackBf16ConvX86(SAPPHIRERAPIDS)(mod)
    assert any(n.startswith("tvmq_bf16_conv_amx_gathered") for n in _kernel_names(mod))
    vm = relax.VirtualMachine(tvm.compile(mod, target=SAPPHIRERAPIDS), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()

    def conv(a, b):
        t = torch.nn.functional.conv2d(
            torch.from_numpy(a), torch.from_numpy(b), stride=strides, padding=padding
        )
        return torch.relu(t + torch.from_numpy(bias).reshape(1, -1, 1, 1)).numpy()

    rounded = conv(*(bf16_to_float(bf16_bits(a)) for a in (x, w)))
    scale = np.abs(rounded).max()
    assert np.abs(got - rounded).max() / scale < 1e-5  # float32 sums of exact bf16 products
    assert np.abs(got - conv(x, w)).max() / scale < 2e-2


def test_a_max_pool_in_a_tuple_stays_channels_last():
    """PyTorch's max_pool2d_with_indices imports as ``(pool, zeros_like(pool))[0]``: seen
    through, the pool between two convs runs NHWC with no transpose to NCHW and back."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32, 16, 16), "float32"))
    w = np.random.default_rng(3).standard_normal((32, 32, 3, 3)).astype(np.float32)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1))
            p = bb.emit(relax.op.nn.max_pool2d(y, 3, 2, 1))
            t = bb.emit(relax.Tuple([p, relax.op.zeros_like(p)]))
            q = bb.emit(relax.TupleGetItem(t, 0))
            out = bb.emit_output(relax.op.nn.conv2d(q, relax.const(w), padding=1))
        bb.emit_func_output(out)
    mod = PackBf16ConvX86(SAPPHIRERAPIDS)(bb.get())
    main = mod["main"].script()
    assert main.count("R.permute_dims") == 2, main  # the input to NHWC, the result back
    assert 'layout="NHWC"' in main


@pytest.mark.amx
def test_compile_with_precision_bf16_runs_cnn_convs_on_tiles(rng, tmp_path):
    """tvmq.compile(precision="bf16"): batch norms folded first, every conv on bf16 tiles:
    the stride-1 convs over 32-channel multiples read their input directly, the RGB stem
    and the strided conv gather blocks of it."""
    import tvmq

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 32, 1), torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, 10),
    ).eval()  # fmt: skip
    for m in model.modules():  # batch norms that do something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    tvmq.compile(model, "host", example_inputs=(torch.from_numpy(x),), precision="bf16",
                 output_dir=tmp_path / "out", progress=False, tuning_logs=None)  # fmt: skip
    compiled = tvmq.load(tmp_path / "out")
    got = compiled(x)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    cosine = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
    assert cosine > 0.999 and np.abs(got - want).max() / np.abs(want).max() < 3e-2
    kernels = compiled.manifest.notes["kernels"]["prescheduled"]
    assert sum(k.startswith("tvmq_bf16_conv_amx_gathered") for k in kernels) == 2, kernels
    assert sum(k.startswith("tvmq_bf16_conv_amx") for k in kernels) == 4, kernels
    assert not any(k.startswith("tvmq_float_conv2d") for k in kernels), kernels
