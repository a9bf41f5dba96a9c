"""ClusterWeights: k-means weight sharing, stored as a codebook plus narrow indices.

Runs on a float Relax module before ``LegalizeOps``, after any pruning (zeros are kept
exactly: a pruned tensor reserves one centroid for 0.0) and instead of weight quantization.
Each constant matmul/conv2d weight (the sites of :class:`PruneMagnitude`) of at least
``min_size`` elements is clustered by 1-D k-means into ``2**bits`` centroids and replaced
in the graph by its decoder::

    W = permute_dims(C)                       # C: float32 constant
    ==>
    idx = unpack(P)                           # P: uint8, two 4-bit indices a byte (bits <= 4)
    W   = permute_dims(reshape(take(codebook, idx), C.shape))

``codebook`` is a float32 constant of ``2**bits`` entries (sorted) and ``P`` holds one
index per byte (5..8 bits) or two (``bits <= 4``: low nibble = element ``i``, high nibble =
element ``i + ceil(n/2)``), so the constants, and the compiled library, really shrink. The
decoded weight equals the clustered float weight bit for bit (``take`` only copies floats).

Where it belongs: last of the weight rewrites, and after any ``FoldConstant``: folding
would evaluate the decoder at compile time and store float weights again. TVM's default
``tvm.compile`` pipeline for llvm does not fold constants. The decoder runs on every call
(a gather of ``size`` floats per weight) unless :class:`PackDecodedDense` (SIMD CPUs) decodes
a matmul's weight inside its kernel.
What was clustered is recorded on ``main`` as the attribute ``"tvmq.clustered"``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.errors import TvmqError

from .quantize_weight_only import DECODER_ATTR
from .relax_utils import relax_functions
from .sites import module_weight_sites, site_skipped

INITS = ("kmeans++", "linear", "density")
ATTR = "tvmq.clustered"


def _init_centroids(values: np.ndarray, k: int, init: str, rng) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if init == "linear":
        return np.linspace(lo, hi, k)
    if init == "density":
        return np.quantile(values, (np.arange(k) + 0.5) / k)
    # kmeans++: D^2 sampling, seeded.
    centers = [float(values[rng.integers(values.size)])]
    dist = (values - centers[0]) ** 2
    for _ in range(1, k):
        total = dist.sum()
        if total <= 0:
            break
        c = float(values[rng.choice(values.size, p=dist / total)])
        centers.append(c)
        dist = np.minimum(dist, (values - c) ** 2)
    centers = np.array(centers)
    if centers.size < k:  # fewer distinct values than clusters: pad inside the range
        centers = np.concatenate([centers, np.linspace(lo, hi, k - centers.size)])
    return centers


def _assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of sorted `centroids` for each value (ties to the lower)."""
    mids = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(mids, values, side="left")


