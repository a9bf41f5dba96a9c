"""Build a Relax module for a :class:`~tvmq.targets.TargetPreset` and export it as a ``.so``.

:func:`build` is the last step of every tvmq flow: it runs the target's Relax pipeline
(legalize, fuse, schedule, lower) and links the virtual-machine executable.
:func:`export_library` writes that executable as one shared library for the board, linked
with the preset's (cross) compiler.

Tuned and default schedules
    :func:`build` runs in three phases: fuse the model into TIR kernels (:func:`fuse_to_tir`,
    also what :func:`tvmq.tuning.tune` extracts its tasks from), give kernels with a
    MetaSchedule tuning record their tuned schedule (``build_with_info``'s ``tuning_logs``;
    :func:`tvmq.compile` reads ``./tuning_logs/<preset>/`` and the logs shipped with tvmq),
    then schedule the rest and lower. Kernels already scheduled (``tirx.is_scheduled``: tuned,
    or emitted scheduled by a tvmq pass such as the VNNI int8 dense) are left alone. The
    others get a default schedule:

    * CUDA: the dlight GPU rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback), as in
      TVM's own CUDA pipeline, except that Matmul is skipped for integer matmuls, on which it
      crashes in TVM 0.27 (those fall through to the other rules: slow but built).
    * CPU (llvm): TVM's CPU pipeline (which, unlike ``relax.build``'s default, fuses
      operators) plus :class:`tvmq.cpu_schedule.CPUDefaultSchedule`, a cheap parallel + SIMD schedule. It made
      untuned float MLPs, CNNs and a transformer block 13 to 30x faster than TVM's
      unscheduled loops on x86; the dlight CPU rules (GEMV, Reduction) measured slower and
      are not used.

Weights decoded at load
    A CPU build of a model with shared weights (``--cluster``) stores each weight as a
    codebook and 4- or 8-bit codes and decodes it once, when the library is loaded
    (:class:`tvmq.passes.DecodeAtLoad`: ``main_transform_params``, which
    :func:`tvmq.runtime.load` runs): the kernels are those of the float (or int8) model.

CUDA device code
    Always PTX compiled by ``nvcc`` for the preset's ``arch``, embedded in the library
    (:mod:`tvmq.cuda_ptx`), so the board needs no CUDA compiler.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import tvm
from tvm import relax, tirx

from tvmq import tuning
from tvmq.cuda_ptx import PTXImportPacker, compile_cuda_sources, nvcc_compiles_cuda
from tvmq.errors import TvmqError
from tvmq.kernels.cpu_winograd import PANELS_ATTR
from tvmq.kernels.cuda_mma import ASYNC_COPY, TENSOR_CORE_ATTR
from tvmq.lowering import fuse_to_tir, schedule_and_lower
from tvmq.passes import DecodeAtLoad
from tvmq.passes.cluster_weights import ATTR as CLUSTERED
from tvmq.passes.int8_as_float import ATTR as INT8_AS_FLOAT
from tvmq.passes.relax_utils import RESHAPE, binding_map, main_function, op_name, resolve
from tvmq.sizes import constant_bytes_by_dtype
from tvmq.static_plan_record import record_plan, runner_source
from tvmq.targets import TargetPreset, get_target
from tvmq.toolchain import find_compiler

if TYPE_CHECKING:
    from tvm.s_tir.meta_schedule import Database

__all__ = ["BuildInfo", "build", "build_with_info", "export_library", "fuse_to_tir"]

TuningLogs: TypeAlias = 'Literal["auto"] | str | os.PathLike | Database | Sequence | None'
"""Where :func:`build_with_info` reads tuning records: see its ``tuning_logs``."""


def build(
    mod: tvm.IRModule,
    target: TargetPreset | str,
    *,
    tuning_logs: TuningLogs = None,
) -> tvm.relax.VMExecutable:
    """Compile a Relax module for a target preset.

    Parameters
    ----------
    mod : tvm.IRModule
        A Relax module, e.g. from ``tvm.relax.frontend.torch.from_exported_program``, possibly
        already transformed (quantized, pruned) by other tvmq passes.
    target : TargetPreset or str
        The preset, or anything :func:`tvmq.targets.get_target` accepts.
    tuning_logs : "auto", path, Database or a sequence of them, optional
        MetaSchedule records to schedule kernels with (see :func:`build_with_info`). The
        default, None, uses none: every kernel gets the default schedule.

    Returns
    -------
    tvm.relax.VMExecutable
        Runnable here with ``relax.VirtualMachine`` when the preset is this machine's kind;
        otherwise pass it to :func:`export_library`.

    Raises
    ------
    TvmqError
        When TVM fails to compile the model (the message keeps TVM's), or when ``nvcc`` is
        missing or rejects the generated CUDA code.
    """
    return build_with_info(mod, target, tuning_logs=tuning_logs)[0]


def build_with_info(
    mod: tvm.IRModule,
    target: TargetPreset | str,
    *,
    tuning_logs: TuningLogs = "auto",
    int8_weight_codes: bool = False,
) -> tuple[tvm.relax.VMExecutable, BuildInfo]:
    """:func:`build`, applying tuning records, and say which kernels were tuned.

    Kernels with a record in ``tuning_logs`` (same workload, same target CPU or GPU) get the
    best tuned schedule; the others get tvmq's default schedule, as in :func:`build`.

    Parameters
    ----------
    mod : tvm.IRModule
        As for :func:`build`.
    target : TargetPreset or str
        As for :func:`build`.
    tuning_logs : "auto", path, Database or a sequence of them, optional
        ``"auto"`` (the default) reads ``./tuning_logs/<preset>/`` (what
        :func:`tvmq.tuning.tune` writes by default) and the logs shipped with tvmq for the
        preset; a path is a folder with ``database_workload.json`` and
        ``database_tuning_record.json``; None applies no records.
    int8_weight_codes : bool, optional
        Store the int8 weights that :class:`~tvmq.passes.Int8AsFloat` made float32 (int8
        models on x86 without avx512vnni) as 8-bit codes decoded at load
        (``main_transform_params``, see :func:`tvmq.runtime.decoded_params`), so the library
        keeps its int8 size, and the Winograd convs' weights in their 3x3 form, transformed at
        load (16/9 the bytes otherwise); ``tvmq.compile``'s libraries do. Off by default:
        ``main`` then takes the model's inputs only (a clustered model's codes are always
        stored so).

    Returns
    -------
    (tvm.relax.VMExecutable, BuildInfo)
        The executable, and which kernels were tuned and which got the default schedule.

    Raises
    ------
    TvmqError
        As for :func:`build`, and for a log folder that does not exist or cannot be read.
    """
    preset = get_target(target)
    tvm_target = preset.tvm_target()
    is_cuda = preset.kind == "cuda"
    database, log_dirs = tuning.open_tuning_logs(tuning_logs, preset)
    hook = nvcc_compiles_cuda(tvm_target) if is_cuda else contextlib.nullcontext()
    try:
        with hook, tvm_target:
            fused = fuse_to_tir(mod, preset)
            if _decode_at_load(mod, fused, preset, int8_weight_codes):
                fused = DecodeAtLoad()(fused)
            prescheduled = _scheduled_kernels(fused)
            if database is not None:
                with database:
                    fused = relax.transform.MetaScheduleApplyDatabase()(fused)
            scheduled = _scheduled_kernels(fused)
            plans: list[dict] = []
            pipeline = schedule_and_lower(tvm_target)
            if not is_cuda:  # a GPU model runs on the VM (its buffers are device memory)
                pipeline = tvm.transform.Sequential([pipeline, record_plan(plans)])
            with _kernel_build_config(async_copy=is_cuda):
                ex = relax.build(fused, target=tvm_target, relax_pipeline=pipeline)
    except TvmqError:
        raise
    except Exception as err:  # TVM raises many error types; a failed build is the user's to see
        raise TvmqError(
            f"building the model for target {preset.name!r} failed: {type(err).__name__}: {err}"
        ) from err
    if is_cuda:
        # Compile any CUDA source left in the executable now, so nvcc errors surface here.
        compile_cuda_sources(ex.mod, tvm_target, preset.name)
    kernels = _kernel_names(fused)
    info = BuildInfo(
        tuned=tuple(k for k in kernels if k in scheduled and k not in prescheduled),
        default=tuple(k for k in kernels if k not in scheduled),
        prescheduled=tuple(k for k in kernels if k in prescheduled),
        tuning_logs=tuple(str(d) for d in log_dirs),
        symbolic_default=tuple(k for k in _symbolic_matmul_kernels(fused) if k not in scheduled),
        # after FoldConstant: the constants the executable embeds (decoded ones included)
        weights=tuple(constant_bytes_by_dtype(fused).items()),
        tensor_core=_tensor_core_kernels(fused),
        fresh_outputs=fresh_outputs(fused),
        plan=plans[0] if plans else None,
    )
    return ex, info


@dataclass(frozen=True)
class BuildInfo:
    """How the kernels (TIR functions) of a build were scheduled.

    ``tuned``: from tuning records; ``default``: tvmq's default schedule (or TVM's plain
    loops where it does not apply); ``prescheduled``: kernels tvmq's passes emit already
    scheduled (e.g. the VNNI int8 dense), which tuning leaves alone; ``tuning_logs``: the
    record folders consulted. ``weights``: (dtype, bytes) of the constants the executable
    embeds (not part of :meth:`to_json`; ``model.json`` keeps them in ``notes["weights"]``).
    """

    tuned: tuple[str, ...]
    default: tuple[str, ...]
    prescheduled: tuple[str, ...] = ()
    tuning_logs: tuple[str, ...] = ()
    weights: tuple[tuple[str, int], ...] = field(default=(), compare=False)
    # matmul / conv kernels with symbolic (dynamic) shapes that no tvmq kernel pass took:
    # they run on TVM's default lowering (tvmq's default schedule where it applies)
    symbolic_default: tuple[str, ...] = ()
    # kernels that run on tensor cores (tvmq's mma.sync kernels), each with its instruction
    tensor_core: tuple[tuple[str, str], ...] = ()
    # every output is a tensor the VM allocates anew on each call (:func:`fresh_outputs`)
    fresh_outputs: bool = field(default=False, compare=False)
    # the kernel calls of a static main, for the runtime to make without the VM
    # (:mod:`tvmq.static_plan`); None when main is not static straight-line code
    plan: dict | None = field(default=None, compare=False)

    def summary(self) -> str:
        """One line, e.g. ``"2 tuned, 1 default"`` (plus any prescheduled kernels)."""
        text = f"{len(self.tuned)} tuned, {len(self.default)} default"
        if self.prescheduled:
            text += f", {len(self.prescheduled)} prescheduled"
        return text

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data, for a manifest."""
        return {
            "tuned": list(self.tuned),
            "default": list(self.default),
            "prescheduled": list(self.prescheduled),
            "tuning_logs": list(self.tuning_logs),
            **({"symbolic_default": list(self.symbolic_default)} if self.symbolic_default else {}),
            **({"tensor_core": dict(self.tensor_core)} if self.tensor_core else {}),
        }


