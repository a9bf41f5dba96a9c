"""The ``tvmq`` command line: compile, run, bench, bundle, targets, inspect, demo."""

from __future__ import annotations

import argparse
import sys

from tvmq.cli_commands import (
    cmd_bench,
    cmd_bundle,
    cmd_compile,
    cmd_demo,
    cmd_inspect,
    cmd_report,
    cmd_run,
    cmd_targets,
    cmd_tune,
)
from tvmq.cli_compile_options import add_compile_options, add_input_shape_option
from tvmq.cli_options import (
    QUANTIZE_SCHEMES,
    UsageError,
    int_at_least,
    rpc_address,
)

__all__ = ["QUANTIZE_SCHEMES", "build_parser", "main"]

EPILOG = """\
examples:
  tvmq demo                                      train, compress and compile the MNIST MLP; print a table
  tvmq targets                                   list hardware target presets
  tvmq compile model.onnx -t host -o build/      compile an ONNX file for this machine
  tvmq compile model.onnx --input-shape x:1x3x224x224 -t rasp4b -o build-pi/
  tvmq compile model.onnx --quantize int8 --calib calib.npz -o build-int8/
  tvmq compile model.onnx --quantize int8 --calib calib.npz --observer auto -o build-int8/
  tvmq compile model.onnx --prune 0.5 --prune-kind channel -o build-small/
  tvmq compile model.onnx -o build/ --dump ir,asm dump/   also write the Relax IR and assembly
  tvmq tune model.onnx -t host --trials 500       tune kernels; compile then applies the records
  tvmq tune --repair --work-dir tuning_logs/host  drop damaged records from a record folder
  tvmq tune model.onnx --trials 64 --offline cands/   candidates to time elsewhere (run.py measure)
  tvmq tune --import cands/                      their timings -> records for tvmq compile
  tvmq run build/ --input x.npz -o y.npz         run a compiled model on saved inputs
  tvmq bench build/                              median and p90 latency
  tvmq run build/ -i x.npz --profile             the 10 slowest kernels
  tvmq run build-pi/ -i x.npz --rpc 127.0.0.1:9190 --key rasp4b   run on a board via a TVM RPC tracker
  tvmq inspect build/                            what a compiled directory holds
  tvmq report build/ --eval data.npz             HTML report: SQNR, kernel times, size, accuracy
  tvmq bundle build/ -o bundle/ --python 3.12    a folder that runs build/ with the TVM runtime only
"""


