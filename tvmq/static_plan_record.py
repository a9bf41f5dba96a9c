"""The build side of :mod:`tvmq.static_plan`: the plan of a lowered ``main``, recorded by
the last Relax pass of a CPU build, which also adds the plan's constants function, and the
source of the native function that makes the plan's calls (:func:`runner_source`)."""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax

from tvmq.passes.relax_utils import main_function, ordered_bindings
from tvmq.static_plan import (
    CONSTANTS_FUNCTION,
    PLAN_VERSION,
    RUNNER_FUNCTION,
    TIMED_RUNNER_FUNCTION,
    plan_digest,
)

# Calls of the lowered main that only check or release (the plan's buffers are checked and
# kept by the runtime itself)
_SKIPPED_OPS = ("relax.null_value", "relax.vm.kill_object")
_SKIPPED_PACKED = ("vm.builtin.check_tensor_info", "vm.builtin.match_shape")
# TVM FFI's prefix of a library function's symbol (tvm/ffi/extra/module.h)
SYMBOL_PREFIX = "__tvm_ffi_"


class _NotStatic(Exception):
    """The lowered main does something a static plan does not express."""


def _ints(shape: relax.ShapeExpr) -> list[int]:
    if not isinstance(shape, relax.ShapeExpr):
        raise _NotStatic("a shape that is not a shape expression")
    values = []
    for v in shape.values:
        if not isinstance(v, tvm.tirx.IntImm):
            raise _NotStatic("a symbolic shape")
        values.append(int(v.value))
    return values


def _int(expr) -> int:
    if not isinstance(expr, tvm.tirx.IntImm):
        raise _NotStatic("a symbolic scalar")
    return int(expr.value)


def _dtype(expr) -> str:
    value = getattr(expr, "value", None)
    if value is None or isinstance(value, tvm.runtime.Tensor):
        raise _NotStatic("a dtype that is not a constant")
    return str(value)