def _symbolic_matmul_kernels(mod: tvm.IRModule) -> list[str]:
    """Kernels named after a matmul / conv whose buffers have a symbolic dim."""
    names = []
    for gv, func in mod.functions_items():
        name = gv.name_hint
        if not isinstance(func, tvm.tirx.PrimFunc) or not any(
            op in name for op in ("matmul", "conv", "dense")
        ):
            continue
        shapes = [p.ty.shape for p in func.params if isinstance(p.ty, tvm.tirx.BufferType)]
        if any(not isinstance(d, tvm.tirx.IntImm) for shape in shapes for d in shape):
            names.append(name)
    return sorted(names)


# Linker options for every exported library (GNU ld and lld both take them):
# * -s: debug info and the symbol table are a third of a small model's library and nothing
#   at run time needs them (TVM finds kernels through the dynamic symbols, kept by -s).
# * -z noseparate-code: x86-64 GNU ld otherwise puts the headers, the code and the read-only
#   data (the weights) in separate segments, each padded to a 4 KiB page: up to 8 KiB of
#   zeros per library. With it the read-only data shares the executable segment, which is
#   what GNU ld does on AArch64 (and lld everywhere) anyway.
# * -z norelro: RELRO pads the writable segment (GOT, dynamic table) to a page boundary so
#   that it can be made read-only after loading: 3 to 4 KiB of zeros on x86-64, up to
#   24 KiB on AArch64 (64 KiB pages), to protect a GOT of one or two entries (the TVM
#   error and parallel-launch functions).
# The code and the weights are unchanged: only padding goes, not anything the model runs.
_LINK_OPTIONS = ("-s", "-Wl,-z,noseparate-code", "-Wl,-z,norelro")


