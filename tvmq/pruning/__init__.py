"""Pruning while training in PyTorch: sparsity schedules and a magnitude pruner.

The Relax-level passes (``PruneMagnitude``, ``PruneNM``, ``PruneChannels``) live in
``tvmq.passes``; ``tvmq.compression.apply_compression`` runs them.
"""

from tvmq.pruning.schedule import (
    ConstantSparsity,
    MagnitudePruner,
    PolynomialDecay,
    magnitude_mask,
    prunable_weights,
)

__all__ = [
    "ConstantSparsity",
    "MagnitudePruner",
    "PolynomialDecay",
    "magnitude_mask",
    "prunable_weights",
]
