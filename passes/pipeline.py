"""The static int8 flow as a pass ``Sequential`` and as the Relax pipeline ``"tvmq"``.

Phases (each a ``tvm.transform.Pass``):

1. prepare -- ``CanonicalizeBindings`` + ``DeadCodeElimination``: drops the importers'
   no-op bindings (``max_pool2d``'s unused index tuple) so quantizable sites and the ops
   between them are stable. Calibration lists sites on the prepared module too.
2. annotate -- :class:`AnnotateQDQ` with calibrated activation parameters (skipped when
   none are given: the module is then expected to be in QDQ form already).
3. fold -- :class:`FoldQuantScales`: int8 weight constants, batch_norm folding.
4. lower -- :class:`LowerInt8`: int8 x int8 -> int32 matmul / conv2d; integer residual
   add, concat, relu6 / clip and requantize.
5. build (pipeline only, optional) -- ``LegalizeOps`` + fusion (the stock ``"zero"``
   pipeline), then the stock ``"default_build"`` pipeline, so the result can be passed
   to ``tvm.compile(..., relax_pipeline=...)``.

``relax.get_pipeline("tvmq")`` (no arguments; also ``tvm.compile(mod, target,
relax_pipeline="tvmq")``) lowers a module already in QDQ form and builds it;
``relax.get_pipeline("tvmq", activation_qparams=..., scheme=...)`` quantizes a float
module with calibrated parameters first (``tvmq.quantization.collect.collect_activation_qparams``
computes them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import tvm
from tvm import relax

from .annotate_qdq import AnnotateQDQ
from .fold_quant_scales import FoldQuantScales
from .lower_int8 import LowerInt8

PIPELINE_NAME = "tvmq"


def prepare_passes() -> tvm.transform.Pass:
    """Phase 1: canonical bindings, no dead code (site names are defined on this form)."""
    return tvm.transform.Sequential(
        [relax.transform.CanonicalizeBindings(), relax.transform.DeadCodeElimination()],
        name="tvmq.prepare",
    )


def static_int8_passes(
    activation_qparams: Mapping[str, tuple[float, int]] | None = None, scheme=None
) -> tvm.transform.Pass:
    """The static int8 passes, prepare to lower, as one ``Sequential`` (no build phase).

    Parameters
    ----------
    activation_qparams : Mapping[str, tuple[float, int]], optional
        Site name -> calibrated ``(scale, zero_point)``; None for a module already in QDQ form.
    scheme : Int8Static, optional
        Activation dtype, weight granularity, skip list and requantize mode.
    """
    passes = [prepare_passes()]
    if activation_qparams is not None:
        passes.append(AnnotateQDQ(activation_qparams, scheme))
    passes += [FoldQuantScales(), LowerInt8(scheme)]
    return tvm.transform.Sequential(passes, name="tvmq.static_int8")


def tvmq_pipeline(
    activation_qparams: Mapping[str, tuple[float, int]] | None = None,
    scheme=None,
    *,
    build: bool = True,
    fuse: bool = True,
) -> tvm.transform.Pass:
    """The ``"tvmq"`` Relax pipeline: :func:`static_int8_passes`, then the stock lowering.

    Parameters
    ----------
    activation_qparams, scheme
        As in :func:`static_int8_passes`.
    build : bool
        Append the stock ``"default_build"`` pipeline (what ``tvm.compile`` runs by default).
    fuse : bool
        Legalize and fuse (the stock ``"zero"`` pipeline) before building, so the
        elementwise requantize ops become one kernel with their producer.
    """
    passes = [static_int8_passes(activation_qparams, scheme)]
    if build:
        if fuse:
            passes.append(relax.get_pipeline("zero"))
        passes.append(relax.get_pipeline("default_build"))
    return tvm.transform.Sequential(passes, name=PIPELINE_NAME)


def _register() -> None:
    # ValueError: already registered (the module was imported twice).
    with contextlib.suppress(ValueError):
        relax.register_pipeline(PIPELINE_NAME)(tvmq_pipeline)


_register()
