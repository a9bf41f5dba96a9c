"""The ``tvmq`` subcommands: each ``cmd_*`` takes the parsed arguments, returns the exit status.

Everything heavy (TVM, the frontends, numpy) is imported inside the command that needs it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tvmq.cli_dump import dump_files, write_dumps
from tvmq.cli_options import (
    UsageError,
    check_calibration_headers,
    check_compile_args,
    check_target_name,
    compression_configs,
    input_shape_options,
    load_arrays,
    make_scheme,
    sparse_config,
)


def cmd_targets(args) -> int:
    from tvmq.targets import list_targets

    presets = list_targets()
    width = max(len(t.name) for t in presets)
    for t in presets:
        print(f"{t.name:<{width}}  {t.description}")
    return 0


def cmd_compile(args) -> int:
    import dataclasses

    import tvmq

    check_compile_args(args)  # standard library only: a bad option costs no import
    input_shapes = input_shape_options(args)
    dump = dump_files(args)
    from tvmq.progress import collapsed_native_warnings, phase, phases

    model, accuracy = args.model, None
    with phases(not args.quiet), collapsed_native_warnings():
        check_calibration_headers(args)
        phase("load TVM", not args.quiet)
        from tvmq.targets import get_target

        preset = get_target(args.target)
        prune, cluster = compression_configs(args)
        if args.skip:  # and the scheme's skip (make_scheme)
            prune = prune and dataclasses.replace(prune, skip=tuple(args.skip))
            if not args.quantize:  # with --quantize, the scheme's skip keeps them out of both
                cluster = cluster and dataclasses.replace(cluster, skip=tuple(args.skip))
        if args.accuracy_drop is not None:  # the eval data is checked against the model
            from tvmq.evaluation import load_top1_eval
            from tvmq.frontends import import_model
            from tvmq.quantization import AccuracyControl

            phase("import", not args.quiet)
            model = import_model(args.model, input_shapes=input_shapes)
            eval_fn = load_top1_eval(args.eval, model.inputs, model.outputs)
            accuracy = AccuracyControl(eval_fn=eval_fn, max_drop=args.accuracy_drop)
        art = tvmq.compile(
            model,
            preset,
            output_dir=args.output,
            input_shapes=input_shapes,
            prune=prune,
            cluster=cluster,
            sparse=sparse_config(args),
            quantize=make_scheme(args, preset),
            calibration_data=args.calib,
            bias_correction=args.bias_correction,
            accuracy_control=accuracy,
            precision=args.precision,
            tuning_logs=None if args.no_tuning_logs else (args.tuning_logs or "auto"),
            progress=not args.quiet,
        )
    lib = art.manifest.library
    print(
        f"wrote {art.output_dir} ({lib['file']}: {lib['bytes'] / 1024:.1f} KiB, target {args.target})"
    )
    _warn_if_low_sqnr(art.manifest.compression.get("quantize", {}))
    for path in write_dumps(art, dump):
        print(f"wrote {path}")
    if args.report:
        from tvmq.report import write_report

        print(f"wrote {write_report(art.output_dir)} (+ .json, .csv)")
    return 0


def _warn_if_low_sqnr(quantized: dict) -> None:
    """One warning line when static int8's output SQNR is below LOW_SQNR_DB, naming the
    worst layers and the remedies: no silent garbage."""
    from tvmq.quantization.report import LOW_SQNR_DB

    sqnr = [v for v in quantized.get("output_sqnr_db") or [] if v is not None]
    scheme = quantized.get("scheme") or {}
    if not sqnr or min(sqnr) >= LOW_SQNR_DB or scheme.get("scheme") != "Int8Static":
        return
    scored = sorted(
        (layer["output_sqnr_db"], layer["name"])
        for layer in quantized.get("layers", [])
        if layer.get("quantized") and layer.get("output_sqnr_db") is not None
    )[:3]
    worst = ", ".join(f"{name} ({db:.1f} dB)" for db, name in scored) or "not measured"
    skip = " ".join(f"--skip {name}" for _, name in scored) or "--skip LAYER"
    other = "" if scheme.get("observer") == "auto" else "another observer (--observer auto), "
    print(
        f"tvmq: warning: int8 output SQNR {min(sqnr):.1f} dB < {LOW_SQNR_DB:g} dB, the outputs "
        f"are far from float's; worst layers: {worst}. Try {other}keeping them float ({skip}), "
        "or accuracy control (--accuracy-drop X --eval data.npz)",
        file=sys.stderr,
    )


def _open_model(args):
    """The compiled model, loaded here or (with --rpc) on a board; and the board session."""
    if args.key and not args.rpc:
        raise UsageError("--key selects boards at an RPC tracker: give --rpc HOST:PORT too")
    import tvmq
    from tvmq.errors import TvmqError

    if not args.rpc:
        return tvmq.load(args.model_dir), None
    from tvmq.manifest import Manifest
    from tvmq.rpc import RemoteModel, connect
    from tvmq.targets import get_target

    key = args.key
    if key is None:
        name = Manifest.read(args.model_dir).target.get("name")
        try:
            key = get_target(name).rpc_key
        except TvmqError:
            key = None
        if not key:
            raise TvmqError(f"target {name!r} has no rpc_key: give the boards' key with --key")
    session = connect(*args.rpc, key, timeout=args.rpc_timeout)
    try:
        return RemoteModel(args.model_dir, session), session
    except BaseException:
        session.close()
        raise


def cmd_run(args) -> int:
    if args.profile and args.rpc:
        raise UsageError("--profile times kernels here; it cannot be combined with --rpc yet")
    if args.key and not args.rpc:
        raise UsageError("--key selects boards at an RPC tracker: give --rpc HOST:PORT too")
    import numpy as np

    from tvmq.frontends.model import format_shape
    from tvmq.output_file import check_output_file, write_file_atomically
    from tvmq.runtime import output_summary

    if args.output:
        check_output_file(args.output)  # before running: a bad -o fails fast
    model, session = _open_model(args)
    try:
        inputs = load_arrays(args.input, model.inputs)
        outs = model(*inputs)
    finally:
        if session is not None:
            session.close()
    outs = outs if isinstance(outs, tuple) else (outs,)
    for spec, x in zip(model.inputs, inputs, strict=True):
        if spec.symbols:  # a dynamic input: the compiled shape and this run's
            print(f"{spec.name}: compiled for {format_shape(spec.shape)}, ran {np.shape(x)}")
    for spec, y in zip(model.outputs, outs, strict=True):
        print(output_summary(spec, y))
    if args.output:
        arrays = {s.name: y for s, y in zip(model.outputs, outs, strict=True)}
        write_file_atomically(args.output, lambda f: np.savez(f, **arrays))
        print(f"wrote {args.output}")
    if args.profile:
        from tvmq.profiling import format_profile, profile_kernels

        print(f"kernel times (medians of 10 timed runs of each kernel alone, {model.device}):")
        print(format_profile(profile_kernels(model, inputs), args.profile))
    return 0


def cmd_bench(args) -> int:
    model, session = _open_model(args)
    try:
        inputs = load_arrays(args.input, model.inputs) if args.input else None
        stats = model.benchmark(inputs, warmup=args.warmup, repeat=args.repeat)
        where = session.describe() if session is not None else str(model.device)
    finally:
        if session is not None:
            session.close()
    name = model.manifest.target.get("name")
    print(f"{args.model_dir} on {name} ({where}): {stats.repeat} runs after {args.warmup} warm-up")
    dims = sorted({d for s in model.inputs for d in s.symbols})
    if dims and not args.input:
        print(f"  symbolic dims {', '.join(dims)} set to 1 (give -i inputs.npz for other sizes)")
    print(
        f"  median {stats.median_ms:.4f} ms   p90 {stats.p90_ms:.4f} ms   min {stats.min_ms:.4f} ms"
    )
    return 0


def check_tune_args(args) -> None:
    """The option combinations of ``tvmq tune``, before any import (standard library only)."""
    if args.import_dir is not None:
        if args.model is not None or args.offline or args.rpc or args.repair:
            raise UsageError("--import takes only the offline round's folder (and --work-dir)")
        return
    if args.repair:
        if args.model is not None:
            raise UsageError("--repair takes no model: give the folder with --work-dir")
        if args.rpc or args.key:
            raise UsageError("--repair rewrites a local record folder; drop --rpc / --key")
        return
    if args.model is None:
        raise UsageError("give the model file to tune (or --repair to fix a record folder)")
    if not Path(args.model).exists():
        raise UsageError(f"{args.model}: no such file")
    check_target_name(args.target)
    if args.key and not args.rpc:
        raise UsageError("--key selects boards at an RPC tracker: give --rpc HOST:PORT too")
    if args.offline and args.rpc:
        raise UsageError("--offline measures nothing, so it takes no --rpc tracker")


def cmd_tune(args) -> int:
    check_tune_args(args)
    from tvmq.errors import TvmqError
    from tvmq.targets import get_target
    from tvmq.tuning import TuningFailed, default_work_dir, repair, tune
    from tvmq.tuning_records import check_work_dir

    if args.repair:
        work_dir = args.work_dir or default_work_dir(args.target)
        print(repair(work_dir).summary())
        return 0
    if args.import_dir is not None:
        from tvmq.tuning_offline import import_timings

        print(import_timings(args.import_dir, args.work_dir).summary())
        return 0
    if args.work_dir is not None:  # before the model import: a typo should fail in a second
        check_work_dir(Path(args.work_dir))
    rpc = None
    if args.rpc:
        key = args.key or get_target(args.target).rpc_key
        if not key:
            raise TvmqError(
                f"target {args.target!r} has no rpc_key: give the boards' key with --key"
            )
        rpc = (*args.rpc, key, args.rpc_timeout)
        from tvmq.rpc import connect

        # Check the tracker and a board before anything is imported or written.
        connect(*args.rpc, key, timeout=args.rpc_timeout).close()
    from tvmq.frontends import import_model

    model = import_model(args.model, input_shapes=input_shape_options(args))
    try:
        report = tune(
            model,
            args.target,
            work_dir=args.work_dir,
            trials=args.trials,
            trials_per_task=args.trials_per_task,
            rpc=rpc,
            progress=not args.quiet,
            cost_model=args.cost_model,
            offline=args.offline,
        )
    except TuningFailed as failed:
        print(failed.report.summary())  # the table on stdout; the one-line error on stderr
        raise
    print(report.summary())
    return 0


def cmd_bundle(args) -> int:
    from tvmq.bundle import make_bundle

    bundle = make_bundle(
        args.model_dir, args.output, python=args.python, tvm_runtime=args.tvm_runtime
    )
    print(bundle.summary())
    return 0


def cmd_inspect(args) -> int:
    from tvmq.errors import TvmqError

    path = Path(args.path)
    if path.is_dir():
        from tvmq.manifest import Manifest
        from tvmq.runtime import verified_library

        manifest = Manifest.read(path)
        verified_library(path, manifest)  # a swapped or damaged model.so is news, not a detail
        print(json.dumps(manifest.to_json(), indent=2))
        return 0
    if not path.exists():
        raise TvmqError(f"{path}: no such file or directory")
    from collections import Counter

    from tvmq.frontends import import_model

    m = import_model(path, input_shapes=input_shape_options(args))
    print(f"{path} ({m.source})")
    for s in m.inputs:  # symbolic dims by name: [batch, 128]
        print(f"  input  {s.name}: [{', '.join(map(str, s.shape))}] {s.dtype}")
    for s in m.outputs:
        print(f"  output {s.name}: [{', '.join(map(str, s.shape))}] {s.dtype}")
    ops = Counter(_relax_ops(m.mod))
    print("  operators: " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))
    _print_layers(m.mod)
    if args.ir:
        print(m.mod.script(show_meta=False))
    return 0


def _print_layers(mod) -> None:
    """The weight layers with the names --skip matches: tvmq's, then the model's own."""
    from tvmq.passes.site_names import layer_table

    rows = layer_table(mod)
    if not rows:
        return
    print("  layers (--skip takes any of these names, or a pattern):")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        shape = "x".join(str(d) for d in r["weight_shape"])
        own = ", ".join(r["layer_names"]) or "-"
        print(f"    {r['name']:<{width}}  {own}  ({r['kind']}, weight {shape})")


def _relax_ops(mod) -> list[str]:
    import tvm
    from tvm import relax

    found = []

    @relax.expr_functor.visitor
    class _Ops(relax.PyExprVisitor):
        def visit_call_(self, call):
            if isinstance(call.op, tvm.ir.Op):
                found.append(call.op.name.removeprefix("relax."))
            super().visit_call_(call)

    _Ops().visit_expr(mod["main"])
    return found


def cmd_report(args) -> int:
    from tvmq.report import write_report

    path = write_report(
        args.model_dir,
        args.output,
        eval_data=args.eval,
        profile=not args.no_profile,
        repeat=args.repeat,
    )
    print(f"wrote {path} (+ .json, .csv)")
    return 0


def cmd_demo(args) -> int:
    from tvmq.demo import run_demo

    run_demo(output_dir=args.output, quick=args.quick, progress=not args.quiet)
    return 0