def _add_rpc_options(s) -> None:
    s.add_argument(
        "--rpc",
        type=rpc_address,
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


class _Parser(argparse.ArgumentParser):
    """argparse with tvmq's error contract: one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"tvmq: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


class _Version(argparse.Action):
    """``--version``: tvmq's and TVM's versions, read from package metadata (no TVM import)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        from tvmq import __version__

        found = []
        for dist in ("apache-tvm", "apache-tvm-ffi"):
            try:
                found.append(f"{dist} {version(dist)}")
            except PackageNotFoundError:
                found.append(f"{dist} not installed")
        print(f"tvmq {__version__} ({', '.join(found)})")
        parser.exit(0)


def _global_options(parser, default) -> None:
    """--debug and -q: on the main parser (defaults) and on every subcommand (SUPPRESS, so
    a flag given before the subcommand is not reset by the subcommand's parser)."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show full tracebacks on errors (accepted before or after the command)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="no progress bars or phase lines; warnings still show (before or after the command)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tvmq",
        description="Compress neural networks (int8 quantization, pruning, weight sharing) "
        "and compile them with Apache TVM into a deployable library for a hardware target.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action=_Version, help="print tvmq's and TVM's versions and exit")
    _global_options(p, False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    sub = p.add_subparsers(
        dest="command", metavar="COMMAND", required=True, help="what to do (tvmq COMMAND --help)"
    )

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    s = command("demo", "the built-in job: MNIST MLP, compressed and compiled, as a table")
    s.add_argument(
        "-o", "--output", help="keep the compiled models here (default: a temporary dir)"
    )
    s.add_argument("--quick", action="store_true", help="fewer training epochs and timing runs")
    s.set_defaults(func=cmd_demo)

    s = command("targets", "list hardware target presets")
    s.set_defaults(func=cmd_targets)

    s = command(
        "compile", "compile a model (.onnx, .tflite, .keras/.h5, torch.export .pt2) for a target"
    )
    add_compile_options(s)
    s.set_defaults(func=cmd_compile)

    s = command(
        "tune", "tune a model's kernels with MetaSchedule (records in ./tuning_logs/<target>/)"
    )
    s.add_argument(
        "model",
        nargs="?",
        help="model file: .onnx, .tflite, .keras, .h5, or .pt2 saved with torch.export.save",
    )
    s.add_argument(
        "-t", "--target", default="host", help="target preset name or JSON file (default: host)"
    )
    add_input_shape_option(s)
    s.add_argument(
        "--trials",
        type=int_at_least(1),
        default=512,
        help="total candidates to measure, earlier records included (default 512); "
        "interrupt any time and rerun to resume",
    )
    s.add_argument(
        "--trials-per-task",
        type=int_at_least(1),
        metavar="N",
        help="most candidates per kernel (default: no limit)",
    )
    s.add_argument("--work-dir", help="record folder (default: ./tuning_logs/<target>/)")
    s.add_argument(
        "--cost-model",
        choices=["xgb", "random"],
        default="xgb",
        help="MetaSchedule's cost model: xgb (XGBoost, learns from measurements; default) "
        "or random (no model: candidates in random order)",
    )
    s.add_argument(
        "--repair",
        action="store_true",
        help="instead of tuning, rewrite the record folder (--work-dir) keeping only records "
        "that replay on their kernel; the originals are kept as *.bak",
    )
    s.add_argument(
        "--offline",
        metavar="DIR",
        help="measure nothing: build the candidates into this new folder, to be timed on a "
        "device this machine cannot reach (python BUNDLE/run.py measure DIR)",
    )
    s.add_argument(
        "--import",
        dest="import_dir",
        metavar="DIR",
        help="instead of tuning, add the timings of an offline round (DIR/timings.json) to "
        "the record folder (--work-dir, default: ./tuning_logs/<the round's target>/)",
    )
    _add_rpc_options(s)
    s.set_defaults(func=cmd_tune)

    s = command("run", "run a compiled model on inputs from a .npz/.npy file")
    s.add_argument("model_dir", help="output directory of tvmq compile")
    s.add_argument(
        "-i", "--input", required=True, help=".npz with one array per input name (or a .npy)"
    )
    s.add_argument("-o", "--output", help="write outputs to this .npz")
    s.add_argument(
        "--profile",
        nargs="?",
        const=10,
        type=int_at_least(1),
        metavar="N",
        help="also time every kernel (Relax VM instrumentation, 10 runs after one warm-up) "
        "and print the N slowest (default 10) with their share of the total",
    )
    _add_rpc_options(s)
    s.set_defaults(func=cmd_run)

    s = command("bench", "measure latency of a compiled model (median, p90)")
    s.add_argument("model_dir", help="output directory of tvmq compile")
    s.add_argument("-i", "--input", help="inputs (.npz/.npy); default: random")
    s.add_argument(
        "--warmup", type=int_at_least(0), default=10, help="untimed runs first (default 10)"
    )
    s.add_argument("--repeat", type=int_at_least(1), default=100, help="timed runs (default 100)")
    _add_rpc_options(s)
    s.set_defaults(func=cmd_bench)

    s = command(
        "bundle",
        "write a deploy folder that runs a compiled model with TVM's runtime only "
        "(python BUNDLE/run.py; no compiler, no tvmq install)",
    )
    s.add_argument("model_dir", help="output directory of tvmq compile")
    s.add_argument("-o", "--output", required=True, help="the bundle folder to write")
    s.add_argument(
        "--python",
        metavar="3.N",
        help="the Python version on the machine that runs the bundle (default: this one's)",
    )
    s.add_argument(
        "--tvm-runtime",
        metavar="DIR",
        help="take TVM's runtime libraries (libtvm_runtime.so...) from this folder, built for "
        "the build's CPU (default: this TVM's, or the apache-tvm wheel for another CPU)",
    )
    s.set_defaults(func=cmd_bundle)

    s = command("inspect", "show a compiled directory's manifest, or a model's signature and ops")
    s.add_argument(
        "path", help="compiled directory, or a model file (.onnx, .tflite, .keras, .h5, .pt2)"
    )
    add_input_shape_option(s)
    s.add_argument("--ir", action="store_true", help="also print the Relax IR")
    s.set_defaults(func=cmd_inspect)

    s = command(
        "report",
        "an HTML report of a compiled directory: per-layer SQNR, kernel times, size, accuracy",
    )
    s.add_argument("model_dir", help="output directory of tvmq compile")
    s.add_argument(
        "-o",
        "--output",
        metavar="REPORT.html",
        help="the HTML file; .json and .csv of the same name go beside it "
        "(default: MODEL_DIR/report.html)",
    )
    s.add_argument(
        "--eval",
        metavar="DATA.npz",
        help="measure accuracy on this .npz: the inputs (N samples), 'labels' and/or the float "
        "model's outputs as 'ref_<output name>'",
    )
    s.add_argument(
        "--repeat", type=int_at_least(1), default=10, help="timed runs per kernel (default 10)"
    )
    s.add_argument("--no-profile", action="store_true", help="do not time the kernels")
    s.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:  # option checks: no TVM import needed to report them
        print(f"tvmq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tvmq: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        errors = sys.modules.get("tvmq.errors")  # a TvmqError needs tvmq.errors imported
        if args.debug:
            raise
        if errors is not None and isinstance(e, errors.TvmqError):
            # One line, whatever the message quotes (a library's multi-line error text).
            print(f"tvmq: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        print(
            f"tvmq: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
