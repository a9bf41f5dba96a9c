"""SmoothQuant: move activation outlier channels into the weights before int8 quantization.

SmoothQuant (Xiao et al. 2023) on a float Relax module, before static int8 calibration.
For each selected matmul site ``y = x @ W`` (``W`` a constant ``[K, N]``) with calibrated
per-input-channel ranges ``max|x_k|`` it writes::

    s_k  = max|x_k| ** alpha / max_n |W_kn| ** (1 - alpha)     # clipped to [1e-5, 1e5]
    x'   = multiply(x, 1 / s)                                   # per channel (last axis)
    y    = matmul(x', diag(s) @ W)                              # the new weight constant

which is the same function in float (up to rounding): ``(x / s) @ (s W) = x @ W``. A
transformer's outlier channels (all-MiniLM-L6-v2's LayerNorm outputs reach ~28 on a few
channels while most stay below 1) then no longer set the per-tensor activation scale;
the weight, quantized per output channel, absorbs them. The ``1 / s`` multiply is an
elementwise op on the float activation that the activation's quantize absorbs when the
module is built. Each site gets its own multiply (sites that read one tensor -- Q, K, V
-- each scale it by their own ``s``).

The site's activation is then the smoothed tensor: calibrate *after* this pass. Site
names do not change (the matmul keeps its place and its binding var). Conv2d sites and
sites without statistics are left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tvm
from tvm import relax

from tvmq.core.selectors import check_site_selector
from tvmq.errors import TvmqError

from .relax_utils import binding_map, const_f32, relax_functions, site_prefix, with_span
from .sites import list_weight_sites, selects

ATTR = "tvmq.smoothed"
_S_MIN, _S_MAX, _EPS = 1e-5, 1e5, 1e-5


def smoothing_factors(absmax: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """Per input channel ``s_k = max|x_k| ** alpha / max|W_k| ** (1 - alpha)`` (float64).

    ``absmax`` is ``[K]``; ``weight`` is the matmul's ``[K, N]`` weight.
    """
    a = np.maximum(np.asarray(absmax, dtype=np.float64), _EPS)
    w = np.maximum(np.abs(np.asarray(weight, dtype=np.float64)).max(axis=1), _EPS)
    return np.clip(a**alpha / w ** (1.0 - alpha), _S_MIN, _S_MAX)


def _alphas(alpha) -> list[tuple[str, float]]:
    """``[(selector, alpha), ...]``: a float means every site."""
    if isinstance(alpha, int | float) and not isinstance(alpha, bool):
        pairs = [("*", float(alpha))]
    else:
        try:
            pairs = [(sel, float(a)) for sel, a in alpha]
        except (TypeError, ValueError):
            raise TvmqError(
                f"SmoothQuant alpha must be a number or (site selector, alpha) pairs, got {alpha!r}"
            ) from None
    for sel, a in pairs:
        check_site_selector(sel, "SmoothQuant site selector")
        if not 0.0 <= a <= 1.0:
            raise TvmqError(f"SmoothQuant alpha must be in [0, 1], got {a} for {sel!r}")
    return pairs


@tvm.transform.module_pass(opt_level=0, name="SmoothQuant")
class SmoothQuant:
    """SmoothQuant the matmul sites with activation statistics (see the module docstring).

    Parameters
    ----------
    absmax : mapping of str to array
        Site name -> ``max |x|`` per input channel (the activation's last axis) over the
        calibration data (``tvmq.quantization.collect.collect_channel_absmax``).
    alpha : float or sequence of (selector, float)
        Migration strength in [0, 1]; pairs give it per site selector (``"after:layer_norm"``,
        ``"matmul_3"``...; the first matching pair wins, unmatched sites are left alone).
    """

    def __init__(self, absmax: Mapping[str, np.ndarray], alpha=0.5):
        self.absmax = {k: np.asarray(v) for k, v in absmax.items()}
        self.alphas = _alphas(alpha)

    def alpha_for(self, site, bindings) -> float | None:
        """The alpha of `site`, or None when no selector picks it."""
        return next((a for sel, a in self.alphas if selects(site, (sel,), bindings)), None)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        new_mod = None
        for gv, func in relax_functions(mod):
            new = self._smooth(func, site_prefix(gv))
            if new is not None:
                new_mod = new_mod or mod.clone()
                new_mod[gv] = new
        return mod if new_mod is None else new_mod

    def _smooth(self, func: relax.Function, prefix: str) -> relax.Function | None:
        bindings = binding_map(func)
        plans = {}
        for site in list_weight_sites(func, prefix):
            if site.kind != "matmul" or site.name not in self.absmax:
                continue
            alpha = self.alpha_for(site, bindings)
            if alpha is None:
                continue
            absmax = self.absmax[site.name].reshape(-1)
            if absmax.shape[0] != site.weight.shape[0]:
                raise TvmqError(
                    f"SmoothQuant: {site.name} has {site.weight.shape[0]} input channels but "
                    f"its statistics have {absmax.shape[0]}"
                )
            plans[site.var] = (site, smoothing_factors(absmax, site.weight, alpha))
        if not plans:
            return None
        bb = relax.BlockBuilder()
        blocks = []
        for block in func.body.blocks:
            out = []
            var_cls = relax.DataflowVar if isinstance(block, relax.DataflowBlock) else relax.Var
            for b in block.bindings:
                plan = plans.get(b.var) if isinstance(b, relax.VarBinding) else None
                if plan is None:
                    out.append(b)
                    continue
                site, s = plan
                x = bb.normalize(relax.op.multiply(site.activation, const_f32(1.0 / s)))
                x_var = var_cls(f"{b.var.name}_smoothed", x.ty)
                w = (site.weight.astype(np.float64) * s[:, None]).astype("float32")
                mm = relax.op.matmul(x_var, relax.const(w), "float32")
                mm = bb.normalize(with_span(mm, site.call.span))  # keeps its layer names
                out += [relax.VarBinding(x_var, x), relax.VarBinding(b.var, mm)]
            blocks.append(type(block)(out))
        names = [site.name for site, _ in plans.values()]
        old = [str(n) for n in func.attrs[ATTR]] if func.attrs and ATTR in func.attrs else []
        new = relax.Function(
            func.params,
            relax.SeqExpr(blocks, func.body.body),
            func.ret_ty,
            func.is_pure,
            func.attrs,
        )
        return new.with_attr(ATTR, [*old, *names])


def smooth_sites(func: relax.Function, selectors: Sequence[tuple[str, float]]) -> list[str]:
    """Names of the matmul sites of `func` that SmoothQuant with these (selector, alpha) pairs
    would smooth, given statistics for every site (what calibration must observe)."""
    pairs = _alphas(selectors)
    bindings = binding_map(func)
    return [
        s.name
        for s in list_weight_sites(func)
        if s.kind == "matmul" and any(selects(s, (sel,), bindings) for sel, _ in pairs)
    ]
