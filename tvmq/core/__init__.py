"""tvmq's core layer: what both the passes and the driver build on, and nothing else.

- :mod:`tvmq.core.qmath` -- numpy reference quantization math.
- :mod:`tvmq.core.schemes` -- quantization schemes (``Int8Static``, ``Int8Dynamic``,
  ``WeightOnly``): small frozen dataclasses that validate themselves.
- :mod:`tvmq.core.compression` -- pruning / weight-sharing configs (``PruneConfig``,
  ``ClusterConfig``).
- :mod:`tvmq.core.selectors` -- the site-selector syntax of ``skip`` lists (``"matmul_3"``,
  ``"conv2d_*"``, ``"linear"``, ``"after:gelu"``).
- :mod:`tvmq.core.observers` -- the names of calibration observers a scheme may ask for.

``tvmq.errors`` and the hand-written TIR kernels (``tvmq.kernels``) are core too. Core
modules import only each other, ``tvm`` and ``numpy``: never ``tvmq.passes`` or the driver
(``tests/test_layers.py`` checks it). Nothing is imported here, so ``import tvmq.core.qmath``
loads only what it needs.
"""
