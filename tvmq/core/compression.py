"""Pruning, weight-sharing and block-sparse configs: small frozen dataclasses that validate
themselves.

``tvmq.compression`` (driver) turns ``PruneConfig`` / ``ClusterConfig`` into passes and
``tvmq.compile`` turns ``SparseConfig`` into BSR kernels. ``skip`` entries name weight sites
(``"matmul_0"``, ``"conv2d_*"``; see :mod:`tvmq.core.selectors`), the same names a
quantization scheme's ``skip`` uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tvmq.errors import TvmqError

PRUNE_METHODS = ("magnitude", "n:m", "channels")


@dataclass(frozen=True)
class PruneConfig:
    """One pruning step.

    Parameters
    ----------
    method : {"magnitude", "n:m", "channels"}
        Unstructured magnitude pruning, N:M semi-structured pruning along the reduction
        axis, or structured channel removal.
    sparsity : float
        ``"magnitude"``: fraction of weights zeroed, in [0, 1).
    scope : {"layer", "global"}
        ``"magnitude"``: per tensor, or one threshold over all weights.
    n, m : int
        ``"n:m"``: keep `n` of every `m` (default 2:4).
    ratio : float
        ``"channels"``: fraction of output channels removed per prunable layer, in [0, 1).
    norm : {"l1", "l2"}
        ``"channels"``: channel importance.
    min_size : int
        ``"magnitude"``: weights with fewer elements stay dense.
    skip : tuple of str
        Layers left alone: site names (``"matmul_0"``), source-model layer names
        (``"classifier"``), fnmatch patterns of either (``"encoder.*"``) or op kinds
        (``"conv2d"``). ``"channels"``: their output channels stay.
    strict : bool
        ``"n:m"``: raise when a reduction length is not a multiple of `m` (else skip it).
    """

    method: str = "magnitude"
    sparsity: float = 0.5
    scope: str = "layer"
    n: int = 2
    m: int = 4
    ratio: float = 0.5
    norm: str = "l1"
    min_size: int = 256
    skip: tuple[str, ...] = ()
    strict: bool = True

    def __post_init__(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise TvmqError(f"prune method must be one of {PRUNE_METHODS}, got {self.method!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise TvmqError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in ("layer", "global"):
            raise TvmqError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if self.m < 1 or not 0 < self.n <= self.m:
            raise TvmqError(f"N:M pruning needs 0 < n <= m, got n={self.n}, m={self.m}")
        if not 0.0 <= self.ratio < 1.0:
            raise TvmqError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.norm not in ("l1", "l2"):
            raise TvmqError(f"norm must be 'l1' or 'l2', got {self.norm!r}")
        if self.min_size < 0:
            raise TvmqError(f"min_size must be >= 0, got {self.min_size}")
        object.__setattr__(self, "skip", tuple(str(s) for s in self.skip))

    def describe(self) -> dict:
        """The settings that matter for this method (for manifests)."""
        keys = {
            "magnitude": ("sparsity", "scope", "min_size", "skip"),
            "n:m": ("n", "m", "strict", "skip"),
            "channels": ("ratio", "norm", "skip"),
        }[self.method]
        d = asdict(self)
        return {"method": self.method, **{k: list(d[k]) if k == "skip" else d[k] for k in keys}}


@dataclass(frozen=True)
class ClusterConfig:
    """Weight sharing: k-means into ``2**bits`` values per weight tensor.

    Parameters
    ----------
    bits : int
        1..8 (indices packed two a byte for ``bits <= 4``).
    init : {"kmeans++", "linear", "density"}
        Centroid initialisation.
    min_size : int
        Weights with fewer elements stay float.
    seed : int
        Seed of k-means++.
    skip : tuple of str
        Layers left float (names or patterns, as ``PruneConfig.skip``).
    """

    bits: int = 4
    init: str = "kmeans++"
    min_size: int = 256
    seed: int = 0
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise TvmqError(f"bits must be in 1..8, got {self.bits}")
        if self.init not in ("kmeans++", "linear", "density"):
            raise TvmqError(f"init must be 'kmeans++', 'linear' or 'density', got {self.init!r}")
        if self.min_size < 0:
            raise TvmqError(f"min_size must be >= 0, got {self.min_size}")
        object.__setattr__(self, "skip", tuple(str(s) for s in self.skip))

    def describe(self) -> dict:
        d = asdict(self)
        d["skip"] = list(d["skip"])
        return d

    @classmethod
    def of(cls, spec) -> ClusterConfig | None:
        """None -> None; a config as is; an int N -> N shared values per weight (a power
        of two from 2 to 256, as the CLI's ``--cluster N``); anything else -> TvmqError."""
        if spec is None or isinstance(spec, cls):
            return spec
        if isinstance(spec, int) and not isinstance(spec, bool):
            bits = spec.bit_length() - 1
            if 2 <= spec <= 256 and 1 << bits == spec:
                return cls(bits=bits)
            raise TvmqError(f"cluster takes a power of two from 2 to 256 values, got {spec}")
        raise TvmqError(
            f"cluster must be a ClusterConfig or a number of shared values (16), got "
            f"{type(spec).__name__} {spec!r}"
        )


@dataclass(frozen=True)
class SparseConfig:
    """Block-sparse execution: layers with at least ``min_sparsity`` zero blocks of
    ``block`` (rows x cols of the [out, in] weight) run on BSR kernels. 0.7 is where
    ``bench/bench_sparse.py`` measured BSR winning for every block size (it already won
    at 50% against tvmq's default dense schedule)."""

    min_sparsity: float = 0.7
    block: tuple[int, int] = (16, 1)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_sparsity < 1.0:
            raise TvmqError(f"sparse min_sparsity must be in [0, 1), got {self.min_sparsity}")
        if len(self.block) != 2 or min(self.block) < 1:
            raise TvmqError(
                f"sparse block must be two positive ints (rows, cols), got {self.block}"
            )

    @classmethod
    def of(cls, spec) -> SparseConfig | None:
        """None/False -> None; True -> defaults; a float -> that threshold; a config as is."""
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls()
        if isinstance(spec, cls):
            return spec
        return cls(min_sparsity=float(spec))