def _runner_file(plan: dict, folder: Path) -> str:
    """The plan's native runner as a C++ file in ``folder``."""
    source = folder / "tvmq_plan_run.cc"
    source.write_text(runner_source(plan))
    return str(source)


def _ffi_include_dirs() -> list[str]:
    """TVM FFI's C API headers (``tvm/ffi/c_api.h`` and the DLPack header it includes)."""
    from tvm_ffi import libinfo

    return [libinfo.find_include_path(), libinfo.find_dlpack_include_path()]


def export_library(
    ex: tvm.relax.VMExecutable,
    path: str | os.PathLike,
    target: TargetPreset | str,
    plan: dict | None = None,
) -> None:
    """Write a built executable as one shared library for the target.

    Parameters
    ----------
    ex : tvm.relax.VMExecutable
        The result of :func:`build` for the same target.
    path : str or os.PathLike
        The ``.so`` to write. Load it on the target with ``tvm.runtime.load_module`` and run
        it with ``relax.VirtualMachine(lib, preset.device())``.
    target : TargetPreset or str
        The preset the executable was built for; its ``cc`` links the library (the system
        default C++ compiler when ``cc`` is null).
    plan : dict, optional
        The build's static call plan (:attr:`BuildInfo.plan`): the library then also holds
        the native function that makes its calls
        (:func:`tvmq.static_plan_record.runner_source`), compiled by the same ``cc``.

    Raises
    ------
    TvmqError
        When the preset's cross compiler is not installed (the message names the Debian
        package), or when compiling or linking fails.
    """
    preset = get_target(target)
    kwargs = {"options": list(_LINK_OPTIONS)}
    if preset.cc is not None:
        kwargs["cc"] = find_compiler(preset.cc, preset.name)
    if preset.kind == "cuda":
        kwargs["fpack_imports"] = PTXImportPacker(preset)
    path = Path(path)
    try:
        with tempfile.TemporaryDirectory(prefix="tvmq-export-") as tmp:
            if plan is not None:
                kwargs["addons"] = [_runner_file(plan, Path(tmp))]
                kwargs["options"] += ["-O2", *(f"-I{d}" for d in _ffi_include_dirs())]
            ex.mod.export_library(str(path), workspace_dir=tmp, **kwargs)
    except TvmqError:
        raise
    except Exception as err:  # linker and packer failures come in several types
        raise TvmqError(
            f"exporting the model for target {preset.name!r} to {path} failed: "
            f"{type(err).__name__}: {err}"
        ) from err


