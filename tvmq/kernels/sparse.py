"""Block-sparse (BSR) float32 dense kernels: ``y[M, N] = x[M, K] @ W^T`` with ``W[N, K]`` in BSR.

TVM 0.27 has no sparse tensor type and no block-sparse TOPI kernels any more; these are
tvmq's own. The weight is a constant, so it is packed once at compile time by
:func:`to_bsr` into three arrays (the usual BSR / scipy ``bsr_matrix`` layout):

- ``data[nnzb, bs_r, bs_c]``: the non-zero blocks, row-major by block row then column;
- ``indices[nnzb]``: each block's block-column (``k = indices[j] * bs_c + c``);
- ``indptr[N / bs_r + 1]``: block row ``i`` owns blocks ``indptr[i]:indptr[i + 1]``.

``N`` and ``K`` are zero-padded up to multiples of the block; block rows with no non-zero
block are simply empty (``indptr[i] == indptr[i + 1]``) and produce zeros.

Two kernels, both marked ``tirx.is_scheduled`` (written as explicit loops, so no schedule
rule touches them) and :data:`~tvmq.kernels.x86_int8.KERNEL_ATTR`:

- :func:`bsr_dense_tiled` (``M >= lanes``, the batched case): each parallel task owns one
  block row and ``mt`` rows of ``x`` and keeps a ``bs_r x mt`` accumulator in registers;
  every non-zero weight is broadcast and multiplied into ``mt`` activations at once, so
  the activation is read transposed, ``xT[K, M]`` (the pass emits the transpose), and the
  SIMD lanes run over ``M``. This works for any block, including 1x1.
- :func:`bsr_dense_rows` (small ``M``, e.g. batch-1 inference): each task owns one row of
  ``x`` and one block row, and the SIMD lanes run over the ``bs_r`` rows of the block
  (1x1 blocks are scalar there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from tvmq.kernels._tiling import round_up, simd_bits
from tvmq.kernels.x86_int8 import KERNEL_ATTR

# Below this many multiply-adds a parallel launch costs more than it saves.
_PARALLEL_MIN_MACS = 1 << 16


@dataclass(frozen=True)
class BSRWeight:
    """A weight ``W[N, K]`` packed as BSR by :func:`pack_bsr`, with its padded sizes."""

    data: np.ndarray  # (nnzb, bs_r, bs_c)
    indices: np.ndarray  # (nnzb,) int32
    indptr: np.ndarray  # (n_padded / bs_r + 1,) int32
    shape: tuple[int, int]  # (N, K) before padding
    block: tuple[int, int]

    @property
    def padded_shape(self) -> tuple[int, int]:
        """``(N, K)`` rounded up to multiples of the block."""
        return (round_up(self.shape[0], self.block[0]), round_up(self.shape[1], self.block[1]))

    @property
    def nnzb(self) -> int:
        """Number of stored (non-zero) blocks."""
        return int(self.indices.shape[0])

    @property
    def block_sparsity(self) -> float:
        """Fraction of the padded weight's blocks that are all zero."""
        n, k = self.padded_shape
        total = (n // self.block[0]) * (k // self.block[1])
        return 1.0 - self.nnzb / total if total else 0.0


def pack_bsr(w: np.ndarray, block: tuple[int, int] = (16, 1)) -> BSRWeight:
    """Pack ``w[N, K]`` (rows = output features) as BSR with ``block = (bs_r, bs_c)``.

    ``N`` and ``K`` are zero-padded to multiples of ``bs_r`` / ``bs_c``; a block is stored
    when any of its entries is non-zero.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D (N, K) weight, got shape {w.shape}")
    bs_r, bs_c = (int(b) for b in block)
    if bs_r < 1 or bs_c < 1:
        raise ValueError(f"block sizes must be >= 1, got {block}")
    n, k = w.shape
    n_pad, k_pad = round_up(n, bs_r), round_up(k, bs_c)
    padded = np.zeros((n_pad, k_pad), dtype=w.dtype)
    padded[:n, :k] = w
    blocks = padded.reshape(n_pad // bs_r, bs_r, k_pad // bs_c, bs_c).transpose(0, 2, 1, 3)
    nonzero = np.any(blocks != 0, axis=(2, 3))
    rows, cols = np.nonzero(nonzero)  # row-major: sorted by block row, then column
    data = np.ascontiguousarray(blocks[rows, cols]).reshape(-1, bs_r, bs_c)
    indptr = np.zeros(n_pad // bs_r + 1, dtype=np.int32)
    np.cumsum(nonzero.sum(axis=1), out=indptr[1:])
    return BSRWeight(data, cols.astype(np.int32), indptr, (n, k), (bs_r, bs_c))


def to_bsr(
    w: np.ndarray, block: tuple[int, int] = (16, 1)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(data, indices, indptr)`` of ``w[N, K]`` in BSR; see :func:`pack_bsr`."""
    packed = pack_bsr(w, block)
    return packed.data, packed.indices, packed.indptr


def from_bsr(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """The dense ``(N, K)`` weight back from BSR arrays (padding cut off)."""
    nnzb, bs_r, bs_c = data.shape
    n_blocks = indptr.shape[0] - 1
    k_pad = round_up(shape[1], bs_c)
    out = np.zeros((n_blocks * bs_r, max(k_pad, bs_c)), dtype=data.dtype)
    for i in range(n_blocks):
        for j in range(int(indptr[i]), int(indptr[i + 1])):
            c = int(indices[j]) * bs_c
            out[i * bs_r : (i + 1) * bs_r, c : c + bs_c] = data[j]
    return out[: shape[0], : shape[1]]


def block_sparsity(w: np.ndarray, block: tuple[int, int]) -> float:
    """Fraction of all-zero ``block``-sized tiles of ``w[N, K]`` (after zero padding)."""
    return pack_bsr(w, block).block_sparsity


@dataclass(frozen=True)
class BSRTiles:
    """How :func:`bsr_dense_tiled` splits ``M``: ``mt`` rows per task, ``M`` padded to ``m_padded``."""

    mt: int
    m_padded: int


def simd_lanes(target: tvm.target.Target | None) -> int:
    """float32 lanes of one SIMD register of an LLVM target (4 when unknown)."""
    return max(4, simd_bits(target) // 32)


def choose_bsr_tiles(m: int, bs_r: int, lanes: int) -> BSRTiles:
    """``mt`` for :func:`bsr_dense_tiled`: 2 or 4 vectors per block row, not more than ``m``.

    Measured on AVX-512 (BERT FFN shapes, 90% block sparsity): 2 vectors were best for
    1x1 and 16x1 blocks, 4 for 4x1 (the accumulator is ``bs_r x mt``).
    """
    vectors = 4 if 2 <= bs_r <= 4 else 2
    vectors = max(1, min(vectors, -(-m // lanes)))
    mt = lanes * vectors
    return BSRTiles(mt, round_up(m, mt))


def _finish(func: tvm.tirx.PrimFunc, name: str) -> tvm.tirx.PrimFunc:
    # No global_symbol: the pass names each kernel when it adds it to the module.
    return (
        func.with_attr("tirx.is_scheduled", True)
        .with_attr(KERNEL_ATTR, name)
        .without_attr("global_symbol")
    )


def bsr_dense_tiled(
    m: int, k: int, n: int, nnzb: int, block: tuple[int, int], mt: int
) -> tvm.tirx.PrimFunc:
    """Kernel ``y[m, n] = xT[k, m]^T @ W[n, k]^T``, W in BSR, SIMD over ``mt`` rows of ``x``.

    Parameters
    ----------
    m, k, n : int
        Padded sizes: ``m % mt == 0``, ``k % bs_c == 0``, ``n % bs_r == 0``.
    nnzb : int
        Number of stored blocks (at least 1: pass a single zero block for an all-zero W).
    block : (int, int)
        ``(bs_r, bs_c)``.
    mt : int
        Rows of ``x`` per task, a multiple of the SIMD width (:func:`choose_bsr_tiles`).

    Returns
    -------
    tvm.tirx.PrimFunc
        Arguments ``xT (k, m)``, ``data (nnzb, bs_r, bs_c)``, ``indices (nnzb,) int32``,
        ``indptr (n / bs_r + 1,) int32``, ``y (m, n)``; all float32 but the indices.
    """
    bs_r, bs_c = block
    if m % mt or k % bs_c or n % bs_r or nnzb < 1:
        raise ValueError(f"bad BSR kernel shape m={m} k={k} n={n} nnzb={nnzb} {block} mt={mt}")
    nb, m_tiles = n // bs_r, m // mt
    parallel = m * nnzb * bs_r * bs_c >= _PARALLEL_MIN_MACS
    task_loop = T.parallel if parallel else T.serial

    @T.prim_func
    def kernel(
        xT: T.Buffer((k, m), "float32"),
        data: T.Buffer((nnzb, bs_r, bs_c), "float32"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((nb + 1,), "int32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for task in task_loop(nb * m_tiles):
            acc = T.alloc_buffer((bs_r, mt), "float32", scope="local")
            i = task // m_tiles
            m0 = task % m_tiles * mt
            for r in T.unroll(bs_r):
                for v in T.vectorized(mt):
                    acc[r, v] = T.float32(0)
            for j in range(indptr[i], indptr[i + 1]):
                for c in range(bs_c):
                    for r in T.unroll(bs_r):
                        for v in T.vectorized(mt):
                            acc[r, v] = (
                                acc[r, v] + data[j, r, c] * xT[indices[j] * bs_c + c, m0 + v]
                            )
            for v in range(mt):
                for r in T.vectorized(bs_r):
                    y[m0 + v, i * bs_r + r] = acc[r, v]

    return _finish(kernel, "bsr_dense_tiled")


def bsr_dense_rows(m: int, k: int, n: int, nnzb: int, block: tuple[int, int]) -> tvm.tirx.PrimFunc:
    """Kernel ``y[m, n] = x[m, k] @ W[n, k]^T``, W in BSR, SIMD over the ``bs_r`` block rows.

    For small ``m`` (batch-1 inference). Sizes as for :func:`bsr_dense_tiled`, without the
    ``m`` padding; arguments the same except ``x (m, k)`` instead of ``xT``.
    """
    bs_r, bs_c = block
    if k % bs_c or n % bs_r or nnzb < 1:
        raise ValueError(f"bad BSR kernel shape m={m} k={k} n={n} nnzb={nnzb} {block}")
    nb = n // bs_r
    parallel = m * nnzb * bs_r * bs_c >= _PARALLEL_MIN_MACS
    task_loop = T.parallel if parallel else T.serial

    @T.prim_func
    def kernel(
        x: T.Buffer((m, k), "float32"),
        data: T.Buffer((nnzb, bs_r, bs_c), "float32"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((nb + 1,), "int32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for task in task_loop(m * nb):
            acc = T.alloc_buffer((bs_r,), "float32", scope="local")
            row = task // nb
            i = task % nb
            for r in T.vectorized(bs_r):
                acc[r] = T.float32(0)
            for j in range(indptr[i], indptr[i + 1]):
                for c in range(bs_c):
                    for r in T.vectorized(bs_r):
                        acc[r] = acc[r] + data[j, r, c] * x[row, indices[j] * bs_c + c]
            for r in T.vectorized(bs_r):
                y[row, i * bs_r + r] = acc[r]

    return _finish(kernel, "bsr_dense_rows")


def kernel_arrays(packed: BSRWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(data, indices, indptr)`` ready for the kernels: an all-zero W gets one zero block
    (TIR buffers cannot have extent 0), which no block row points at."""
    if packed.nnzb:
        return packed.data, packed.indices, packed.indptr
    bs_r, bs_c = packed.block
    return np.zeros((1, bs_r, bs_c), packed.data.dtype), np.zeros(1, np.int32), packed.indptr
