"""The model's own layer names, recorded on the weight-bearing ops of an imported module.

tvmq names its sites ``matmul_0``, ``conv2d_3`` (``tvmq.passes.sites``); users know their
layers as ``encoder.0.fc`` (a PyTorch module path) or ``/encoder/encoder.0/fc/Gemm`` (an
ONNX node name). The frontends find those names here and record them on each matmul /
conv2d call's span (``tvmq.passes.site_names.tag_layer_names``), where every pass that
rebuilds the call keeps them, so skip lists and reports can use them.

* PyTorch (``torch.export``): the program is imported with its parameters as Relax inputs,
  so each matmul / conv2d reads its weight from a parameter named as in the program
  (``p_encoder_0_fc_weight``); the graph signature gives the parameter's FQN
  (``encoder.0.fc.weight``) and ``nn_module_stack`` of the aten op using it the module
  path. The layer name is the FQN without ``.weight``, or the using module's path when the
  weight belongs to another module (tied weights). Then the parameters are bound as
  constants, which gives the module the plain import would.
* ONNX: each weight constant is matched to the initializer (or ``Constant`` node) with the
  same bytes, then to the one MatMul / Gemm / Conv node reading it. Names: the node's name,
  the module path the PyTorch dynamo exporter writes in its metadata, and the initializer's
  name without ``.weight`` (``encoder.0.fc``), so one pattern fits the PyTorch model and its
  ONNX export. A weight whose bytes several initializers share gets no name.
"""

from __future__ import annotations

import ast
import hashlib
import re

import numpy as np
import tvm
from tvm import relax

_WEIGHT_OPS_TORCH = {
    "linear", "mm", "addmm", "matmul", "bmm", "conv1d", "conv2d", "conv_transpose2d", "convolution"
}  # fmt: skip
_VIEWS_TORCH = {"t", "permute", "transpose", "view", "reshape", "_unsafe_view", "detach", "clone"}
_WEIGHT_OPS_ONNX = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
_VIEWS_ONNX = {"Transpose", "Reshape", "Identity", "Cast", "Flatten", "Squeeze", "Unsqueeze"}
# Initializer names exporters make up (torch's legacy exporter, onnxscript): they say nothing.
_MADE_UP = re.compile(r"onnx::.*|val_\d+")
_LOOK_THROUGH = ("relax.permute_dims", "relax.reshape")
# Weight ops named besides the sites: a transposed conv becomes a matmul site in
# prepare_passes (ConvTransposeAsMatmul), which keeps its span (the name).
_NAMED_OPS = ("relax.nn.conv2d_transpose",)


# --- PyTorch ---------------------------------------------------------------------------------


def _aten_name(node) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", "") if packet is not None else ""


def _module_paths(placeholder) -> set[str]:
    """Module paths (``nn_module_stack``) of the weight ops reading `placeholder`."""
    paths, todo, seen = set(), list(placeholder.users), set()
    while todo:
        node = todo.pop()
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        name = _aten_name(node)
        if name in _VIEWS_TORCH:
            todo.extend(node.users)
        elif name in _WEIGHT_OPS_TORCH:
            stack = node.meta.get("nn_module_stack") or {}
            entries = list(stack.values())
            paths.add(str(entries[-1][0]) if entries else "")
    return paths


def torch_layer_names(ep) -> dict[str, str]:
    """Placeholder name of each parameter (``p_fc1_weight``) -> its layer's name (``fc1``)."""
    params = dict(ep.graph_signature.inputs_to_parameters)
    out = {}
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in params:
            continue
        fqn = params[node.name]
        paths = _module_paths(node)
        if len(paths) == 1 and (path := paths.pop()) and not fqn.startswith(f"{path}."):
            out[node.name] = path  # a weight tied from another module: name the user
        else:
            out[node.name] = fqn.removesuffix(".weight")
    return out


def _weight_calls(func: relax.Function):
    """(call, what its weight reads, seen through permute_dims / reshape) per matmul / conv2d
    (and transposed conv)."""
    from tvmq.passes.relax_utils import binding_map, op_name, ordered_bindings, resolve
    from tvmq.passes.sites import SITE_OPS

    bindings = binding_map(func)
    for b in ordered_bindings(func):
        op = op_name(b.value)
        if (op in SITE_OPS or op in _NAMED_OPS) and len(b.value.args) == 2:
            src = resolve(b.value.args[1], bindings)
            while op_name(src) in _LOOK_THROUGH:
                src = resolve(src.args[0], bindings)
            yield b.value, src


