#!/usr/bin/env python3
"""Run the compiled model of this bundle with TVM's runtime only: no compiler, no tvmq install.

    python run.py                          random inputs; prints the outputs and the latency
    python run.py -i inputs.npz -o outputs.npz
    python run.py --repeat 0               run once, no timing
    python run.py measure CANDIDATES/      time the kernels of a tvmq tune --offline round

Needs the Python the bundle was made for (bundle.json's "python") and numpy. TVM's runtime
and tvmq's loader are in python/; apache-tvm-ffi is taken from the Python's packages when
that version is installed there, else unpacked from wheels/ into _deps/ (or a temporary
folder when the bundle is read-only). Written into each bundle by ``tvmq bundle``; its
source is tvmq/bundle_run.py.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _fail(message: str) -> None:
    print(f"run.py: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def _ffi_path(info: dict) -> Path | None:
    """A folder to import apache-tvm-ffi from; None when the right version is installed."""
    from importlib import metadata

    want = info["versions"]["tvm_ffi"]
    try:
        if metadata.version("apache-tvm-ffi") == want:
            return None
    except metadata.PackageNotFoundError:
        pass
    have = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if info["python"] != have:
        _fail(
            f"the bundle's apache-tvm-ffi wheel is for Python {info['python']} and this is "
            f"Python {have}: run python{info['python']} run.py, or make the bundle again with "
            f"tvmq bundle --python {have}"
        )
    wheel = HERE / info["wheel"]
    dest = HERE / "_deps" / wheel.stem
    if (dest / "tvm_ffi" / "__init__.py").is_file():
        return dest
    try:
        dest.parent.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    except OSError:  # a read-only bundle: unpack for this run only
        tmp = Path(tempfile.mkdtemp(prefix="tvmq-bundle-"))
        atexit.register(shutil.rmtree, tmp, True)
        dest = tmp
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp)
    if tmp != dest:
        try:
            os.rename(tmp, dest)
        except OSError:  # another run unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "-i", "--input", help=".npz with one array per input name (or a .npy); default: random"
    )
    p.add_argument("-o", "--output", help="write the outputs to this .npz")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs before timing (default 10)")
    p.add_argument("--repeat", type=int, default=100, help="timed runs (default 100; 0: no timing)")
    return p


def _measure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py measure",
        description="time each candidate kernel of a tvmq tune --offline folder on this "
        "machine; writes FOLDER/timings.json for tvmq tune --import",
    )
    p.add_argument("folder", help="the folder tvmq tune --offline wrote")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    measuring = bool(argv) and argv[0] == "measure"
    args = (_measure_parser() if measuring else _parser()).parse_args(argv[measuring:])
    try:
        info = json.loads((HERE / "bundle.json").read_text())
    except (OSError, ValueError) as e:
        _fail(f"{HERE / 'bundle.json'}: not readable ({e}); is run.py inside a tvmq bundle?")
    ffi = _ffi_path(info)
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"  # never look for TVM's compiler
    sys.path[:0] = [str(HERE / "python")] + ([str(ffi)] if ffi else [])

    import numpy as np
    import tvm

    import tvmq
    from tvmq.cli_options import load_arrays
    from tvmq.errors import TvmqError
    from tvmq.output_file import check_output_file, write_file_atomically
    from tvmq.runtime import output_summary, random_inputs

    if measuring:
        from tvmq.tuning_offline import FAILED, measure_candidates

        try:
            timings = measure_candidates(args.folder)["timings"]
        except TvmqError as e:
            _fail(str(e))
        failed = sum(isinstance(t, dict) and FAILED in t for t in timings.values())
        print(f"timed {len(timings) - failed} candidates ({failed} failed) in {args.folder}")
        return 0
    try:
        if args.output:
            check_output_file(args.output)
        model = tvmq.load(HERE / info["model"])
        if args.input:
            inputs = load_arrays(args.input, model.inputs)
        else:
            inputs = random_inputs(model.inputs)
        outs = model(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        tvm_dir = Path(tvm.__file__).parent
        print(
            f"{info['target']} model on {model.device}, TVM {tvm.__version__} runtime from {tvm_dir}"
        )
        for spec, y in zip(model.outputs, outs, strict=True):
            print(output_summary(spec, y))
        if args.repeat > 0:
            s = model.benchmark(inputs, warmup=max(args.warmup, 0), repeat=args.repeat)
            print(
                f"latency: median {s.median_ms:.4f} ms   p90 {s.p90_ms:.4f} ms   "
                f"min {s.min_ms:.4f} ms ({s.repeat} runs after {max(args.warmup, 0)} warm-up)"
            )
        if args.output:
            arrays = {s.name: y for s, y in zip(model.outputs, outs, strict=True)}
            write_file_atomically(args.output, lambda f: np.savez(f, **arrays))
            print(f"wrote {args.output}")
    except TvmqError as e:
        _fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