class _Extractor:
    """Walks the lowered main once, naming every tensor by a reference: ``p<i>`` (a
    parameter), ``c<i>`` (a constant), ``t<i>`` (a tensor the plan makes)."""

    def __init__(self, mod: tvm.IRModule):
        self.mod = mod
        self.refs: dict[relax.Var, Any] = {}  # var -> ref, or list of refs (a tuple)
        self.storage: dict[relax.Var, int] = {}  # var -> storage index
        self.storage_bytes: list[int] = []
        self.tensors: list[list] = []  # [source, shape, dtype]: a view of a storage or ref
        self.kernels: list[str] = []
        self.steps: list[list] = []
        self.constants: list[tvm.ir.Constant] = []
        self._constant_index: dict[tvm.ir.Constant, int] = {}  # by node

    def plan(self, main: relax.Function) -> dict:
        for i, p in enumerate(main.params):
            self.refs[p] = f"p{i}"
        if not isinstance(main.body, relax.SeqExpr):
            raise _NotStatic("a body that is not a sequence")
        for binding in ordered_bindings(main):
            if not isinstance(binding, relax.VarBinding):
                raise _NotStatic("a match_cast")
            self.bind(binding.var, binding.value)
        result = self.value(main.body.body)
        outputs = result if isinstance(result, list) else [result]
        if not all(isinstance(o, str) for o in outputs):
            raise _NotStatic("a nested tuple output")
        return {
            "version": PLAN_VERSION,
            "storage": self.storage_bytes,
            "tensors": self.tensors,
            "kernels": self.kernels,
            "steps": self.steps,
            "outputs": outputs,
            "constants": len(self.constants),
        }

    def value(self, expr):
        """The ref (or list of refs) of an operand."""
        if isinstance(expr, relax.Var):
            if expr not in self.refs:
                raise _NotStatic("a var that is not a tensor")
            return self.refs[expr]
        if isinstance(expr, tvm.ir.Constant) and isinstance(
            getattr(expr, "value", None), tvm.runtime.Tensor
        ):
            index = self._constant_index.setdefault(expr, len(self.constants))
            if index == len(self.constants):
                self.constants.append(expr)
            return f"c{index}"
        if isinstance(expr, relax.Tuple):
            return [self.value(f) for f in expr.fields]
        raise _NotStatic(f"an operand of type {type(expr).__name__}")

    def view(self, source: str, shape: list[int], dtype: str) -> str:
        self.tensors.append([source, shape, dtype])
        return f"t{len(self.tensors) - 1}"

    def bind(self, var: relax.Var, value: relax.Expr) -> None:
        if isinstance(value, relax.Var | relax.Tuple):
            self.refs[var] = self.value(value)
            return
        if not isinstance(value, relax.Call):
            raise _NotStatic(f"a binding of {type(value).__name__}")
        op = value.op
        if isinstance(op, tvm.ir.Op):
            name = op.name
            if name in _SKIPPED_OPS:
                return
            if name == "relax.vm.alloc_storage":
                size, device, _, scope = value.args
                if _int(device) != 0 or getattr(scope, "value", None) != "global":
                    raise _NotStatic("storage on another device or scope")
                (nbytes,) = _ints(size)
                self.storage[var] = len(self.storage_bytes)
                self.storage_bytes.append(nbytes)
                return
            if name == "relax.vm.alloc_tensor":
                storage, offset, shape, dtype, _ = value.args
                if storage not in self.storage or _int(offset) != 0:
                    raise _NotStatic("a tensor at an offset in its storage")
                source = f"s{self.storage[storage]}"
                self.refs[var] = self.view(source, _ints(shape), _dtype(dtype))
                return
            raise _NotStatic(f"operator {name}")
        if isinstance(op, relax.ExternFunc):
            name = op.global_symbol
            if name in _SKIPPED_PACKED:
                return
            if name == "vm.builtin.reshape":
                source, shape = value.args
                dtype = var.ty.dtype if isinstance(var.ty, relax.TensorType) else None
                if dtype is None:
                    raise _NotStatic("a reshape of unknown dtype")
                self.refs[var] = self.view(self.value(source), _ints(shape), str(dtype))
                return
            raise _NotStatic(f"packed function {name}")
        if isinstance(op, tvm.ir.GlobalVar) and isinstance(self.mod[op], tvm.tirx.PrimFunc):
            attrs = self.mod[op].attrs
            symbol = str(attrs["global_symbol"]) if attrs and "global_symbol" in attrs else None
            if symbol is None:
                raise _NotStatic("a kernel without a symbol")
            args = [self.value(a) for a in value.args]
            if not all(isinstance(a, str) for a in args):
                raise _NotStatic("a kernel called with a tuple")
            if symbol not in self.kernels:
                self.kernels.append(symbol)
            self.steps.append([self.kernels.index(symbol), args])
            return
        raise _NotStatic(f"a call of {type(op).__name__}")


def extract(mod: tvm.IRModule) -> tuple[dict, list[tvm.ir.Constant]] | None:
    """The plan of a lowered module's ``main`` and its constants, or None when ``main``
    is not static straight-line code."""
    main = main_function(mod)
    if not isinstance(main, relax.Function):
        return None
    try:
        extractor = _Extractor(mod)
        return extractor.plan(main), extractor.constants
    except _NotStatic:
        return None


