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

With int8 quantization, the pipeline shares the int8 weights' values after quantizing
inside static int8 quantization instead (``int8_cluster_params``: ``ClusterInt8Weights``,
an int8 codebook per tensor).

and returns the module plus a report (sparsity per weight, channels removed, clusters,
parameters, multiply-accumulates and constant bytes before/after).
"""

from __future__ import annotations

from collections.abc import Sequence

import tvm

from tvmq.core.compression import ClusterConfig, PruneConfig, SparseConfig
from tvmq.errors import TvmqError
from tvmq.passes import ClusterWeights, PruneChannels, PruneMagnitude, PruneNM
from tvmq.passes.analysis import constant_bytes, count_macs, count_params, sparsity_report
from tvmq.passes.cluster_weights import ATTR as CLUSTER_ATTR
from tvmq.passes.prune_channels import ATTR as CHANNELS_ATTR
from tvmq.passes.site_names import check_skip

__all__ = [
    "ClusterConfig",
    "PruneConfig",
    "SparseConfig",
    "apply_compression",
    "cluster_pass",
    "clustered_layers",
    "int8_cluster_params",
    "compression_pipeline",
    "model_stats",
    "prune_pass",
]


def prune_pass(config: PruneConfig) -> tvm.transform.Pass:
    """The Relax pass of one pruning step."""
    if config.method == "magnitude":
        return PruneMagnitude(config.sparsity, config.scope, config.min_size, config.skip)
    if config.method == "n:m":
        return PruneNM(config.n, config.m, config.strict, config.skip)
    return PruneChannels(config.ratio, config.norm, config.skip)


def cluster_pass(config: ClusterConfig) -> tvm.transform.Pass:
    """The Relax pass of a weight-sharing config."""
    return ClusterWeights(config.bits, config.init, config.min_size, config.seed, config.skip)


def int8_cluster_params(config: ClusterConfig) -> dict:
    """The ``int8_cluster`` parameter of ``static_int8_passes`` (``ClusterInt8Weights``'
    arguments) for a config: an int8 codebook of ``2**bits`` entries per tensor."""
    if config.bits > 4:
        raise TvmqError(f"int8 weights share at most 16 values, got {2**config.bits}")
    return {
        "bits": config.bits,
        "init": config.init,
        "min_size": config.min_size,
        "seed": config.seed,
    }


def clustered_layers(mod: tvm.IRModule) -> dict | None:
    """What ``ClusterWeights`` / ``ClusterInt8Weights`` recorded on ``main`` (plain Python)."""
    return _main_attr(mod, CLUSTER_ATTR) or None


def as_prune_list(prune) -> list[PruneConfig]:
    """`prune` (None, a PruneConfig or a list of them) as a list; TvmqError otherwise."""
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
    steps = as_prune_list(prune)
    if cluster is not None and not isinstance(cluster, ClusterConfig):
        raise TvmqError(f"cluster must be a ClusterConfig, got {cluster!r}")
    structured = [prune_pass(p) for p in steps if p.method == "channels"]
    unstructured = [prune_pass(p) for p in steps if p.method != "channels"]
    return tvm.transform.Sequential(
        [
            # Phase 1: remove channels (shapes shrink; later passes see the small weights).
            *structured,
            # Phase 2: zero weights in place.
            *unstructured,
            # Phase 3: share weights; keeps exact zeros, so it runs after pruning.
            cluster_pass(cluster) if cluster is not None else tvm.transform.Sequential([]),
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

    steps = as_prune_list(prune)
    compression_pipeline(steps, cluster)  # validates
    for config in [*steps, *([cluster] if cluster is not None else [])]:
        check_skip(mod, config.skip)
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
        "clustered": clustered_layers(out),
    }
    return out, report
