"""The ``tvmq`` command line's option checks: argparse types, and the options checked
against each other before any model is imported (a mistake costs a second, not a compile).

Only the standard library is imported at the top, so ``tvmq --help`` stays fast.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def parse_shape(text: str) -> tuple[str, list[int | str]]:
    """``NAME:1x3x224x224``; a dim that is a name (``input_ids:Bx128``) is symbolic: the
    compiled model takes any size there, and one name in several inputs is one size."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write NAME:DIMxDIM..., e.g. input:1x3x224x224 or input_ids:Bx128"
        )
    shape: list[int | str] = []
    for d in re.split("[xX]", dims):
        if d.isascii() and d.isdigit():
            if int(d) < 1:  # a 0 dim makes an empty tensor: nothing to compute
                raise argparse.ArgumentTypeError(
                    f"{text!r}: every dimension must be at least 1, e.g. 1x3x224x224"
                )
            shape.append(int(d))
        elif d.isascii() and d.isidentifier():
            shape.append(d)
        else:
            raise argparse.ArgumentTypeError(
                f"{text!r}: each dimension is an integer or a name for a dynamic dimension "
                f"(letters, digits and _, no x), e.g. 1x3x224x224 or Bx128, got {d!r}"
            )
    return name, shape


def int_at_least(minimum: int):
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


def input_shape_options(args) -> dict[str, list[int | str]] | None:
    """--input-shape options as a dict; naming one input twice is a mistake, not an override."""
    if not args.input_shape:
        return None
    shapes: dict[str, list[int | str]] = {}
    for name, shape in args.input_shape:
        if name in shapes:
            raise UsageError(f"--input-shape gives input {name!r} twice; give each input once")
        shapes[name] = shape
    return shapes


def load_arrays(path: str, specs) -> list:
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


def rpc_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r}: write the RPC tracker's HOST:PORT, e.g. 127.0.0.1:9190"
        )
    return host, int(port)


class UsageError(Exception):
    """A mistake in the command line itself: ``tvmq: error: <message>``, exit status 2.

    Raised by the checks below, which use the standard library only (no TVM, torch or
    numpy import), so a wrong option is reported in a fraction of a second.
    """


def _fraction(flag: str, value: float | None, *, low_open: bool = False) -> None:
    if value is None:
        return
    if not (0.0 < value < 1.0 if low_open else 0.0 <= value < 1.0):
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise UsageError(f"{flag} takes a fraction in {interval}, e.g. 0.5; got {value:g}")


def _existing_file(flag: str, path: str | None) -> None:
    if path is not None and Path(path).is_dir():
        raise UsageError(f"{flag} {path} is a directory, not a file")
    if path is not None and not Path(path).is_file():
        raise UsageError(f"{flag} {path} does not exist")