def name_and_bind_torch_params(mod: tvm.IRModule, ep) -> tvm.IRModule:
    """`mod` (imported with ``keep_params_as_input=True``) with its weight ops named and its
    parameters bound as constants, as a plain import binds them."""
    import torch

    from tvmq.passes.site_names import tag_layer_names

    main = mod["main"]
    names = torch_layer_names(ep)
    tags = {}
    for call, src in _weight_calls(main):
        if isinstance(src, relax.Var) and src.name in names:
            tags[call] = (names[src.name],)
    mod = tag_layer_names(mod, tags)
    values = ep.state_dict
    kind = torch.export.graph_signature.InputKind.PARAMETER
    binding = {
        spec.arg.name: _tvm_tensor(values[spec.target])
        for spec in ep.graph_signature.input_specs
        if spec.kind is kind
    }
    mod = relax.transform.BindParams("main", binding)(mod)
    func = mod["main"]
    for key in ("num_input", "params"):
        if func.attrs is not None and key in func.attrs:
            func = func.without_attr(key)
    mod["main"] = func
    return mod


def _tvm_tensor(t) -> tvm.runtime.Tensor:
    t = t.detach().contiguous()
    try:
        return tvm.runtime.from_dlpack(t)
    except (RuntimeError, BufferError):
        return tvm.runtime.tensor(t.numpy())


# --- ONNX ------------------------------------------------------------------------------------


def _key(array: np.ndarray) -> tuple:
    data = np.ascontiguousarray(array)
    return data.dtype.str, data.shape, hashlib.sha1(data.tobytes()).digest()


def _named_tensors(graph):
    """(name, TensorProto) of the graph's initializers and Constant nodes' values."""
    for init in graph.initializer:
        yield init.name, init
    for node in graph.node:
        if node.op_type == "Constant" and not node.domain:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    yield node.output[0], attr.t


def _weight_nodes(readers: dict, tensor: str) -> list:
    """The MatMul / Gemm / Conv nodes reading `tensor`, through transposes and reshapes."""
    found, todo, seen = [], [tensor], set()
    while todo:
        name = todo.pop()
        for node in readers.get(name, []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in _VIEWS_ONNX:
                todo.extend(node.output)
            elif node.op_type in _WEIGHT_OPS_ONNX:
                found.append(node)
    return found


def _scope_path(node) -> str:
    """The module path the PyTorch dynamo exporter records in a node's metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            return str(scopes[-2]) if isinstance(scopes, list) and len(scopes) >= 2 else ""
    return ""


def onnx_layer_names(model, mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` (imported from the ONNX `model`) with each weight op tagged with its names."""
    from onnx import numpy_helper

    from tvmq.passes.relax_utils import relax_functions
    from tvmq.passes.site_names import tag_layer_names

    calls = []
    for _, func in relax_functions(mod):
        for call, src in _weight_calls(func):
            if isinstance(src, tvm.ir.Constant):
                calls.append((call, _key(src.value.numpy())))
    wanted = {(k[0], k[1]) for _, k in calls}
    by_key: dict[tuple, list[str]] = {}
    for name, proto in _named_tensors(model.graph):
        dims = tuple(int(d) for d in proto.dims)
        if not any(shape == dims for _, shape in wanted):
            continue
        array = numpy_helper.to_array(proto)
        if (array.dtype.str, array.shape) in wanted:
            by_key.setdefault(_key(array), []).append(name)
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    tags = {}
    for call, key in calls:
        found = by_key.get(key, [])
        if len(found) != 1:
            continue
        tensor = found[0]
        nodes = _weight_nodes(readers, tensor)
        names = [nodes[0].name, _scope_path(nodes[0])] if len(nodes) == 1 else []
        if not _MADE_UP.fullmatch(tensor):
            names.append(tensor.removesuffix(".weight"))
        tags[call] = tuple(dict.fromkeys(n for n in names if n))
    return tag_layer_names(mod, tags)