# --------------------------------------------------------------------------------------
# Pipelines


@contextlib.contextmanager
def _kernel_build_config(async_copy: bool = False) -> Iterator[None]:
    """Build kernels without TVM's argument checks (``tirx.disable_assert``) and, with
    ``async_copy``, with ``cp.async`` copies in pipelined CUDA kernels.

    Every TIR kernel gets a wrapper that checks each argument's type, rank, dtype, device,
    shape and strides: 1.6 to 3 KB of code per kernel, most of a small model's code (the int8
    MLP's six kernels: 14 of 18 KB). Only the virtual machine calls the kernels, with tensors
    it allocated from the shapes it checked itself: the model's inputs are still checked by
    the VM (``check_tensor_info`` / ``match_shape``) and by :func:`tvmq.load`.

    ``async_copy`` (CUDA builds): software-pipelined kernels (the tensor-core kernels'
    ``stages``) copy global to shared memory with ``cp.async``
    (:data:`~tvmq.kernels.cuda_mma.ASYNC_COPY`).
    """
    current = tvm.transform.PassContext.current()
    config = {**dict(current.config), "tirx.disable_assert": True}
    if async_copy:
        config.update(ASYNC_COPY)
    with tvm.transform.PassContext(opt_level=current.opt_level, config=config):
        yield