def _block(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise UsageError(
            f"--sparse-block {text!r}: write ROWSxCOLS of positive integers, e.g. 16x1"
        )
    return int(parts[0]), int(parts[1])


# --quantize choices -> whether the scheme is calibrated (takes --calib/--observer). Kept here
# so a wrong combination is refused without importing tvmq.quantization (and TVM);
# tests/bad_inputs/test_options.py checks it against tvmq.quantization.get_scheme.
QUANTIZE_SCHEMES = {"int8": True, "int8-dynamic": False, "w8": False, "w4": False}
# scheme options -> the --quantize choices they apply to
SCHEME_OPTIONS = {
    "--per-tensor": ("int8", "int8-dynamic"),
    "--requantize": ("int8",),
    "--smooth": ("int8",),
    "--no-smooth": ("int8",),
    "--bias-correction": ("int8",),
}
DUMP_KINDS = ("ir", "ll", "asm")


def _given_scheme_options(args) -> list[str]:
    given = {
        "--per-tensor": args.per_tensor,
        "--requantize": args.requantize is not None,
        "--smooth": args.smooth is not None,
        "--no-smooth": args.no_smooth,
        "--bias-correction": args.bias_correction,
    }
    return [flag for flag, on in given.items() if on]


def check_target_name(target: str) -> None:
    """-t/--target names a shipped preset or an existing JSON file (standard library only;
    the preset itself is parsed later by ``tvmq.targets.get_target``)."""
    import os
    from importlib.resources import files

    if target.endswith(".json") or os.sep in target:
        _existing_file("-t/--target", target)
        return
    names = sorted(
        e.name[: -len(".json")]
        for e in files("tvmq._targets").iterdir()
        if e.name.endswith(".json")
    )
    if target not in names:
        raise UsageError(
            f"unknown target {target!r}; known targets: {', '.join(names)} "
            "(or give the path of a preset JSON file; `tvmq targets` lists them)"
        )


def check_compile_args(args) -> None:
    """Every ``tvmq compile`` option on its own and against the others; standard library only.

    Raises :class:`UsageError` (one line naming the flags) before any model is read.
    """
    from tvmq.core.observers import normalize_observer_name, observer_names

    if not Path(args.model).exists():
        raise UsageError(f"{args.model}: no such file")
    check_target_name(args.target)
    kind = args.prune_kind
    if kind in ("2:4", "4:8"):
        n, m = (int(v) for v in kind.split(":"))
        if args.prune is not None and abs(args.prune - (1 - n / m)) > 1e-9:
            raise UsageError(
                f"--prune-kind {kind} prunes exactly {1 - n / m:g}; drop --prune {args.prune:g}"
            )
    _fraction("--prune", args.prune, low_open=True)
    if args.cluster is not None:
        bits = args.cluster.bit_length() - 1
        if args.cluster < 2 or args.cluster > 256 or 1 << bits != args.cluster:
            raise UsageError(f"--cluster takes a power of two from 2 to 256, got {args.cluster}")
        if args.quantize in ("w8", "w4", "int8-dynamic"):
            raise UsageError(
                f"--cluster combines with --quantize int8 (static), not {args.quantize}; "
                "drop one of them"
            )
        if args.accuracy_drop is not None:
            raise UsageError("--cluster and --accuracy-drop cannot be combined yet; drop one")
        if args.quantize and args.cluster > 16:
            raise UsageError(
                f"--cluster with --quantize {args.quantize} shares at most 16 values per int8 "
                f"weight, got {args.cluster}"
            )
    if args.skip and not (args.quantize or args.prune is not None or args.cluster is not None):
        raise UsageError("--skip leaves layers out of --quantize, --prune or --cluster: give one")
    if args.sparse is None and args.sparse_block is not None:
        raise UsageError("--sparse-block applies to --sparse: add --sparse or drop it")
    _fraction("--sparse", args.sparse)
    if args.sparse_block is not None:
        _block(args.sparse_block)
    precision = getattr(args, "precision", "fp32")
    if precision != "fp32" and args.quantize:
        raise UsageError(
            f"--precision {precision} and --quantize {args.quantize} cannot be combined yet; "
            "drop one of them"
        )
    if args.tuning_logs and args.no_tuning_logs:
        raise UsageError("--tuning-logs and --no-tuning-logs contradict each other; drop one")
    given = [o for o, v in (("--calib", args.calib), ("--observer", args.observer)) if v]
    scheme_options = _given_scheme_options(args)
    accuracy = [
        o
        for o, v in (("--accuracy-drop", args.accuracy_drop), ("--eval", args.eval))
        if v is not None
    ]
    if not args.quantize:
        extra = given + scheme_options + accuracy
        if extra:
            raise UsageError(
                f"{' and '.join(extra)} without --quantize: add --quantize (e.g. int8) "
                f"or drop {' and '.join(extra)}"
            )
    else:
        calibrated = QUANTIZE_SCHEMES[args.quantize]
        if given and not calibrated:
            raise UsageError(
                f"--quantize {args.quantize} takes no calibration; drop {' and '.join(given)} "
                "(or use --quantize int8)"
            )
        if calibrated and not args.calib:
            raise UsageError(
                f"--quantize {args.quantize} needs --calib: a .npz of a few hundred typical "
                "inputs (keys = input names)"
            )
        for flag in scheme_options:
            if args.quantize not in SCHEME_OPTIONS[flag]:
                raise UsageError(
                    f"{flag} applies to --quantize {' / '.join(SCHEME_OPTIONS[flag])}, "
                    f"not {args.quantize}"
                )
    if args.observer and normalize_observer_name(args.observer) not in observer_names():
        raise UsageError(
            f"--observer {args.observer}: unknown observer; choose one of "
            f"{', '.join(observer_names())}"
        )
    if args.smooth is not None and not 0.0 <= args.smooth <= 1.0:
        raise UsageError(f"--smooth takes an alpha in [0, 1], e.g. 0.5; got {args.smooth:g}")
    if accuracy and len(accuracy) != 2:
        missing = "--eval data.npz" if args.eval is None else "--accuracy-drop X"
        raise UsageError(f"{accuracy[0]} needs {missing} (accuracy control takes both)")
    if args.bias_correction and args.accuracy_drop is not None:
        raise UsageError("--bias-correction and --accuracy-drop cannot be combined yet; drop one")
    if args.accuracy_drop is not None and not 0.0 <= args.accuracy_drop <= 100.0:
        raise UsageError(
            f"--accuracy-drop takes percentage points in [0, 100], e.g. 1; got {args.accuracy_drop:g}"
        )
    _existing_file("--calib", args.calib)
    _existing_file("--eval", args.eval)
    if args.dump is not None:
        kinds, _folder = args.dump
        bad = [k for k in kinds.split(",") if k not in DUMP_KINDS]
        if bad or not kinds:
            raise UsageError(
                f"--dump {kinds}: choose from {', '.join(DUMP_KINDS)} (comma-separated), e.g. "
                "--dump ir,asm dump/"
            )


def compression_configs(args):
    """--prune/--prune-kind/--cluster -> (PruneConfig | None, ClusterConfig | None).

    The values were checked by :func:`check_compile_args`."""
    from tvmq.compression import ClusterConfig, PruneConfig

    prune = None
    kind = args.prune_kind
    if kind in ("2:4", "4:8"):
        n, m = (int(v) for v in kind.split(":"))
        prune = PruneConfig(method="n:m", n=n, m=m)
    elif args.prune is not None:
        if kind == "channel":
            prune = PruneConfig(method="channels", ratio=args.prune)
        else:
            prune = PruneConfig(method="magnitude", sparsity=args.prune)
    return prune, ClusterConfig.of(args.cluster)


def sparse_config(args):
    from tvmq.core.compression import SparseConfig

    if args.sparse is None:
        return None
    return SparseConfig(min_sparsity=args.sparse, block=_block(args.sparse_block or "16x1"))


def make_scheme(args, preset):
    """The quantization scheme the options ask for on ``preset`` (None without --quantize)."""
    import dataclasses

    from tvmq.pipeline import scheme_for_target

    if not args.quantize:
        return None
    scheme = scheme_for_target(args.quantize, preset)
    changes = {}
    if args.observer:
        changes["observer"] = args.observer
    if args.skip:
        changes["skip"] = (*scheme.skip, *args.skip)
    if args.per_tensor:
        changes["weight_per_channel"] = False
    if args.requantize:
        changes["requantize"] = args.requantize
    if args.no_smooth:
        changes["smooth"] = ()
    elif args.smooth is not None:
        changes["smooth"] = tuple((sel, args.smooth) for sel, _ in scheme.smooth) or (
            ("after:layer_norm", args.smooth),
        )
    return dataclasses.replace(scheme, **changes) if changes else scheme


def check_calibration_headers(args) -> None:
    """The calibration file is usable (array headers only; imports numpy and tvmq.errors)."""
    if args.calib:
        from tvmq.calibration import check_calibration_file

        check_calibration_file(args.calib)
