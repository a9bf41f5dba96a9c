"""Compiled models on emulated aarch64 boards over TVM RPC (tvmq.rpc + .ci/board/).

The session fixture starts a tracker and two qemu-aarch64 boards with ``.ci/board/boards.py``
under a key of its own, and stops them at the end. It needs the sysroot that
``.ci/board/setup-sysroot.sh`` builds and the aarch64 cross compiler:

* neither there and ``TVMQ_BOARD_DIR`` unset: the tests are skipped (a developer machine);
* ``TVMQ_BOARD_DIR`` set (CI runs the setup with it): a missing setup fails every test.

The dead-board test kills one board and must stay last in this file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import tvmq
from tvmq.demo import make_cnn, make_mlp
from tvmq.errors import InputMismatchError, TvmqError
from tvmq.rpc import BoardError, RemoteModel, connect

pytestmark = pytest.mark.board

BOARDS_PY = Path(__file__).resolve().parents[1] / ".ci" / "board" / "boards.py"
BOARD_TARGETS = ["rasp4b", "arm-a76"]
ERROR_TIMEOUT_S = 30.0  # every failure must surface well within this


def _load_boards_module():
    spec = importlib.util.spec_from_file_location("tvmq_ci_boards", BOARDS_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


boards_py = _load_boards_module()


@dataclass
class Boards:
    state_file: Path
    key: str
    port: int
    board_ports: set[int]
    pids: dict[int, int]  # board port -> process group id


@pytest.fixture(scope="session")
def boards(tmp_path_factory) -> Boards:
    expected = bool(os.environ.get("TVMQ_BOARD_DIR"))
    problem = None
    if not boards_py.is_set_up():
        problem = f"no emulated board in {boards_py.board_dir()}: run .ci/board/setup-sysroot.sh"
    elif shutil.which("aarch64-linux-gnu-g++") is None:
        problem = "no aarch64-linux-gnu-g++ (Debian g++-aarch64-linux-gnu)"
    if problem:
        if expected:
            pytest.fail(f"TVMQ_BOARD_DIR is set, so the board setup was expected: {problem}")
        pytest.skip(f"{problem} (set TVMQ_BOARD_DIR to make this a failure)")

    state_file = tmp_path_factory.mktemp("boards") / "boards.json"
    key = f"tvmq-test-{os.getpid()}"
    cmd = [sys.executable, str(BOARDS_PY), "--state", str(state_file)]
    started = subprocess.run(
        [*cmd, "start", "2", key, "--port", "0"], capture_output=True, text=True, timeout=300
    )
    if started.returncode != 0:
        pytest.fail(f"starting the boards failed:\n{started.stderr}")
    state = json.loads(state_file.read_text())
    print(f"\nboards up in {state['startup_s']} s")
    groups = [p["pid"] for p in [state["tracker"], *state["boards"]]]
    try:
        yield Boards(
            state_file,
            key,
            state["tracker"]["port"],
            {b["port"] for b in state["boards"]},
            {b["port"]: b["pid"] for b in state["boards"]},
        )
    finally:
        stopped = subprocess.run([*cmd, "stop"], capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert not state_file.exists()
        stray = {g: boards_py._group_members(g) for g in groups}
        assert not any(stray.values()), f"processes left after stop: {stray}"


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """The demo MLP and CNN (random weights), each built for the host and both boards."""
    root = tmp_path_factory.mktemp("rpc-models")
    out = {}
    for name, make in (("mlp", make_mlp), ("cnn", make_cnn)):
        torch.manual_seed(0)
        model = make().eval()
        example = (torch.zeros(2, 784),)
        for target in ["host", *BOARD_TARGETS]:
            out[name, target] = root / f"{name}-{target}"
            tvmq.compile(
                model, target, example_inputs=example, output_dir=out[name, target], progress=False
            )
    return out


def _inputs(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 784)).astype("float32")


@pytest.mark.parametrize("target", BOARD_TARGETS)
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_board_output_equals_host(boards, compiled, model, target):
    x = _inputs()
    expected = tvmq.load(compiled[model, "host"])(x)
    with connect("127.0.0.1", boards.port, boards.key, timeout=ERROR_TIMEOUT_S) as session:
        remote = RemoteModel(compiled[model, target], session)
        assert session.address[1] in boards.board_ports
        y = remote(x)
        assert y.shape == expected.shape and y.dtype == expected.dtype
        assert np.abs(y - expected).max() < 1e-5
        name = remote.inputs[0].name
        assert np.abs(remote(**{name: x}) - expected).max() < 1e-5
    with pytest.raises(BoardError, match="session was closed"):
        remote(x)


def test_benchmark_over_rpc(boards, compiled):
    with connect("127.0.0.1", boards.port, boards.key) as session:
        stats = RemoteModel(compiled["mlp", "rasp4b"], session).benchmark(warmup=1, repeat=5)
    assert stats.repeat == 5
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms


def test_inputs_checked_against_manifest(boards, compiled):
    with connect("127.0.0.1", boards.port, boards.key) as session:
        remote = RemoteModel(compiled["mlp", "arm-a76"], session)
        with pytest.raises(InputMismatchError, match="shape"):
            remote(np.zeros((3, 784), "float32"))
        with pytest.raises(InputMismatchError, match="dtype"):
            remote(np.zeros((2, 784), "float64"))
        assert remote(_inputs()).shape == (2, 10)  # the session still works


def test_two_sessions_use_both_boards_and_a_third_times_out(boards, compiled):
    x = _inputs(1)
    expected = tvmq.load(compiled["cnn", "host"])(x)
    with (
        connect("127.0.0.1", boards.port, boards.key) as first,
        connect("127.0.0.1", boards.port, boards.key) as second,
    ):
        assert {first.address[1], second.address[1]} == boards.board_ports
        for session in (first, second):
            y = RemoteModel(compiled["cnn", "rasp4b"], session)(x)
            assert np.abs(y - expected).max() < 1e-5
        start = time.monotonic()
        with pytest.raises(BoardError, match="busy"):
            connect("127.0.0.1", boards.port, boards.key, timeout=2)
        assert time.monotonic() - start < ERROR_TIMEOUT_S


def test_wrong_key_fails_within_timeout(boards):
    start = time.monotonic()
    with pytest.raises(BoardError, match="no board is registered under key 'no-such-board'"):
        connect("127.0.0.1", boards.port, "no-such-board", timeout=2)
    assert time.monotonic() - start < ERROR_TIMEOUT_S


def test_unreachable_tracker():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TvmqError, match="cannot reach the RPC tracker"):
        connect("127.0.0.1", port, "rasp4b", timeout=5)
    assert time.monotonic() - start < 10


def test_host_library_does_not_load_on_board(boards, compiled):
    with (
        connect("127.0.0.1", boards.port, boards.key) as session,
        pytest.raises(BoardError, match="target 'host'"),
    ):
        RemoteModel(compiled["mlp", "host"], session)


# --------------------------------------------------------------------------------------
# int8 on the boards: tvmq's AArch64 kernels, quantized models, tuning over RPC


def _int8_dense_cases() -> list[tuple[tuple[int, ...], str, np.ndarray]]:
    """(x shape, x dtype, weight): M=1, ragged K/N/M, 3-D input, uint8 activations."""
    rng = np.random.default_rng(5)
    shapes = [((1, 64), "int8", 32), ((13, 30), "uint8", 7), ((2, 5, 33), "int8", 10)]
    shapes += [((24, 128), "uint8", 48)]
    return [(x, dt, rng.integers(-128, 128, (x[-1], n), dtype=np.int8)) for x, dt, n in shapes]


def _int8_dense_module(cases) -> tvm.IRModule:
    """main(x0, x1, ...) = (matmul(x_i, W_i, out_dtype=int32), ...) as LowerInt8 emits them."""
    xs = [relax.Var(f"x{i}", relax.TensorType(shape, dt)) for i, (shape, dt, _) in enumerate(cases)]
    bb = relax.BlockBuilder()
    with bb.function("main", xs):
        with bb.dataflow():
            ys = [
                bb.emit(relax.op.matmul(x, relax.const(w), out_dtype="int32"))
                for x, (_, _, w) in zip(xs, cases, strict=True)
            ]
            out = bb.emit_output(relax.Tuple(ys))
        bb.emit_func_output(out)
    return bb.get()


def _run_on_board(session, lib_path: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Upload a library, run its main through the VM's stateful calls, fetch every output."""
    from tvmq.rpc import _fetch_outputs

    rpc = session.rpc
    rpc.upload(str(lib_path), target=lib_path.name)
    dev = session.device("cpu", 0)
    vm = relax.VirtualMachine(rpc.load_module(lib_path.name), dev)
    vm.set_input("main", *[tvm.runtime.tensor(x, dev) for x in inputs])
    vm.invoke_stateful("main")
    return _fetch_outputs(vm.module, ())


