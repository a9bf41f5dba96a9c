"""PackInt8DenseARM: rewrite, sdot / NEON code generation, and the Relax-level math on the host.

The kernel itself only runs on AArch64: tests/test_rpc.py runs it bit-exactly on the
emulated boards. Here the host checks everything around it (reshape, uint8 shift, padding,
weight packing, offset, slicing) with the kernel swapped for its unscheduled equivalent.
"""

import re

import numpy as np
import pytest
import tvm
from tvm import relax, te

import tvmq.passes  # noqa: F401 - first: tvmq.kernels imports tvmq.passes
import tvmq.passes.pack_int8_dense_arm as pass_module
from tvmq.build import build
from tvmq.kernels.arm_int8 import KERNEL_ATTR, choose_tiles, pack_weight_arm
from tvmq.passes.pack_int8_dense_arm import PackInt8DenseARM, arm_int8_instruction
from tvmq.targets import get_target


def _int8_matmul_module(x_shape, x_dtype, w: np.ndarray, *, const_weight: bool = True):
    """main(x[, w]) = matmul(x, W, out_dtype=int32), as LowerInt8 emits it."""
    x = relax.Var("x", relax.TensorType(x_shape, x_dtype))
    params = [x]
    if const_weight:
        weight = relax.const(w, "int8")
    else:
        weight = relax.Var("w", relax.TensorType(w.shape, "int8"))
        params.append(weight)
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, weight, out_dtype="int32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _weight(k: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-128, 128, (k, n), dtype=np.int8)


def _kernels(mod: tvm.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _target(name: str) -> tvm.target.Target:
    return get_target(name).tvm_target()


def test_instruction_per_target():
    assert arm_int8_instruction(_target("arm-a76")) == "sdot"
    assert arm_int8_instruction(_target("rasp4b")) == "neon"
    assert arm_int8_instruction(_target("host")) is None
    assert arm_int8_instruction(None) is None


@pytest.mark.parametrize(("target", "kind"), [("arm-a76", "sdot"), ("rasp4b", "neon")])
def test_rewrites_to_prescheduled_kernel(target, kind):
    mod = _int8_matmul_module((8, 64), "int8", _weight(64, 32))
    out = PackInt8DenseARM(_target(target))(mod)
    kernels = _kernels(out)
    assert len(kernels) == 1
    (func,) = kernels.values()
    assert func.attrs["tirx.is_scheduled"]
    assert func.attrs[KERNEL_ATTR] == f"int8_dense_{kind}"
    assert "relax.matmul" not in out["main"].script()
    # Nothing left to rewrite: a second run changes nothing.
    tvm.ir.assert_structural_equal(PackInt8DenseARM(_target(target))(out), out)


def test_uint8_activations_get_shift_and_offset():
    w = _weight(64, 32)
    out = PackInt8DenseARM(_target("arm-a76"))(_int8_matmul_module((4, 64), "uint8", w))
    (name,) = _kernels(out)
    assert name.endswith("_offset")  # + 128 * colsum(W); its value is checked numerically below
    assert "R.subtract" in out["main"].script()  # x - 128


@pytest.mark.parametrize(
    "make",
    [
        lambda: _int8_matmul_module((8, 64), "float32", np.zeros((64, 32), "float32")),
        lambda: _int8_matmul_module((8, 64), "int8", _weight(64, 32), const_weight=False),
    ],
    ids=["float", "weight-not-constant"],
)
def test_leaves_other_matmuls_alone(make):
    mod = make()
    assert PackInt8DenseARM(_target("arm-a76"))(mod).same_as(mod)


@pytest.mark.parametrize("target", ["host", "x86-avx512-vnni"])
def test_noop_off_aarch64(target):
    mod = _int8_matmul_module((8, 64), "int8", _weight(64, 32))
    assert PackInt8DenseARM(_target(target))(mod).same_as(mod)


def test_pack_weight_layout():
    w = _weight(10, 7)
    packed = pack_weight_arm(w)
    assert packed.shape == (2, 3, 4, 4)
    for q, r, j, i in [(0, 0, 0, 0), (2, 1, 1, 2), (1, 3, 0, 3)]:
        k, n = 4 * q + r, 4 * j + i
        expected = w[k, n] if k < 10 and n < 7 else 0
        assert packed[j, q, i, r] == expected


def test_choose_tiles():
    assert choose_tiles(1, 16) == choose_tiles(1, 16, "sdot")
    tiles = choose_tiles(13, 64)
    assert tiles.m_padded % tiles.mr == 0 and tiles.m_padded >= 13
    assert tiles.mr * tiles.nr <= 24
    assert choose_tiles(8, 64, "neon").mr * choose_tiles(8, 64, "neon").nr <= 12


@pytest.mark.parametrize(
    ("target", "present", "absent"),
    [("arm-a76", ["sdot"], []), ("rasp4b", ["smull", "saddlp"], ["sdot"])],
)
def test_aarch64_assembly(target, present, absent):
    mod = _int8_matmul_module((2, 40, 64), "int8", _weight(64, 30))
    ex = build(PackInt8DenseARM(_target(target))(mod), target)
    asm = "\n".join(m.inspect_source("asm") for m in ex.mod.imports if m.kind == "llvm")
    for instr in present:
        assert re.search(rf"\b{instr}\b", asm), f"no {instr} in the {target} kernel"
    for instr in absent:
        assert not re.search(rf"\b{instr}\b", asm)


def _unscheduled_kernel(m, k, n, *, instruction, with_offset):
    """The kernel's computation without schedule or intrinsic: runs on any CPU."""
    x = te.placeholder((m, k), "int8", name="X")
    w = te.placeholder((n // 4, k // 4, 4, 4), "int8", name="W")
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(
            x[i, r].astype("int32") * w[j // 4, r // 4, j % 4, r % 4].astype("int32"), axis=r
        ),
        name="acc",
    )
    args = [x, w]
    if with_offset:
        off = te.placeholder((n,), "int32", name="offset")
        args.append(off)
        acc = te.compute((m, n), lambda i, j: acc[i, j] + off[j], name="C")
    func = te.create_prim_func([*args, acc]).without_attr("global_symbol")
    # Opaque, as the real (tensorized) kernel is to FuseOps: nothing fuses into it.
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)


@pytest.mark.parametrize(
    ("x_shape", "x_dtype", "n"),
    [((1, 64), "int8", 32), ((13, 30), "uint8", 7), ((2, 5, 33), "int8", 10), ((9, 8), "uint8", 4)],
    ids=["m1", "ragged-u8", "3d-ragged", "m9-u8"],
)
def test_relax_math_matches_numpy_on_host(monkeypatch, x_shape, x_dtype, n):
    """Rewritten on the arm-a76 target, then built for the host with the plain kernel."""
    monkeypatch.setattr(pass_module, "int8_dense_arm", _unscheduled_kernel)
    rng = np.random.default_rng(7)
    w = _weight(x_shape[-1], n, seed=3)
    lo, hi = (0, 256) if x_dtype == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, x_shape).astype(x_dtype)
    mod = PackInt8DenseARM(_target("arm-a76"))(_int8_matmul_module(x_shape, x_dtype, w))
    assert "relax.matmul" not in mod["main"].script()
    vm = relax.VirtualMachine(build(mod, "host"), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(y, x.astype(np.int32) @ w.astype(np.int32))