def kmeans_1d(
    values: np.ndarray, k: int, init: str = "kmeans++", seed: int = 0, max_iter: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on 1-D `values`: (sorted float32 centroids [k], labels int64).

    Kept rather than ``scipy.cluster.vq.kmeans2``: on four all-MiniLM-L6-v2 weight matrices
    (384x384 to 1536x384, 2 and 4 bits) kmeans2 (``++`` or ``points`` init, 100 iterations)
    was never better by more than 0.01 dB of weight SQNR (up to 0.33 dB worse) and took
    0.8-1.9x as long (sorted 1-D assignment here vs scipy's distance to every centroid).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    centroids = np.sort(_init_centroids(values, k, init, rng))
    labels = _assign(values, centroids)
    for _ in range(max_iter):
        sums = np.bincount(labels, weights=values, minlength=k)
        counts = np.bincount(labels, minlength=k)
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        centroids = np.sort(centroids)
        new = _assign(values, centroids)
        if np.array_equal(new, labels):
            break
        labels = new
    centroids = centroids.astype(np.float32)
    # Re-assign against the float32 centroids actually stored.
    labels = _assign(values, centroids.astype(np.float64))
    return centroids, labels


def cluster_tensor(
    w: np.ndarray, bits: int, init: str = "kmeans++", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Codebook (float32 [2**bits]) and indices (uint8, shape of `w`) with w ~ codebook[idx].

    Exact zeros (pruned weights) keep one centroid of exactly 0.0 to themselves.
    """
    k = 2**bits
    flat = np.asarray(w, dtype=np.float32).ravel()
    zero = flat == 0
    if zero.any() and not zero.all() and k > 1:
        cents, lab = kmeans_1d(flat[~zero], k - 1, init, seed)
        codebook = np.sort(np.concatenate([cents, np.float32([0.0])])).astype(np.float32)
        idx = np.empty(flat.size, dtype=np.int64)
        z = int(np.searchsorted(codebook, 0.0, side="left"))
        # Non-zero centroids keep their order; the 0.0 slot sits at z.
        remap = np.array([i if i < z else i + 1 for i in range(k - 1)])
        # Duplicate 0.0 centroids (a cluster centred on 0) are fine: both decode to 0.0.
        idx[~zero] = remap[lab]
        idx[zero] = z
    else:
        codebook, lab = kmeans_1d(flat, k, init, seed)
        idx = lab
    return codebook, idx.astype(np.uint8).reshape(np.shape(w))


def pack_indices(idx: np.ndarray, bits: int) -> np.ndarray:
    """Flat uint8 storage: two indices a byte for bits <= 4 (i low, i + ceil(n/2) high)."""
    flat = idx.ravel().astype(np.uint8)
    if bits > 4:
        return flat
    half = (flat.size + 1) // 2
    padded = np.zeros(2 * half, dtype=np.uint8)
    padded[: flat.size] = flat
    return (padded[:half] | (padded[half:] << 4)).astype(np.uint8)


def unpack_indices(packed: np.ndarray, bits: int, size: int) -> np.ndarray:
    """Inverse of :func:`pack_indices` (numpy reference of the graph decoder)."""
    if bits > 4:
        return packed[:size]
    return np.concatenate([packed & 15, packed >> 4])[:size]


def decode_table(codebook: np.ndarray, packed: np.ndarray, shape) -> np.ndarray | None:
    """The float weight of shape `shape` that :func:`_decoder` computes from its constants;
    None when they are not a codebook (float32, ``2**bits`` entries) and packed uint8 indices."""
    if codebook.dtype != np.float32 or codebook.ndim != 1 or packed.dtype != np.uint8:
        return None
    bits = max(1, int(codebook.size - 1).bit_length())
    size = int(np.prod(shape))
    if 2**bits != codebook.size or packed.size != (size if bits > 4 else (size + 1) // 2):
        return None
    return codebook[unpack_indices(packed.ravel(), bits, size)].reshape(shape)


def _decoder(codebook: np.ndarray, packed: np.ndarray, bits: int, shape) -> relax.Function:
    """A private Relax function: packed indices -> codebook lookup -> the float weight.

    Being a function call with parameters (not ops on constants), FoldConstant cannot
    evaluate it at build time and store the decoded float weight instead.
    """
    size = int(np.prod(shape))
    params = [
        relax.Var("codebook", relax.TensorType(codebook.shape, "float32")),
        relax.Var("indices", relax.TensorType(packed.shape, "uint8")),
    ]
    bb = relax.BlockBuilder()
    with bb.function("decoder", params, {DECODER_ATTR: True}, private=True):
        with bb.dataflow():
            idx = params[1]
            if bits <= 4:
                lo = bb.emit(relax.op.bitwise_and(idx, relax.const(15, "uint8")))
                hi = bb.emit(relax.op.right_shift(idx, relax.const(4, "uint8")))
                idx = bb.emit(relax.op.concat([lo, hi], axis=0))
                if 2 * packed.size != size:
                    idx = bb.emit(relax.op.strided_slice(idx, axes=[0], begin=[0], end=[size]))
            idx = bb.emit(relax.op.astype(idx, "int32"))
            flat = bb.emit(relax.op.take(params[0], idx, axis=0))
            out = bb.emit_output(relax.op.reshape(flat, shape))
        bb.emit_func_output(out)
    return bb.get()["decoder"]


@mutator
class _Decoder(PyExprMutator):
    """Replaces each planned constant by a call to its decoder (added to the module)."""

    def __init__(self, mod, plans):
        super().__init__(mod)
        self.plans = plans

    def visit_generic_const_(self, const):
        plan = self.plans.get(const)
        if plan is None:
            return const
        name, codebook, packed, bits, shape = plan
        gv = self.builder_.add_func(_decoder(codebook, packed, bits, shape), name)
        args = [relax.const(codebook, "float32"), relax.const(packed, "uint8")]
        return self.builder_.emit(relax.Call(gv, args))


@tvm.transform.module_pass(opt_level=0, name="ClusterWeights")
class ClusterWeights:
    """Share weights: k-means into ``2**bits`` values per tensor, codebook + packed indices.

    Parameters
    ----------
    bits : int
        1..8; the codebook has ``2**bits`` float32 entries, indices take `bits` bits
        (packed two a byte for ``bits <= 4``, one a byte otherwise).
    init : {"kmeans++", "linear", "density"}
        Centroid initialisation: seeded k-means++, evenly spaced over [min, max], or at
        the quantiles of the weight distribution.
    min_size : int
        Weights with fewer elements stay float.
    seed : int
        Seed of the k-means++ sampling.
    skip : sequence of str
        Site names (``"matmul_1"``), source-model layer names (``"classifier"``) or fnmatch
        patterns of either (``"encoder.*"``), or op kinds (``"conv2d"``) to leave float.
    """

    def __init__(
        self, bits: int = 4, init: str = "kmeans++", min_size: int = 256, seed: int = 0, skip=()
    ) -> None:
        if not 1 <= int(bits) <= 8:
            raise TvmqError(f"bits must be in 1..8, got {bits}")
        if init not in INITS:
            raise TvmqError(f"init must be one of {INITS}, got {init!r}")
        self.bits = int(bits)
        self.init = init
        self.min_size = int(min_size)
        self.seed = int(seed)
        self.skip = tuple(str(s) for s in skip)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        plans: dict = {}
        record: dict = {}
        for site in module_weight_sites(mod):
            w = site.const.value.numpy()
            if site_skipped(site, self.skip) or site.const in plans or w.size < self.min_size:
                continue
            codebook, idx = cluster_tensor(w, self.bits, self.init, self.seed)
            packed = pack_indices(idx, self.bits)
            shape = [int(s) for s in w.shape]
            plans[site.const] = (f"tvmq_cluster_{site.name}", codebook, packed, self.bits, shape)
            record[site.name] = {
                "bits": self.bits,
                "distinct": int(np.unique(codebook[idx]).size),
                "bytes_before": int(w.nbytes),
                "bytes_after": int(codebook.nbytes + packed.nbytes),
            }
        if not plans:
            return mod
        decoder = _Decoder(mod, plans)
        updates = {}
        for gv, func in relax_functions(mod):
            new = decoder.visit_expr(func)
            if not new.same_as(func):
                if gv.name_hint == "main":
                    old = dict(func.attrs[ATTR]) if func.attrs and ATTR in func.attrs else {}
                    old.update(record)
                    new = new.with_attr(ATTR, old)
                updates[gv] = new
        out = decoder.builder_.get()  # the module plus the decoder functions added
        for gv, func in updates.items():
            out[gv] = func
        return out
