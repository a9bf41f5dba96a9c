"""The CLI's surface: help on every option, global flags anywhere, --version, and every
option checked in a fraction of a second, before TVM, torch or numpy is imported."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import pytest

from tvmq.cli import build_parser, main


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    commands = dict(_subparsers(parser))
    assert {"compile", "run", "tune", "bench", "inspect", "targets", "demo"} <= set(commands)
    missing = [a.dest for a in parser._actions if not a.help]
    for name, sub in commands.items():
        missing += [f"{name} {a.option_strings or a.dest}" for a in sub._actions if not a.help]
    assert missing == []


@pytest.mark.parametrize(
    "argv, quiet, debug",
    [
        (["compile", "m.onnx", "-o", "out"], False, False),
        (["-q", "compile", "m.onnx", "-o", "out"], True, False),
        (["compile", "m.onnx", "-o", "out", "-q"], True, False),
        (["--debug", "compile", "m.onnx", "-q", "-o", "out"], True, True),
        (["run", "build", "-i", "x.npz", "--debug", "--quiet"], True, True),
        (["--quiet", "bench", "build"], True, False),
    ],
)
def test_global_flags_before_or_after_the_command(argv, quiet, debug):
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.debug) == (quiet, debug)


def test_version_names_tvmq_and_tvm(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith("tvmq 0.") and f"apache-tvm {version('apache-tvm')}" in out


# Each case: options after `tvmq compile MODEL -o OUT` and a part of the one-line message.
FAST_CASES = [
    (["--prune", "1.5"], "--prune takes a fraction in (0, 1)"),
    (["--prune", "0"], "--prune takes a fraction"),
    (["--cluster", "1"], "--cluster takes a power of two"),
    (["--cluster", "24"], "--cluster takes a power of two"),
    (["--cluster", "16", "--quantize", "w4"], "--cluster combines with --quantize int8"),
    (["--cluster", "16", "--quantize", "int8-dynamic"], "--cluster combines with --quantize"),
    (["--cluster", "32", "--quantize", "int8", "--calib", "{calib}"], "at most 16 values"),
    (["--sparse", "--sparse-block", "3y"], "--sparse-block '3y'"),
    (["--sparse", "--sparse-block", "0x4"], "--sparse-block '0x4'"),
    (["--sparse-block", "4x1"], "--sparse-block applies to --sparse"),
    (["-t", "x86-amx", "--precision", "bf16", "--quantize", "w8"], "cannot be combined yet"),
    (["-t", "cuda-sm90", "--precision", "fp16", "--quantize", "w8"], "cannot be combined yet"),
    (["-t", "cuda-sm80", "--precision", "bf16", "--quantize", "int8"], "cannot be combined yet"),
    (["--sparse", "1.2"], "--sparse takes a fraction"),
    (["--quantize", "int8"], "needs --calib"),
    (["--quantize", "int8", "--calib", "{calib}", "--observer", "bogus"], "--observer bogus"),
    (["--quantize", "int8", "--calib", "{model}.missing"], "--calib"),
    (["--per-tensor"], "--per-tensor without --quantize"),
    (["--quantize", "w8", "--per-tensor"], "--per-tensor applies to --quantize int8"),
    (["--quantize", "int8-dynamic", "--requantize", "integer"], "--requantize applies"),
    (["--quantize", "w4", "--no-smooth"], "--no-smooth applies"),
    (["--quantize", "int8", "--calib", "{calib}", "--smooth", "1.5"], "alpha in [0, 1]"),
    (["--quantize", "w8", "--bias-correction"], "--bias-correction applies"),
    (["--quantize", "int8", "--calib", "{calib}", "--accuracy-drop", "1"], "needs --eval"),
    (["--quantize", "int8", "--calib", "{calib}", "--eval", "{calib}"], "needs --accuracy-drop"),
    (
        ["--quantize", "int8", "--calib", "{calib}", "--accuracy-drop", "-1", "--eval", "{calib}"],
        "percentage points",
    ),
    (["--accuracy-drop", "1", "--eval", "{calib}"], "without --quantize"),
    (["--tuning-logs", "t", "--no-tuning-logs"], "contradict"),
    (["--dump", "bin", "d"], "--dump bin"),
    (["--dump", "ir", "{model}"], "is a file"),
    (["--input-shape", "x:2x8", "--input-shape", "x:4x8"], "twice"),
    (["--input-shape", "x:Bx?"], "a name for a dynamic dimension"),
    (["--input-shape", "x:B-1x8"], "got 'B-1'"),
    (["--input-shape", "x:0xS"], "at least 1"),
    (["-t", "pdp-11"], "unknown target 'pdp-11'; known targets: arm-a76"),
    (["-t", "{model}.json"], "-t/--target"),
]


# Other commands: (argv after `tvmq`, message part); {model}: an existing file.
OTHER_FAST_CASES = [
    (["tune", "{model}", "--trials", "0"], "--trials: must be at least 1"),
    (["tune", "{model}", "--key", "rasp4b"], "--key selects boards"),
    (["tune", "{model}", "--repair"], "--repair takes no model"),
    (["tune"], "give the model file"),
    (["tune", "{model}.missing"], "no such file"),
    (["tune", "{model}", "-t", "vax"], "unknown target 'vax'"),
    (["run", "build", "-i", "x.npz", "--profile", "0"], "--profile: must be at least 1"),
    (["run", "build", "-i", "x.npz", "--profile", "--rpc", "h:1"], "cannot be combined with --rpc"),
    (["run", "build", "-i", "x.npz", "--key", "k"], "--key selects boards"),
    (["bench", "build", "--key", "k"], "--key selects boards"),
]


def test_bad_options_fail_fast_without_importing_tvm(tmp_path):
    """All cases in one fresh interpreter: each is exit 2 with one `tvmq: error:` line, and
    afterwards neither TVM, torch nor numpy has been imported."""
    model = tmp_path / "m.onnx"
    model.write_bytes(b"never read")
    calib = tmp_path / "calib.npz"
    calib.write_bytes(b"never read either: the options are refused first")
    cases = [
        ["compile", str(model), "-o", str(tmp_path / "out")]
        + [o.format(model=model, calib=calib) for o in options]
        for options, _ in FAST_CASES
    ] + [[a.format(model=model) for a in argv] for argv, _ in OTHER_FAST_CASES]
    expected = [says for _, says in FAST_CASES] + [says for _, says in OTHER_FAST_CASES]
    script = (
        "import contextlib, io, json, sys, time\n"
        "from tvmq.cli import main\n"
        "results = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    t = time.perf_counter()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            code = main(argv)\n"
        "        except SystemExit as e:\n"
        "            code = e.code\n"
        "    results.append([code, err.getvalue(), time.perf_counter() - t])\n"
        "heavy = [m for m in ('tvm', 'tvm_ffi', 'torch', 'numpy') if m in sys.modules]\n"
        "print(json.dumps({'results': results, 'heavy': heavy}))\n"
    )
    start = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["heavy"] == [], f"option checks imported {report['heavy']}"
    for argv, says, (code, err, seconds) in zip(cases, expected, report["results"], strict=True):
        assert code == 2, (argv, err)
        assert err.startswith("tvmq: error:") and err.count("\n") == 1, (argv, err)
        assert says in err, (argv, err)
        assert seconds < 0.5, (argv, seconds)
    assert wall < 10, f"{len(cases)} refusals took {wall:.1f} s"


def test_scheme_options_become_the_scheme():
    from tvmq.cli_options import make_scheme
    from tvmq.targets import get_target

    def scheme(*options):
        args = build_parser().parse_args(["compile", "m.onnx", "-o", "o", *options])
        return make_scheme(args, get_target("host"))

    assert scheme() is None
    s = scheme("--quantize", "int8", "--calib", "c.npz", "--smooth", "0.8", "--per-tensor")
    assert s.smooth == (("after:layer_norm", 0.8),) and s.weight_per_channel is False
    s = scheme("--quantize", "int8", "--calib", "c.npz", "--observer", "auto", "--requantize",
               "integer")  # fmt: skip
    assert s.observer == "auto" and s.requantize == "integer" and s.smooth  # smooth stays on
    assert scheme("--quantize", "int8-dynamic", "--per-tensor").weight_per_channel is False
