"""The ``tvmq`` command line: compile, run, bench, targets, inspect, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """\
examples:
  tvmq demo                                      train, compress and compile the MNIST MLP; print a table
  tvmq targets                                   list hardware target presets
  tvmq compile model.onnx -t host -o build/      compile an ONNX file for this machine
  tvmq compile model.onnx --input-shape x:1x3x224x224 -t rasp4b -o build-pi/
  tvmq compile model.onnx --quantize int8 --calib calib.npz -o build-int8/
  tvmq compile model.onnx --prune 0.5 --prune-kind channel -o build-small/
  tvmq tune model.onnx -t host --trials 500       tune kernels; compile then applies the records
  tvmq tune --repair --work-dir tuning_logs/host  drop damaged records from a record folder
  tvmq run build/ --input x.npz -o y.npz         run a compiled model on saved inputs
  tvmq bench build/                              median and p90 latency
  tvmq run build-pi/ -i x.npz --rpc 127.0.0.1:9190 --key rasp4b   run on a board via a TVM RPC tracker
  tvmq inspect build/                            what a compiled directory holds
"""


def _parse_shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME:DIMxDIM..., e.g. input:1x3x224x224")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: dimensions must be integers, e.g. 1x3x224x224"
        ) from None
    if any(d < 1 for d in shape):  # a 0 dim makes an empty tensor: nothing to compute
        raise argparse.ArgumentTypeError(
            f"{text!r}: every dimension must be at least 1, e.g. 1x3x224x224"
        )
    return name, shape


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (checked while parsing, before any work)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _input_shapes(args) -> dict[str, list[int]] | None:
    """--input-shape options as a dict; naming one input twice is a mistake, not an override."""
    from tvmq.errors import TvmqError

    if not args.input_shape:
        return None
    shapes: dict[str, list[int]] = {}
    for name, shape in args.input_shape:
        if name in shapes:
            raise TvmqError(f"--input-shape gives input {name!r} twice; give each input once")
        shapes[name] = shape
    return shapes


def _load_arrays(path: str, specs) -> list:
    """Inputs from .npz (keys = input names, or one array) or .npy (single-input models)."""
    import numpy as np

    from tvmq.errors import TvmqError

    p = Path(path)
    if not p.is_file():
        raise TvmqError(f"{p}: no such file")
    try:
        data = np.load(p, allow_pickle=False)
        if isinstance(data, np.ndarray):
            arrays = {specs[0].name: data} if len(specs) == 1 else {}
        else:
            with data:  # a .npz reads (and may fail on) each array only here
                arrays = {key: data[key] for key in data.files}
    except Exception as e:  # damaged, truncated, pickled (object) arrays, not numpy at all
        raise TvmqError(f"{p}: not a readable .npy/.npz file ({e})") from None
    if len(arrays) == 1 and len(specs) == 1:
        arrays = {specs[0].name: next(iter(arrays.values()))}
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise TvmqError(f"{p}: no array for input(s) {missing}; it has {sorted(arrays)}")
    extra = sorted(set(arrays) - set(names))
    if extra:  # a misspelt or stale input would otherwise be ignored without a word
        raise TvmqError(f"{p}: array(s) {extra} are not inputs of the model; it takes {names}")
    return [arrays[n] for n in names]


def cmd_targets(args) -> int:
    from tvmq.targets import list_targets

    presets = list_targets()
    width = max(len(t.name) for t in presets)
    for t in presets:
        print(f"{t.name:<{width}}  {t.description}")
    return 0


def _compression_configs(args):
    """--prune/--prune-kind/--cluster -> (PruneConfig | None, ClusterConfig | None)."""
    from tvmq.compression import ClusterConfig, PruneConfig
    from tvmq.errors import TvmqError

    prune = None
    kind = args.prune_kind
    if kind in ("2:4", "4:8"):
        n, m = (int(v) for v in kind.split(":"))
        if args.prune is not None and abs(args.prune - (1 - n / m)) > 1e-9:
            raise TvmqError(
                f"--prune-kind {kind} prunes exactly {1 - n / m:g}; drop --prune {args.prune:g}"
            )
        prune = PruneConfig(method="n:m", n=n, m=m)
    elif args.prune is not None:
        if kind == "channel":
            prune = PruneConfig(method="channels", ratio=args.prune)
        else:
            prune = PruneConfig(method="magnitude", sparsity=args.prune)
    cluster = None
    if args.cluster is not None:
        bits = args.cluster.bit_length() - 1
        if args.cluster < 2 or args.cluster > 256 or 1 << bits != args.cluster:
            raise TvmqError(f"--cluster takes a power of two from 2 to 256, got {args.cluster}")
        cluster = ClusterConfig(bits=bits)
    return prune, cluster


def _sparse_config(args):
    from tvmq.core.compression import SparseConfig
    from tvmq.errors import TvmqError

    if args.sparse is None:
        return None
    try:
        block = tuple(int(v) for v in args.sparse_block.lower().split("x"))
    except ValueError:
        block = ()
    if len(block) != 2:
        raise TvmqError(f"--sparse-block {args.sparse_block!r}: write ROWSxCOLS, e.g. 16x1")
    return SparseConfig(min_sparsity=args.sparse, block=block)


# --quantize choices -> whether the scheme is calibrated (takes --calib/--observer). Kept here
# so a wrong combination is refused without importing tvmq.quantization (and TVM);
# tests/bad_inputs/test_options.py checks it against tvmq.quantization.get_scheme.
QUANTIZE_SCHEMES = {"int8": True, "int8-dynamic": False, "w8": False, "w4": False}


def _check_quantize_options(args) -> None:
    """--quantize/--calib/--observer agree, and the calibration file is usable (headers only).

    Runs before the model is imported, so a mistake here costs no import or compile time.
    """
    from tvmq.errors import TvmqError

    given = [
        opt for opt, value in (("--calib", args.calib), ("--observer", args.observer)) if value
    ]
    if not args.quantize:
        if given:
            raise TvmqError(
                f"{' and '.join(given)} without --quantize: calibration is for --quantize int8; "
                f"add it or drop {' and '.join(given)}"
            )
        return
    calibrated = QUANTIZE_SCHEMES[args.quantize]
    if given and not calibrated:
        raise TvmqError(
            f"--quantize {args.quantize} takes no calibration; drop {' and '.join(given)} "
            "(or use --quantize int8)"
        )
    if calibrated and not args.calib:
        raise TvmqError(
            f"--quantize {args.quantize} needs --calib: a .npz of a few hundred typical inputs "
            "(keys = input names)"
        )
    if args.observer:
        from tvmq.calibration import get_observer

        get_observer(args.observer)  # an unknown name: one line listing the known ones
    if args.calib:
        from tvmq.calibration import check_calibration_file

        check_calibration_file(args.calib)


def cmd_compile(args) -> int:
    import dataclasses

    import tvmq

    _check_quantize_options(args)
    input_shapes = _input_shapes(args)
    prune, cluster = _compression_configs(args)

    scheme = None
    if args.quantize:
        from tvmq.compiler import scheme_for_target
        from tvmq.targets import get_target

        scheme = scheme_for_target(args.quantize, get_target(args.target))
        if args.observer:
            scheme = dataclasses.replace(scheme, observer=args.observer)
    art = tvmq.compile(
        args.model,
        args.target,
        output_dir=args.output,
        input_shapes=input_shapes,
        prune=prune,
        cluster=cluster,
        sparse=_sparse_config(args),
        quantize=scheme,
        calibration_data=args.calib,
        tuning_logs=None if args.no_tuning_logs else (args.tuning_logs or "auto"),
        progress=not args.quiet,
    )
    lib = art.manifest.library
    print(
        f"wrote {art.output_dir} ({lib['file']}: {lib['bytes'] / 1024:.1f} KiB, target {args.target})"
    )
    return 0


def _rpc_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r}: write the RPC tracker's HOST:PORT, e.g. 127.0.0.1:9190"
        )
    return host, int(port)


def _open_model(args):
    """The compiled model, loaded here or (with --rpc) on a board; and the board session."""
    import tvmq
    from tvmq.errors import TvmqError

    if not args.rpc:
        if args.key:
            raise TvmqError("--key selects boards at an RPC tracker: give --rpc HOST:PORT too")
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


def _add_rpc_options(s) -> None:
    s.add_argument(
        "--rpc",
        type=_rpc_address,
        metavar="HOST:PORT",
        help="run on a board through this TVM RPC tracker instead of here",
    )
    s.add_argument(
        "--key", help="the boards' key at the tracker (default: the target preset's rpc_key)"
    )
    s.add_argument(
        "--rpc-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the tracker and a free board (default 60)",
    )


def cmd_run(args) -> int:
    import numpy as np

    from tvmq.output import check_output_file, write_file_atomically

    if args.output:
        check_output_file(args.output)  # before running: a bad -o fails fast
    model, session = _open_model(args)
    try:
        arrays = _load_arrays(args.input, model.inputs)
        outs = model(*arrays)
    finally:
        if session is not None:
            session.close()
    outs = outs if isinstance(outs, tuple) else (outs,)
    for spec, y in zip(model.outputs, outs, strict=True):
        summary = f"{spec.name}: shape {y.shape} {y.dtype}"
        if y.size:
            summary += f", mean {float(y.mean()):.6g}, max {float(y.max()):.6g}"
            if y.ndim == 2:
                summary += f", argmax {y.argmax(axis=1)[:8].tolist()}"
        print(summary)
    if args.output:
        arrays = {s.name: y for s, y in zip(model.outputs, outs, strict=True)}
        write_file_atomically(args.output, lambda f: np.savez(f, **arrays))
        print(f"wrote {args.output}")
    return 0


def cmd_bench(args) -> int:
    model, session = _open_model(args)
    try:
        inputs = _load_arrays(args.input, model.inputs) if args.input else None
        stats = model.benchmark(inputs, warmup=args.warmup, repeat=args.repeat)
        where = session.describe() if session is not None else str(model.device)
    finally:
        if session is not None:
            session.close()
    name = model.manifest.target.get("name")
    print(f"{args.model_dir} on {name} ({where}): {stats.repeat} runs after {args.warmup} warm-up")
    print(
        f"  median {stats.median_ms:.4f} ms   p90 {stats.p90_ms:.4f} ms   min {stats.min_ms:.4f} ms"
    )
    return 0


def cmd_tune(args) -> int:
    from tvmq.errors import TvmqError
    from tvmq.targets import get_target
    from tvmq.tuning import TuningFailed, default_work_dir, repair, tune
    from tvmq.tuning_records import check_work_dir

    if args.repair:
        if args.model is not None:
            raise TvmqError("--repair takes no model: give the folder with --work-dir")
        work_dir = args.work_dir or default_work_dir(args.target)
        print(repair(work_dir).summary())
        return 0
    if args.model is None:
        raise TvmqError("give the model file to tune (or --repair to fix a record folder)")
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
    elif args.key:
        raise TvmqError("--key selects boards at an RPC tracker: give --rpc HOST:PORT too")
    from tvmq.frontends import import_model

    model = import_model(args.model, input_shapes=_input_shapes(args))
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
        )
    except TuningFailed as failed:
        print(failed.report.summary())  # the table on stdout; the one-line error on stderr
        raise
    print(report.summary())
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

    m = import_model(path, input_shapes=_input_shapes(args))
    print(f"{path} ({m.source})")
    for s in m.inputs:
        print(f"  input  {s.name}: {list(s.shape)} {s.dtype}")
    for s in m.outputs:
        print(f"  output {s.name}: {list(s.shape)} {s.dtype}")
    ops = Counter(_relax_ops(m.mod))
    print("  operators: " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))
    if args.ir:
        print(m.mod.script(show_meta=False))
    return 0


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


def cmd_demo(args) -> int:
    from tvmq.demo import run_demo

    run_demo(output_dir=args.output, quick=args.quick, progress=not args.quiet)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with tvmq's error contract: one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"tvmq: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tvmq",
        description="Compress neural networks (int8 quantization, pruning, weight sharing) "
        "and compile them with Apache TVM into a deployable library for a hardware target.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser(
        "demo", help="the built-in job: MNIST MLP, compressed and compiled, as a table"
    )
    s.add_argument(
        "-o", "--output", help="keep the compiled models here (default: a temporary dir)"
    )
    s.add_argument("--quick", action="store_true", help="fewer training epochs and timing runs")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("targets", help="list hardware target presets")
    s.set_defaults(func=cmd_targets)

    s = sub.add_parser("compile", help="compile a model (.onnx or torch.export .pt2) for a target")
    s.add_argument("model", help="model file: .onnx, or .pt2 saved with torch.export.save")
    s.add_argument(
        "-t", "--target", default="host", help="target preset name or JSON file (default: host)"
    )
    s.add_argument("-o", "--output", required=True, help="output directory (model.so + model.json)")
    s.add_argument(
        "--input-shape",
        action="append",
        type=_parse_shape,
        metavar="NAME:1x3x224x224",
        help="static shape for an input with dynamic dimensions (repeatable)",
    )
    s.add_argument(
        "--prune",
        type=float,
        metavar="FRACTION",
        help="prune this fraction of weights (or channels)",
    )
    s.add_argument(
        "--prune-kind",
        choices=["unstructured", "2:4", "4:8", "channel"],
        default="unstructured",
        help="magnitude pruning of single weights, N:M semi-structured, or whole output channels",
    )
    s.add_argument(
        "--sparse",
        nargs="?",
        const=0.7,
        type=float,
        metavar="MIN_SPARSITY",
        help="run float layers whose weight is at least this block-sparse (default 0.7) on "
        "block-sparse (BSR) kernels; use after --prune",
    )
    s.add_argument(
        "--sparse-block",
        default="16x1",
        metavar="RxC",
        help="BSR block of the [out, in] weight (default 16x1; 1x1 suits unstructured --prune)",
    )
    s.add_argument(
        "--cluster", type=int, metavar="N", help="share weights: N values per tensor (k-means)"
    )
    s.add_argument("--quantize", choices=list(QUANTIZE_SCHEMES), help="quantization scheme")
    s.add_argument(
        "--calib", help="calibration data (.npz, keys = input names) for --quantize int8"
    )
    s.add_argument(
        "--observer", help="calibration observer: minmax, moving_average, percentile, entropy, mse"
    )
    s.add_argument(
        "--tuning-logs",
        action="append",
        metavar="DIR",
        help="MetaSchedule record folder to apply (repeatable; default: ./tuning_logs/<target>/ "
        "and the logs shipped with tvmq)",
    )
    s.add_argument(
        "--no-tuning-logs", action="store_true", help="apply no tuning records (default schedules)"
    )
    s.set_defaults(func=cmd_compile)

    s = sub.add_parser(
        "tune", help="tune a model's kernels with MetaSchedule (records in ./tuning_logs/<target>/)"
    )
    s.add_argument(
        "model", nargs="?", help="model file: .onnx, or .pt2 saved with torch.export.save"
    )
    s.add_argument("-t", "--target", default="host", help="target preset name or JSON file")
    s.add_argument("--input-shape", action="append", type=_parse_shape, metavar="NAME:1x3x224x224")
    s.add_argument(
        "--trials",
        type=int,
        default=512,
        help="total candidates to measure, earlier records included (default 512); "
        "interrupt any time and rerun to resume",
    )
    s.add_argument("--trials-per-task", type=int, metavar="N", help="most candidates per kernel")
    s.add_argument("--work-dir", help="record folder (default: ./tuning_logs/<target>/)")
    s.add_argument("--cost-model", choices=["xgb", "random"], default="xgb")
    s.add_argument(
        "--repair",
        action="store_true",
        help="instead of tuning, rewrite the record folder (--work-dir) keeping only records "
        "that replay on their kernel; the originals are kept as *.bak",
    )
    _add_rpc_options(s)
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("run", help="run a compiled model on inputs from a .npz/.npy file")
    s.add_argument("model_dir", help="output directory of tvmq compile")
    s.add_argument(
        "-i", "--input", required=True, help=".npz with one array per input name (or a .npy)"
    )
    s.add_argument("-o", "--output", help="write outputs to this .npz")
    _add_rpc_options(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("bench", help="measure latency of a compiled model (median, p90)")
    s.add_argument("model_dir", help="output directory of tvmq compile")
    s.add_argument("-i", "--input", help="inputs (.npz/.npy); default: random")
    s.add_argument(
        "--warmup", type=_int_at_least(0), default=10, help="untimed runs first (default 10)"
    )
    s.add_argument("--repeat", type=_int_at_least(1), default=100, help="timed runs (default 100)")
    _add_rpc_options(s)
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser(
        "inspect", help="show a compiled directory's manifest, or a model's signature and ops"
    )
    s.add_argument("path", help="compiled directory, or a model file (.onnx, .pt2)")
    s.add_argument("--input-shape", action="append", type=_parse_shape, metavar="NAME:1x3x224x224")
    s.add_argument("--ir", action="store_true", help="also print the Relax IR")
    s.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tvmq.errors import TvmqError

    try:
        return args.func(args)
    except TvmqError as e:
        if args.debug:
            raise
        # One line, whatever the message quotes (a library's multi-line error text).
        print(f"tvmq: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tvmq: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(
            f"tvmq: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
