"""The ``tvmq`` command line's option checks: argparse types, and the options checked
against each other before any model is imported (a mistake costs a second, not a compile).

Only the standard library is imported at the top, so ``tvmq --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_shape(text: str) -> tuple[str, list[int]]:
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


def input_shape_options(args) -> dict[str, list[int]] | None:
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


def compression_configs(args):
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


def sparse_config(args):
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


def check_quantize_options(args) -> None:
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
