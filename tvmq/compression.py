"""Pruning and weight-sharing configs, and the pass pipeline that applies them to a Relax module.

``apply_compression(mod, prune=..., cluster=...)`` runs, on a float Relax module from a
frontend and before quantization / ``LegalizeOps``::

    # 1. structured: remove channels (shapes shrink)
    PruneChannels(ratio, norm)               for PruneConfig(method="channels")
    # 2. unstructured: zero weights (shapes kept)
    PruneMagnitude(sparsity, scope, ...)     for PruneConfig(method="magnitude")
    PruneNM(n, m)                            for PruneConfig(method="n:m")
    # 3. weight sharing: codebook + packed indices
    ClusterWeights(bits, init)               for ClusterConfig

and returns the module plus a report (sparsity per weight, channels removed, clusters,
parameters, multiply-accumulates and constant bytes before/after).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import tvm

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
        ``"magnitude"``/``"n:m"``: weight sites (``"matmul_0"``) left dense.
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

    def to_pass(self) -> tvm.transform.Pass:
        """The Relax pass for this step."""
        from tvmq.passes.prune_channels import PruneChannels
        from tvmq.passes.prune_magnitude import PruneMagnitude
        from tvmq.passes.prune_n_m import PruneNM

        if self.method == "magnitude":
            return PruneMagnitude(self.sparsity, self.scope, self.min_size, self.skip)
        if self.method == "n:m":
            return PruneNM(self.n, self.m, self.strict, self.skip)
        return PruneChannels(self.ratio, self.norm)

    def describe(self) -> dict:
        """The settings that matter for this method (for manifests)."""
        keys = {
            "magnitude": ("sparsity", "scope", "min_size", "skip"),
            "n:m": ("n", "m", "strict", "skip"),
            "channels": ("ratio", "norm"),
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
        Weight sites left float.
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

    def to_pass(self) -> tvm.transform.Pass:
        from tvmq.passes.cluster_weights import ClusterWeights

        return ClusterWeights(self.bits, self.init, self.min_size, self.seed, self.skip)

    def describe(self) -> dict:
        d = asdict(self)
        d["skip"] = list(d["skip"])
        return d


def _as_prune_list(prune) -> list[PruneConfig]:
    if prune is None:
        return []
    if isinstance(prune, PruneConfig):
        return [prune]
    if isinstance(prune, Sequence) and not isinstance(prune, str):
        items = list(prune)
        if all(isinstance(p, PruneConfig) for p in items):
            return items
    raise TvmqError(f"prune must be a PruneConfig or a list of them, got {prune!r}")


def compression_pipeline(prune=None, cluster: ClusterConfig | None = None) -> tvm.transform.Pass:
    """The ``Sequential`` of compression passes: channels, then zeros, then clustering."""
    steps = _as_prune_list(prune)
    if cluster is not None and not isinstance(cluster, ClusterConfig):
        raise TvmqError(f"cluster must be a ClusterConfig, got {cluster!r}")
    structured = [p.to_pass() for p in steps if p.method == "channels"]
    unstructured = [p.to_pass() for p in steps if p.method != "channels"]
    return tvm.transform.Sequential(
        [
            # Phase 1: remove channels (shapes shrink; later passes see the small weights).
            *structured,
            # Phase 2: zero weights in place.
            *unstructured,
            # Phase 3: share weights; keeps exact zeros, so it runs after pruning.
            cluster.to_pass() if cluster is not None else tvm.transform.Sequential([]),
        ],
        name="tvmq.Compression",
    )


def _to_python(value):
    """TVM containers/attributes -> plain Python (dict, list, int, float, str)."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _to_python(v) for k, v in value.items()}
    if isinstance(value, Sequence) or hasattr(value, "__len__"):
        return [_to_python(v) for v in value]
    if hasattr(value, "value"):
        return value.value
    return str(value)


def _main_attr(mod: tvm.IRModule, key: str) -> dict:
    for gv, func in mod.functions.items():
        if gv.name_hint == "main" and func.attrs is not None and key in func.attrs:
            return _to_python(func.attrs[key])
    return {}


def model_stats(mod: tvm.IRModule) -> dict:
    """Parameters (constant elements), constant bytes and matmul/conv2d MACs of `mod`."""
    from tvmq.passes.cluster_weights import constant_bytes
    from tvmq.passes.prune_channels import count_macs, count_params

    return {
        "params": count_params(mod),
        "constant_bytes": constant_bytes(mod),
        "macs": count_macs(mod),
    }


def apply_compression(
    mod: tvm.IRModule, prune=None, cluster: ClusterConfig | None = None
) -> tuple[tvm.IRModule, dict]:
    """Prune and/or cluster the constant weights of a float Relax module.

    Parameters
    ----------
    mod : tvm.IRModule
        A float module with weights as constants (as ``tvmq.frontends`` import them),
        before quantization and ``LegalizeOps``.
    prune : PruneConfig or list of PruneConfig, optional
        Channel pruning runs first, then magnitude / N:M pruning, whatever the order given.
    cluster : ClusterConfig, optional
        Weight sharing, last.

    Returns
    -------
    (tvm.IRModule, dict)
        The compressed module and a report: ``{"prune": [...], "cluster": {...},
        "before": stats, "after": stats, "sparsity": ..., "channels": ..., "clustered": ...}``
        (stats: params, constant_bytes, macs; see :func:`model_stats`).
    """
    from tvmq.passes.cluster_weights import ATTR as CLUSTER_ATTR
    from tvmq.passes.prune_channels import ATTR as CHANNELS_ATTR
    from tvmq.passes.prune_magnitude import sparsity_report

    steps = _as_prune_list(prune)
    compression_pipeline(steps, cluster)  # validates
    before = model_stats(mod)
    # Zeros are read between the phases: clustering turns weights into codebook lookups.
    out = compression_pipeline(steps, None)(mod)
    sparsity = sparsity_report(out) if steps else None
    if cluster is not None:
        out = compression_pipeline(None, cluster)(out)
    report = {
        "prune": [p.describe() for p in steps],
        "cluster": cluster.describe() if cluster is not None else None,
        "before": before,
        "after": model_stats(out),
        "sparsity": sparsity,
        "channels": _main_attr(out, CHANNELS_ATTR) or None,
        "clustered": _main_attr(out, CLUSTER_ATTR) or None,
    }
    return out, report
