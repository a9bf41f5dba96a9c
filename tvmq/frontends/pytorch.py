"""PyTorch frontend: ``torch.nn.Module`` + example inputs -> Relax, through ``torch.export``."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from tvmq.errors import TvmqError, UnsupportedOperatorError
from tvmq.frontends import pt2e
from tvmq.frontends.model import ImportedModel, signature_of

_MISSING_OPS = re.compile(r"Unsupported function types \[(.*)\]")


def _as_tensors(example_inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor | np.ndarray):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, Sequence) or not example_inputs:
        raise TvmqError(
            "example_inputs must be a tensor or a non-empty tuple of tensors "
            f"(one per forward() argument), got {type(example_inputs).__name__}"
        )
    out = []
    for i, x in enumerate(example_inputs):
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise TvmqError(f"example input {i} is a {type(x).__name__}, not a tensor")
        out.append(x)
    return tuple(out)


def _name_unsupported(ep: torch.export.ExportedProgram, message: str) -> str:
    """Turn the importer's list of missing aten ops into: op, node and source line."""
    match = _MISSING_OPS.search(message)
    ops = [s.strip(" '\"") for s in match.group(1).split(",")] if match else []
    for node in ep.graph.nodes:
        name = getattr(node.target, "__name__", "")
        if node.op == "call_function" and name in ops:
            trace = (node.meta.get("stack_trace") or "").strip().splitlines()
            where = f" ({trace[-2].strip()})" if len(trace) >= 2 else ""
            return (
                f"operator {name} at node '{node.name}'{where} is not supported by "
                f"TVM's PyTorch frontend (all unsupported: {', '.join(ops)})"
            )
    return f"operators not supported by TVM's PyTorch frontend: {', '.join(ops) or message}"


def from_pytorch(
    module: torch.nn.Module,
    example_inputs,
    *,
    input_names: Sequence[str] | None = None,
) -> ImportedModel:
    """Import a PyTorch module with static input shapes taken from ``example_inputs``.

    The module is put in eval mode and exported with ``torch.export.export``; weights
    become ``relax.Constant`` nodes of ``mod["main"]``.

    Parameters
    ----------
    module : torch.nn.Module
        The float model.
    example_inputs : tensor or tuple of tensors
        One example per ``forward`` argument; their shapes and dtypes become the
        compiled model's (static) input signature.
    input_names : sequence of str, optional
        Names for the inputs in the manifest; default: the ``forward`` argument names.
    """
    if not isinstance(module, torch.nn.Module):
        raise TvmqError(f"expected a torch.nn.Module, got {type(module).__name__}")
    args = _as_tensors(example_inputs)
    module = module.eval()
    try:
        # torch.export's pytree code emits FutureWarnings about its own internals.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ep = torch.export.export(module, args)
    except Exception as e:  # torch's own message says what cannot be traced
        raise TvmqError(f"torch.export could not trace {type(module).__name__}: {e}") from e
    if input_names is not None and len(input_names) != len(args):
        raise TvmqError(f"{len(input_names)} input names given for {len(args)} inputs")
    return from_exported(ep, input_names=input_names)


def _drop_legacy_empty_cat_operands(ep: torch.export.ExportedProgram) -> None:
    """Remove the empty 1-D operands of ``aten.cat`` (in place).

    torch skips a legacy empty tensor (shape ``[0]``) among the operands of ``cat`` whatever
    their rank; transformers' KV caches start from one (GPT-2 with ``use_cache``), and TVM's
    importer rejects the mixed ranks ("Concat expects all input tensors to have same ndim").
    Dropping them changes nothing torch computes.
    """
    graph = ep.graph_module.graph
    changed = False
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.cat.default:
            continue
        operands = node.args[0]

        def legacy_empty(arg) -> bool:
            val = getattr(arg, "meta", {}).get("val")
            return isinstance(val, torch.Tensor) and val.dim() == 1 and val.numel() == 0

        kept = [a for a in operands if not legacy_empty(a)]
        if kept and len(kept) < len(operands):
            node.args = (kept, *node.args[1:])
            changed = True
    if changed:
        ep.graph_module.recompile()


def _pt2e_options(ep: torch.export.ExportedProgram) -> dict:
    """Importer options for a PT2E program (quantize / dequantize ops); none for others."""
    if not any(pt2e.is_quantized_op(n) for n in ep.graph.nodes):
        return {}
    # Decomposed here, not by the importer: the converters read this very program's buffers.
    ep = ep.run_decompositions()
    return {
        "exported_program": ep,
        "custom_convert_map": pt2e.convert_map(ep),
        "run_ep_decomposition": False,
    }


def from_exported(
    ep: torch.export.ExportedProgram, *, input_names: Sequence[str] | None = None
) -> ImportedModel:
    """Import a ``torch.export`` program (e.g. one loaded from a ``.pt2`` file).

    Each matmul / conv2d carries its layer's module path (``encoder.0.fc``; see
    :mod:`tvmq.frontends.layer_names`), which skip lists and reports use.
    """
    from tvm.relax.frontend.torch import from_exported_program

    from tvmq.frontends.layer_names import name_and_bind_torch_params
    from tvmq.passes.drop_matmul_broadcasts import DropMatmulBroadcasts

    _drop_legacy_empty_cat_operands(ep)
    pt2e.check_supported(ep)
    try:
        with warnings.catch_warnings():  # decompositions re-trigger torch's own FutureWarnings
            warnings.simplefilter("ignore", FutureWarning)
            # Parameters stay inputs until named: each weight op then says which it reads.
            options = {"exported_program": ep, **_pt2e_options(ep)}
            mod = from_exported_program(keep_params_as_input=True, **options)
    except AssertionError as e:
        raise UnsupportedOperatorError(_name_unsupported(ep, str(e))) from e
    # Linear on a non-contiguous input comes as expand + bmm: a plain matmul on the weight,
    # before naming, so that it is named as its layer
    mod = DropMatmulBroadcasts()(mod)
    mod = name_and_bind_torch_params(mod, options["exported_program"])
    inputs, outputs = signature_of(mod["main"], list(input_names) if input_names else None)
    return ImportedModel(mod, inputs, outputs, source="pytorch")
