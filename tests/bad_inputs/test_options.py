"""Bad or contradictory command-line options: one line, exit 2, before any model is loaded.

Each case here is decidable from the options alone, so ``tvmq.compile`` / ``tvmq.load``
are replaced by functions that fail the test: the refusal has to come first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def option_files(tmp_path_factory) -> dict[str, Path]:
    """A model file and a valid calibration file: only the options are wrong."""
    d = tmp_path_factory.mktemp("options")
    (d / "m.onnx").write_bytes(b"never read: the options are refused first")
    np.savez(d / "calib.npz", x=np.ones((4, 8), np.float32))
    return {"model": d / "m.onnx", "calib": d / "calib.npz"}


@pytest.fixture
def nothing_heavy_runs(monkeypatch):
    """Fail the test if the CLI gets as far as compiling, tuning, loading or importing."""
    import tvmq
    import tvmq.frontends

    def too_late(*args, **kwargs):
        pytest.fail("the options were not refused before the heavy work started")

    for name in ("compile", "load"):
        monkeypatch.setattr(tvmq, name, too_late)
    monkeypatch.setattr(tvmq.frontends, "import_model", too_late)


C = "{calib}"
# case: (options after `tvmq compile MODEL -o OUT`, message part)
COMPILE_CASES = {
    "int8-dynamic-with-observer": (
        ["--quantize", "int8-dynamic", "--observer", "minmax"],
        "takes no calibration",
    ),
    "int8-dynamic-with-calib": (
        ["--quantize", "int8-dynamic", "--calib", C],
        "takes no calibration",
    ),
    "w8-with-calib": (["--quantize", "w8", "--calib", C], "takes no calibration"),
    "w4-with-observer-and-calib": (
        ["--quantize", "w4", "--observer", "mse", "--calib", C],
        "--calib and --observer",
    ),
    "observer-without-quantize": (["--observer", "percentile"], "without --quantize"),
    "calib-without-quantize": (["--calib", C], "without --quantize"),
    "int8-without-calib": (["--quantize", "int8"], "needs --calib"),
    "unknown-observer": (
        ["--quantize", "int8", "--calib", C, "--observer", "median"],
        "unknown observer",
    ),
    "unknown-quantize": (["--quantize", "int3"], "invalid choice"),
    "zero-dim-shape": (["--input-shape", "x:0x8"], "at least 1"),
    "zero-sized-shape": (["--input-shape", "x:0"], "at least 1"),
    "negative-dim-shape": (["--input-shape", "x:2x-8"], "an integer or a name"),
    "empty-shape": (["--input-shape", "x:"], "an integer or a name"),
    "nameless-shape": (["--input-shape", "2x8"], "NAME:"),
    "same-input-twice": (["--input-shape", "x:2x8", "--input-shape", "x:4x8"], "twice"),
}


@pytest.mark.parametrize("case", sorted(COMPILE_CASES))
def test_bad_compile_options_are_refused_first(
    case, option_files, tmp_path, expect_user_error, nothing_heavy_runs
):
    options, says = COMPILE_CASES[case]
    options = [str(option_files["calib"]) if o == C else o for o in options]
    argv = ["compile", option_files["model"], "-o", tmp_path / "out", *options]
    expect_user_error(argv, watch=[tmp_path, *option_files.values()], contains=says)


# case: (argv after `tvmq`, with {dir} for the compiled model directory; message part)
OTHER_CASES = {
    "bench-repeat-zero": (["bench", "{dir}", "--repeat", "0"], "--repeat: must be at least 1"),
    "bench-repeat-negative": (["bench", "{dir}", "--repeat", "-5"], "--repeat: must be at least 1"),
    "bench-warmup-negative": (["bench", "{dir}", "--warmup", "-1"], "--warmup: must be at least 0"),
    "bench-repeat-not-int": (["bench", "{dir}", "--repeat", "ten"], "not an integer"),
    "inspect-zero-dim-shape": (["inspect", "{model}", "--input-shape", "x:2x0"], "at least 1"),
    "tune-zero-dim-shape": (["tune", "{model}", "--input-shape", "x:0x8"], "at least 1"),
}


@pytest.mark.parametrize("case", sorted(OTHER_CASES))
def test_bad_run_time_options_are_refused_first(
    case, option_files, compiled_mlp_dir, expect_user_error, nothing_heavy_runs
):
    argv, says = OTHER_CASES[case]
    argv = [a.format(dir=compiled_mlp_dir, model=option_files["model"]) for a in argv]
    expect_user_error(argv, watch=[compiled_mlp_dir, *option_files.values()], contains=says)


def test_quantize_choices_match_the_schemes():
    """The CLI's table of calibrated schemes is what tvmq.quantization says."""
    from tvmq.cli import QUANTIZE_SCHEMES
    from tvmq.core.schemes import list_schemes
    from tvmq.quantization import get_scheme

    assert sorted(QUANTIZE_SCHEMES) == sorted(list_schemes())
    for name, calibrated in QUANTIZE_SCHEMES.items():
        assert (getattr(get_scheme(name), "observer", None) is not None) == calibrated, name


def test_good_bench_options_still_run(compiled_mlp_dir, cli):
    status, out, err = cli(["bench", compiled_mlp_dir, "--warmup", "0", "--repeat", "1"])
    assert status == 0, err
    assert "1 runs after 0 warm-up" in out