def _decode_at_load(
    mod: tvm.IRModule, fused: tvm.IRModule, preset: TargetPreset, int8_codes: bool
) -> bool:
    """Whether the library stores constants as codes decoded at load: for a CPU build of a
    model with shared weights (``"tvmq.clustered"`` on ``main``), whose weights after fusion
    hold only their codebooks' values (``FoldTableDecoders``, ``ClusterInt8Weights``), or,
    with ``int8_codes``, of an int8 model whose weights became float32 (``Int8AsFloat``'s
    mark on the fused ``main``: at most 256 values each) or one with Winograd convs (whose
    panels, 16/9 the size of the 3x3 weights, are computed from them at load)."""

    def marked(module: tvm.IRModule, attr: str) -> bool:
        attrs = getattr(main_function(module), "attrs", None)
        return attrs is not None and attr in attrs

    if preset.kind == "cuda":
        return False
    winograd = any(
        PANELS_ATTR in (f.attrs or {})
        for _, f in fused.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc)
    )
    return marked(mod, CLUSTERED) or (int8_codes and (marked(fused, INT8_AS_FLOAT) or winograd))


_KERNEL_CALLS = ("relax.call_tir", "relax.call_dps_packed")


def _is_view(expr: relax.Expr, mod: tvm.IRModule) -> bool:
    """A reshape: ``R.reshape``, or a reshape kernel that TVM's lowering turns back into
    one (``RewriteDataflowReshape``), which the VM runs as a view of its operand."""
    if op_name(expr) == RESHAPE:
        return True
    if op_name(expr) != "relax.call_tir" or not isinstance(expr.args[0], tvm.ir.GlobalVar):
        return False
    func = mod[expr.args[0]]
    if not isinstance(func, tirx.PrimFunc):
        return False
    try:
        return bool(relax.analysis.has_reshape_pattern(func))
    except (RuntimeError, ValueError):  # a hand-built kernel (no root block): not a reshape
        return False


def fresh_outputs(mod: tvm.IRModule) -> bool:
    """Whether every output of ``main`` is a tensor its own kernel call writes (directly or
    through reshapes), none shared between outputs: the VM then allocates each output anew
    on every call, so the caller may keep it without a copy. False for an output that is an
    input, a constant, an in-place kernel's operand or anything this does not recognise."""
    main = main_function(mod)
    if not isinstance(main, relax.Function) or not isinstance(main.body, relax.SeqExpr):
        return False
    bindings = binding_map(main)
    result = resolve(main.body.body, bindings)
    outputs = result.fields if isinstance(result, relax.Tuple) else [result]
    roots = []
    for out in outputs:
        expr, index = resolve(out, bindings), None
        while _is_view(expr, mod):
            expr = resolve(expr.args[0] if op_name(expr) == RESHAPE else expr.args[1][0], bindings)
        if isinstance(expr, relax.TupleGetItem):
            expr, index = resolve(expr.tuple_value, bindings), expr.index
        if op_name(expr) not in _KERNEL_CALLS:
            return False
        roots.append((expr, index))
    return not any(e.same_as(f) and i == j for k, (e, i) in enumerate(roots) for f, j in roots[:k])


def _kernel_names(mod: tvm.IRModule) -> list[str]:
    """Names of the TIR functions of a module, sorted."""
    return sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


def _tensor_core_kernels(mod: tvm.IRModule) -> tuple[tuple[str, str], ...]:
    """(name, instruction) of the TIR functions marked as tensor-core kernels, sorted."""
    return tuple(
        sorted(
            (gv.name_hint, str(f.attrs[TENSOR_CORE_ATTR]))
            for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and f.attrs is not None and TENSOR_CORE_ATTR in f.attrs
        )
    )


def _scheduled_kernels(mod: tvm.IRModule) -> set[str]:
    """Names of the TIR functions already marked ``tirx.is_scheduled``."""
    return {
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, tirx.PrimFunc) and f.attrs is not None and f.attrs.get("tirx.is_scheduled")
    }