@pytest.mark.parametrize(("target", "instruction"), [("arm-a76", "sdot"), ("rasp4b", "neon")])
def test_arm_int8_dense_kernel_bit_exact_on_board(boards, tmp_path, target, instruction):
    from tvmq.build import build, export_library
    from tvmq.passes.pack_int8_dense_arm import PackInt8DenseARM
    from tvmq.targets import get_target

    cases = _int8_dense_cases()
    mod = PackInt8DenseARM(get_target(target).tvm_target())(_int8_dense_module(cases))
    kinds = {
        f.attrs["tvmq.kernel"] for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)
    }
    assert kinds == {f"int8_dense_{instruction}"}
    lib = tmp_path / f"int8-dense-{target}.so"
    export_library(build(mod, target), lib, target)
    rng = np.random.default_rng(11)
    xs = [
        rng.integers(0 if dt == "uint8" else -128, 256 if dt == "uint8" else 128, shape).astype(dt)
        for shape, dt, _ in cases
    ]
    with connect("127.0.0.1", boards.port, boards.key, timeout=ERROR_TIMEOUT_S) as session:
        ys = _run_on_board(session, lib, xs)
    for x, (_, _, w), y in zip(xs, cases, ys, strict=True):
        np.testing.assert_array_equal(y, x.astype(np.int32) @ w.astype(np.int32))


