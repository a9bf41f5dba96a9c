"""The SIMD width kernels are sized for, per target (tvmq.kernels._tiling.simd_bits)."""

from __future__ import annotations

import pytest
import tvm

from tvmq.kernels._tiling import simd_bits
from tvmq.kernels.cpu_float_conv import choose_conv_tiles, simd_lanes_and_registers
from tvmq.kernels.sparse import simd_lanes
from tvmq.targets import get_target


def _llvm(mcpu: str, mtriple: str = "x86_64-linux-gnu") -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "mtriple": mtriple})


@pytest.mark.parametrize(
    "mcpu,bits",
    [("haswell", 256), ("znver1", 256), ("znver3", 256), ("skylake-avx512", 512),
     ("znver4", 512), ("sapphirerapids", 512), ("x86-64", 128)],
)  # fmt: skip
def test_x86_width_comes_from_the_cpus_features(mcpu, bits):
    # TVM 0.27's llvm_get_vector_width says 512 for all of these.
    assert simd_bits(_llvm(mcpu)) == bits


def test_presets_and_other_targets():
    assert simd_bits(get_target("x86-avx2").tvm_target()) == 256
    assert simd_bits(get_target("x86-avx512-vnni").tvm_target()) == 512
    assert simd_bits(get_target("arm-a76").tvm_target()) == 128
    assert simd_bits(tvm.target.Target({"kind": "cuda", "arch": "sm_80"})) == 0
    assert simd_bits(None) == 0


def test_an_avx2_cpu_gets_8_lanes_and_a_tile_for_16_registers():
    target = _llvm("znver1")
    assert simd_lanes(target) == 8
    lanes, registers = simd_lanes_and_registers(target)
    assert (lanes, registers) == (8, 16)
    tiles = choose_conv_tiles(56, 64, lanes, registers, epilogue=True)
    # mr * nr accumulators + nr weight vectors + one broadcast fit in the 16 ymm registers.
    assert tiles.mr * tiles.nr + tiles.nr + 1 <= 16
