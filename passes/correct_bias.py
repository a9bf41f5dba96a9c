"""CorrectBias: add a per-channel correction to each named layer's bias (static int8).

Runs on the prepared float module, before ``AnnotateQDQ``. The corrections come from
empirical bias correction (``tvmq.quantization.bias_correction``: the expected output error
``E[W x] - E[W_q x_q]`` of each layer over the calibration data); this pass only applies
them, so the Relax pipeline ``"tvmq"`` reproduces a bias-corrected compile from its
parameters. For a site ``y = matmul(x, W)`` / ``conv2d(x, W)``:

- read by exactly one ``add`` with a constant float32 bias of one value per output
  channel: that constant becomes ``bias + c``;
- otherwise a bias is added: ``y = add(op(x, W), c)`` (shape ``[N]`` for matmul,
  ``[1, N, 1, 1]`` for conv2d).

Site names do not change (the op keeps its binding var). The corrected bias then goes
through the normal static int8 flow: ``LowerInt8`` folds it into the int32 accumulator
offset.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.errors import TvmqError

from .relax_utils import (
    binding_map,
    const_f32,
    const_value,
    op_name,
    relax_functions,
    site_prefix,
    update_functions,
    user_counts,
)
from .sites import list_weight_sites


def _const_bias(expr, bindings, channels: int, kind: str) -> np.ndarray | None:
    value = const_value(expr, bindings)
    if value is None or value.dtype != np.float32 or value.size != channels:
        return None
    if kind == "matmul":
        ok = value.shape[-1:] == (channels,)
    else:
        ok = value.shape in ((1, channels, 1, 1), (channels, 1, 1))
    return value if ok else None


@mutator
class _BiasUpdater(PyExprMutator):
    def __init__(self, mod, new_bias: dict, add_after: dict):
        super().__init__(mod)
        self.new_bias = new_bias  # add binding var -> (index of the constant arg, new const)
        self.add_after = add_after  # op binding var -> correction constant

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var in self.new_bias:
            index, const = self.new_bias[var]
            args = [self.visit_expr(a) for a in binding.value.args]
            args[index] = const
            value = self.builder_.normalize(relax.op.add(*args))
            self.builder_.emit_normalized(relax.VarBinding(var, value))
        elif var in self.add_after:
            out = self.builder_.emit(self.visit_expr(binding.value))
            value = self.builder_.normalize(relax.op.add(out, self.add_after[var]))
            self.builder_.emit_normalized(relax.VarBinding(var, value))
        else:
            super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="CorrectBias")
class CorrectBias:
    """Add ``corrections[site]`` (one value per output channel) to each site's bias.

    Parameters
    ----------
    corrections : mapping of str to array
        Site name (``matmul_0``, ``conv2d_3``; ``fn/matmul_0`` outside ``main``) -> the
        per-output-channel correction. A name that is no site, or a length that is not the
        site's output channels, raises ``TvmqError``.
    """

    def __init__(self, corrections: Mapping[str, np.ndarray]):
        self.corrections = {
            k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in corrections.items()
        }

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not self.corrections:
            return mod
        updates, found = {}, set()
        for gv, func in relax_functions(mod):
            sites = [
                s for s in list_weight_sites(func, site_prefix(gv)) if s.name in self.corrections
            ]
            found.update(s.name for s in sites)
            if sites:
                updates[gv] = self._correct(mod, func, sites)
        missing = sorted(set(self.corrections) - found)
        if missing:
            raise TvmqError(f"CorrectBias: no matmul / conv2d layer named {', '.join(missing)}")
        return update_functions(mod, updates)

    def _correct(self, mod, func: relax.Function, sites) -> relax.Function:
        bindings = binding_map(func)
        users = user_counts(func)
        adds: dict = {}
        for var, value in bindings.items():
            if op_name(value) == "relax.add":
                for arg in value.args:
                    if isinstance(arg, relax.Var):
                        adds.setdefault(arg, []).append(var)
        new_bias, add_after = {}, {}
        for site in sites:
            c = self.corrections[site.name]
            channels = site.weight.shape[site.weight_axis]
            if c.size != channels:
                raise TvmqError(
                    f"CorrectBias: {site.name} has {channels} output channels, its correction {c.size}"
                )
            readers = adds.get(site.var, [])
            if users.get(site.var, 0) == 1 and len(readers) == 1:
                add = bindings[readers[0]]
                other = 1 if add.args[0].same_as(site.var) else 0
                bias = _const_bias(add.args[other], bindings, channels, site.kind)
                if bias is not None:
                    fixed = bias.astype(np.float64) + c.reshape(bias.shape)
                    new_bias[readers[0]] = (other, const_f32(fixed))
                    continue
            shape = (channels,) if site.kind == "matmul" else (1, channels, 1, 1)
            add_after[site.var] = const_f32(c.reshape(shape))
        return _BiasUpdater(mod, new_bias, add_after).visit_expr(func)