# Static int8 with the same scheme on every target (a scheme name would pick uint8 activations
# on a VNNI host and int8 on ARM): the MLP with int8, the CNN with uint8 activations.
QUANT_SCHEMES = {"mlp": "int8", "cnn": "uint8"}


@pytest.fixture(scope="session")
def compiled_int8(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """The demo MLP and CNN quantized to static int8, built for the host and both boards."""
    from tvmq.quantization import Int8Static

    root = tmp_path_factory.mktemp("rpc-int8-models")
    rng = np.random.default_rng(3)
    calibration = [rng.standard_normal((2, 784)).astype("float32") for _ in range(8)]
    out = {}
    for name, make in (("mlp", make_mlp), ("cnn", make_cnn)):
        torch.manual_seed(0)
        model = make().eval()
        scheme = Int8Static(activation_dtype=QUANT_SCHEMES[name])
        for target in ["host", *BOARD_TARGETS]:
            out[name, target] = root / f"{name}-int8-{target}"
            tvmq.compile(
                model,
                target,
                example_inputs=(torch.zeros(2, 784),),
                output_dir=out[name, target],
                quantize=scheme,
                calibration_data=calibration,
                progress=False,
            )
    return out


@pytest.mark.parametrize("target", BOARD_TARGETS)
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_quantized_board_output_equals_host(boards, compiled_int8, model, target):
    """Integer kernels agree exactly; the float rescale after them may round differently."""
    from tvmq.manifest import Manifest

    prescheduled = Manifest.read(compiled_int8[model, target]).notes["kernels"]["prescheduled"]
    kind = "sdot" if target == "arm-a76" else "neon"
    assert any(f"tvmq_int8_dense_{kind}_" in k for k in prescheduled), prescheduled
    x = _inputs(2)
    expected = tvmq.load(compiled_int8[model, "host"])(x)
    with connect("127.0.0.1", boards.port, boards.key, timeout=ERROR_TIMEOUT_S) as session:
        y = RemoteModel(compiled_int8[model, target], session)(x)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    # The outputs are dequantized logits: allow float rounding, far below one int8 step
    # (a step of the logits' range is ~1% of it).
    step = (expected.max() - expected.min()) / 255
    diff = np.abs(y - expected).max()
    print(f"{model} on {target}: max |board - host| = {diff:.3g} (one step ~ {step:.3g})")
    assert diff <= 1e-5 * max(1.0, np.abs(expected).max()) or diff <= step


def test_tune_over_rpc_writes_records(boards, tmp_path):
    """A short MetaSchedule tune for arm-a76 measured on the emulated boards."""
    from tvmq.tuning import RECORD_FILE, WORKLOAD_FILE, tune

    x = relax.Var("x", relax.TensorType((4, 32), "float32"))
    w = np.random.default_rng(0).standard_normal((32, 16)).astype("float32")
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(relax.op.matmul(x, relax.const(w))))
        bb.emit_func_output(out)
    work_dir = tmp_path / "arm-a76"
    report = tune(
        bb.get(),
        "arm-a76",
        work_dir=work_dir,
        trials=2,
        trials_per_batch=2,
        rpc=("127.0.0.1", boards.port, boards.key),
        progress=False,
        seed=0,
    )
    assert report.new_trials == 2
    assert report.tuned == 1, report.summary()  # at least one candidate built and ran
    assert (work_dir / WORKLOAD_FILE).is_file()
    assert len((work_dir / RECORD_FILE).read_text().splitlines()) == 2


def test_dead_board_mid_run_is_an_error(boards, compiled):
    """Kill the board during a long benchmark; must stay the last test (one board is gone)."""
    session = connect("127.0.0.1", boards.port, boards.key)
    remote = RemoteModel(compiled["cnn", "rasp4b"], session)
    victim = boards.pids[session.address[1]]
    threading.Timer(1.0, os.killpg, (victim, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(BoardError, match="disconnected or died"):
        remote.benchmark(warmup=0, repeat=100_000)
    assert time.monotonic() - start < ERROR_TIMEOUT_S
    with pytest.raises(BoardError):
        remote(_inputs())
    session.close()

    problems = boards_py.status(boards.state_file)
    assert any("died" in p for p in problems), problems
    # The tracker drops the dead board; the other one still serves.
    deadline = time.monotonic() + ERROR_TIMEOUT_S
    with connect("127.0.0.1", boards.port, boards.key, timeout=ERROR_TIMEOUT_S) as other:
        assert other.address[1] != session.address[1]
        assert RemoteModel(compiled["mlp", "rasp4b"], other)(_inputs()).shape == (2, 10)
    assert time.monotonic() < deadline
