import subprocess
import sys

import numpy as np
import pytest
import torch

from tvmq.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_is_followable():
    r = subprocess.run([sys.executable, "-m", "tvmq.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for word in ("compile", "run", "bench", "targets", "inspect", "demo", "examples:"):
        assert word in r.stdout


def test_targets_lists_presets(capsys):
    code, out, _ = run_cli(capsys, "targets")
    assert code == 0
    for name in ("host", "x86-avx512-vnni", "rasp4b", "cuda-sm80"):
        assert name in out


def test_unknown_target_is_exit_2_one_line(capsys, tmp_path, small_mlp):
    ep = torch.export.export(small_mlp, (torch.zeros(1, 32),))
    torch.export.save(ep, tmp_path / "m.pt2")
    code, _, err = run_cli(
        capsys, "compile", str(tmp_path / "m.pt2"), "-t", "pdp-11", "-o", str(tmp_path / "o")
    )
    assert code == 2
    assert err.startswith("tvmq: error: ") and "pdp-11" in err and "host" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_missing_file_is_exit_2(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o")
    )
    assert code == 2 and "nope.onnx: no such file" in err


def test_compile_run_bench_inspect(capsys, tmp_path, small_mlp, rng):
    ep = torch.export.export(small_mlp, (torch.zeros(2, 32),))
    torch.export.save(ep, tmp_path / "m.pt2")
    out = tmp_path / "build"
    code, stdout, _ = run_cli(capsys, "-q", "compile", str(tmp_path / "m.pt2"), "-o", str(out))
    assert code == 0 and "wrote" in stdout

    x = rng.standard_normal((2, 32)).astype("float32")
    np.savez(tmp_path / "x.npz", x=x)
    code, stdout, _ = run_cli(
        capsys, "run", str(out), "-i", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz")
    )
    assert code == 0 and "output0: shape (2, 10)" in stdout
    with torch.no_grad():
        ref = small_mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["output0"], ref, atol=1e-5)

    code, stdout, _ = run_cli(capsys, "bench", str(out), "--warmup", "1", "--repeat", "5")
    assert code == 0 and "median" in stdout and "p90" in stdout

    code, stdout, _ = run_cli(capsys, "inspect", str(out))
    assert code == 0 and '"sha256"' in stdout

    code, stdout, _ = run_cli(capsys, "inspect", str(tmp_path / "m.pt2"))
    assert code == 0 and "matmul" in stdout and "input  x: [2, 32] float32" in stdout


def test_wrong_input_shape_is_exit_2(capsys, tmp_path, compiled_mlp_dir):
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 32), np.float32))
    code, _, err = run_cli(capsys, "run", str(compiled_mlp_dir), "-i", str(tmp_path / "bad.npz"))
    assert code == 2 and "input 'x': shape (5, 32)" in err


def test_wrong_input_name_is_exit_2(capsys, tmp_path, compiled_mlp_dir):
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 32), np.float32), b=np.zeros(1))
    code, _, err = run_cli(capsys, "run", str(compiled_mlp_dir), "-i", str(tmp_path / "two.npz"))
    assert code == 2 and "no array for input(s) ['x']" in err


def test_bad_shape_syntax_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "m.onnx", "-o", "x", "--input-shape", "1x3"])
    assert e.value.code == 2