def record_plan(into: list) -> tvm.transform.Pass:
    """The last Relax pass of a CPU build: extracts the plan of the lowered ``main`` (appended
    to ``into``), and adds :data:`CONSTANTS_FUNCTION` to the module when there is one."""

    @tvm.transform.module_pass(opt_level=0, name="tvmq.RecordStaticPlan")
    def _record(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        found = extract(mod)
        if found is None:
            return mod
        plan, constants = found
        into.append(plan)
        digest = tvm.ir.StringImm(plan_digest(plan))
        func = relax.Function([], relax.Tuple([digest, *constants]), is_pure=False)
        func = func.with_attr("global_symbol", CONSTANTS_FUNCTION)
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        out[CONSTANTS_FUNCTION] = func
        return out

    return _record


def runner_source(plan: dict) -> str:
    """C++ source of :data:`~tvmq.static_plan.RUNNER_FUNCTION` and
    :data:`~tvmq.static_plan.TIMED_RUNNER_FUNCTION` for a plan, compiled into the model's
    library by :func:`tvmq.build.export_library`: the plan's kernel calls made in order from
    native code. A call from Python costs ~0.5-1 us a kernel (MobileNetV2 int8's 66 calls: 4%
    of its 1.9 ms on one thread), from here a few nanoseconds.

    The runner's one argument is the address of the operands' object handles (uint64), all
    steps' one after another, which :class:`~tvmq.static_plan.PlanRunner` keeps alive; each
    kernel is called by its symbol in the same library (TVM FFI's packed calling convention).
    The timed runner takes a second address, of ``steps + 1`` int64 where it writes the
    monotonic clock (ns) before the first call and after each (:func:`tvmq.profiling.profile_kernels`)."""
    kernels = [SYMBOL_PREFIX + k for k in plan["kernels"]]
    steps = plan["steps"]
    widest = max(len(args) for _, args in steps)
    table = ",\n".join(f"    {{{k}, {len(args)}}}" for k, args in steps)
    signature = "void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result"
    return "\n".join(
        [
            "// The static call plan of a tvmq model, in order (tvmq/static_plan_record.py).",
            "#include <time.h>",
            "#include <tvm/ffi/c_api.h>",
            'extern "C" {',
            *(f"int32_t {k}(void*, const TVMFFIAny*, int32_t, TVMFFIAny*);" for k in kernels),
            "typedef int32_t (*tvmq_kernel)(void*, const TVMFFIAny*, int32_t, TVMFFIAny*);",
            f"static const tvmq_kernel tvmq_kernels[{len(kernels)}] = {{{', '.join(kernels)}}};",
            f"static const int32_t tvmq_steps[{len(steps)}][2] = {{",  # kernel, operands
            table,
            "};",
            "static int64_t tvmq_now_ns(void) {",
            "  struct timespec t;",
            "  clock_gettime(CLOCK_MONOTONIC, &t);",
            "  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;",
            "}",
            "static int32_t tvmq_run(const uint64_t* handle, int64_t* stamps) {",
            f"  TVMFFIAny operands[{widest}];",
            "  if (stamps) stamps[0] = tvmq_now_ns();",
            f"  for (int32_t s = 0; s < {len(steps)}; ++s) {{",
            "    const int32_t n = tvmq_steps[s][1];",
            "    for (int32_t i = 0; i < n; ++i) {",
            "      operands[i].type_index = kTVMFFITensor;",
            "      operands[i].zero_padding = 0;",
            "      operands[i].v_obj = (TVMFFIObject*)(uintptr_t)*handle++;",
            "    }",
            "    TVMFFIAny ret;",
            "    ret.type_index = kTVMFFINone;",
            "    ret.zero_padding = 0;",
            "    ret.v_int64 = 0;",
            "    const int32_t rc = tvmq_kernels[tvmq_steps[s][0]](0, operands, n, &ret);",
            "    if (rc != 0) return rc;",
            "    if (stamps) stamps[s + 1] = tvmq_now_ns();",
            "  }",
            "  return 0;",
            "}",
            f"TVM_FFI_DLL_EXPORT int32_t {SYMBOL_PREFIX}{RUNNER_FUNCTION}({signature}) {{",
            "  return tvmq_run((const uint64_t*)(uintptr_t)args[0].v_int64, 0);",
            "}",
            f"TVM_FFI_DLL_EXPORT int32_t {SYMBOL_PREFIX}{TIMED_RUNNER_FUNCTION}({signature}) {{",
            "  return tvmq_run((const uint64_t*)(uintptr_t)args[0].v_int64,",
            "                  (int64_t*)(uintptr_t)args[1].v_int64);",
            "}",
            "}",
            "",
        ]
    )
