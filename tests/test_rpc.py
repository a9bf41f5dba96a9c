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
