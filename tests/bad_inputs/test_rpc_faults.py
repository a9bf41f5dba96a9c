"""RPC faults: every one is one line on stderr, exit 2, no traceback, nothing left behind.

The tracker faults (unreachable, silent, not a tracker, closing, garbled replies, no board
under the key, a board that refuses or never answers) use tiny fake trackers on 127.0.0.1
and run in seconds. Boards killed in the middle of ``tvmq run`` and ``tvmq tune`` need the
emulated aarch64 boards of ``.ci/board/`` (``board`` marker), started here as
``tests/test_rpc.py`` starts them, but per test: each test kills one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

LOOPBACK = "127.0.0.1"
FAST_TIMEOUT_S = 1.0  # --rpc-timeout for the fake trackers
FAULT_DEADLINE_S = 15.0  # every fake-tracker fault must end well within this


# --------------------------------------------------------------------------------------
# Fake trackers


class FakeTracker:
    """A TCP server on 127.0.0.1 (ephemeral port) that runs ``handle(conn)`` per connection."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.handle = handle
        self.server = socket.create_server((LOOPBACK, 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed by close()
                return
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handle(conn)

    def close(self) -> None:
        # shutdown() wakes the accept() in the server thread; close() alone would not.
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for conn in self.conns:
            conn.close()
        self.thread.join(5)


def never_answers(conn: socket.socket) -> None:
    """Accept, read whatever comes, never write (until the test closes the connection)."""
    while conn.recv(1024):
        pass


def answers_garbage(conn: socket.socket) -> None:
    """Some other service on the port: an HTTP error instead of the tracker's magic."""
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    never_answers(conn)


def closes_at_once(conn: socket.socket) -> None:
    conn.close()


def _magic() -> bytes:
    from tvm.rpc import base

    return struct.pack("<i", base.RPC_TRACKER_MAGIC)


def _read_request(conn: socket.socket) -> list | None:
    header = conn.recv(4, socket.MSG_WAITALL)
    if len(header) < 4:
        return None
    size = struct.unpack("<i", header)[0]
    return json.loads(conn.recv(size, socket.MSG_WAITALL))


def _send_reply(conn: socket.socket, value) -> None:
    data = json.dumps(value).encode()
    conn.sendall(struct.pack("<i", len(data)) + data)


def handshake_then_garbage(conn: socket.socket) -> None:
    """Knows the magic number, then answers a request with a length and no JSON."""
    conn.recv(4, socket.MSG_WAITALL)
    conn.sendall(_magic())
    _read_request(conn)
    conn.sendall(struct.pack("<i", 5) + b"\xff{{{{")
    never_answers(conn)


def protocol_tracker(boards: dict[str, int]) -> Callable[[socket.socket], None]:
    """A tracker that speaks the protocol: ``boards`` maps a key to a board's port."""
    from tvm.rpc.base import TrackerCode

    def handle(conn: socket.socket) -> None:
        conn.recv(4, socket.MSG_WAITALL)
        conn.sendall(_magic())
        while (request := _read_request(conn)) is not None:
            if request[0] == TrackerCode.SUMMARY:
                servers = [{"key": f"server:{k}", "addr": [LOOPBACK, p]} for k, p in boards.items()]
                _send_reply(conn, [TrackerCode.SUCCESS, {"server_info": servers, "queue_info": {}}])
            elif request[0] == TrackerCode.REQUEST and request[1] in boards:
                key = request[1]
                _send_reply(conn, [TrackerCode.SUCCESS, [LOOPBACK, boards[key], f"{key}:0"]])
            else:
                _send_reply(conn, [TrackerCode.FAIL])

    return handle


def closed_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fake_tracker(handle) -> Iterator[int]:
    tracker = FakeTracker(handle)
    try:
        yield tracker.port
    finally:
        tracker.close()


@contextlib.contextmanager
def silent_board() -> Iterator[int]:
    """A board port that accepts TVM's RPC client and never answers it."""
    with fake_tracker(never_answers) as port:
        yield port


# --------------------------------------------------------------------------------------
# Tracker and board-session faults (no emulated board)


@pytest.fixture
def run_argv(compiled_mlp_dir, tmp_path) -> Callable[[str, int], tuple[list, list]]:
    """``(command, tracker port) -> (argv, watched paths)`` for run, bench and tune."""
    x = tmp_path / "x.npz"
    np.savez(x, x=np.zeros((2, 32), "float32"))
    model = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(8, 4), (torch.zeros(2, 8),)), model)
    rpc = ["--key", "k", "--rpc-timeout", FAST_TIMEOUT_S]

    def argv(command: str, port: int) -> tuple[list, list]:
        address = ["--rpc", f"{LOOPBACK}:{port}", *rpc]
        if command == "run":
            args = ["run", compiled_mlp_dir, "-i", x, "-o", tmp_path / "y.npz", *address]
        elif command == "bench":
            args = ["bench", compiled_mlp_dir, *address]
        else:
            args = ["tune", model, "-t", "arm-a76", "--trials", "2", *address]
        return args, [compiled_mlp_dir, tmp_path]

    return argv


def _expect_fast_error(expect_user_error, argv, watch, contains: str) -> str:
    start = time.monotonic()
    line = expect_user_error(argv, watch=watch, contains=contains)
    assert time.monotonic() - start < FAULT_DEADLINE_S, line
    return line


@pytest.mark.parametrize("command", ["run", "bench", "tune"])
def test_tracker_never_answers(expect_user_error, run_argv, tmp_path, monkeypatch, command):
    """The reviewer's case: this was an internal UnboundLocalError ('boards')."""
    monkeypatch.chdir(tmp_path)  # tune would write ./tuning_logs/arm-a76 here
    with fake_tracker(never_answers) as port:
        argv, watch = run_argv(command, port)
        line = _expect_fast_error(expect_user_error, argv, watch, "did not answer within 1 s")
    assert f"{LOOPBACK}:{port}" in line
    assert not (tmp_path / "tuning_logs").exists()


@pytest.mark.parametrize(
    ("handle", "contains"),
    [
        (answers_garbage, "is not a TVM RPC tracker (it did not answer with the tracker's magic"),
        (closes_at_once, "closed the connection during the handshake"),
        (handshake_then_garbage, "not the TVM tracker protocol"),
    ],
    ids=["garbage", "closes", "garbled-reply"],
)
def test_tracker_misbehaves(expect_user_error, run_argv, handle, contains):
    with fake_tracker(handle) as port:
        argv, watch = run_argv("run", port)
        _expect_fast_error(expect_user_error, argv, watch, contains)


def test_tracker_unreachable(expect_user_error, run_argv):
    argv, watch = run_argv("run", closed_port())
    line = _expect_fast_error(expect_user_error, argv, watch, "cannot reach the RPC tracker")
    # The command it suggests binds the tracker to loopback, not to every interface.
    assert f"--host {LOOPBACK}" in line and "0.0.0.0" not in line


def test_no_board_under_key(expect_user_error, run_argv):
    with fake_tracker(protocol_tracker({"other-board": closed_port()})) as port:
        argv, watch = run_argv("run", port)
        line = _expect_fast_error(
            expect_user_error, argv, watch, "no board is registered under key 'k'"
        )
    assert line.endswith("keys there: ['other-board'])"), line


@pytest.mark.parametrize("command", ["run", "tune"])
def test_board_refuses(expect_user_error, run_argv, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    board = closed_port()
    with fake_tracker(protocol_tracker({"k": board})) as port:
        argv, watch = run_argv(command, port)
        line = _expect_fast_error(expect_user_error, argv, watch, "refused the session")
    assert f"board {LOOPBACK}:{board}" in line


def test_board_never_answers(expect_user_error, run_argv, monkeypatch):
    import tvmq.rpc_session

    monkeypatch.setattr(tvmq.rpc_session, "_MIN_SESSION_S", 0.5)  # the emulated boards' grace time
    with silent_board() as board, fake_tracker(protocol_tracker({"k": board})) as port:
        argv, watch = run_argv("run", port)
        _expect_fast_error(expect_user_error, argv, watch, "did not start a session")


def test_connect_raises_board_error_with_every_fault():
    """The Python API sees the same faults as BoardError (a TvmqError), never anything else."""
    from tvmq.rpc import BoardError, connect

    handles = [never_answers, answers_garbage, closes_at_once, handshake_then_garbage]
    for handle in handles:
        with fake_tracker(handle) as port, pytest.raises(BoardError, match=f":{port}"):
            connect(LOOPBACK, port, "k", timeout=FAST_TIMEOUT_S)


# --------------------------------------------------------------------------------------
# Boards killed mid-run and mid-tune (emulated boards)

BOARDS_PY = Path(__file__).resolve().parents[2] / ".ci" / "board" / "boards.py"


def _boards_module():
    spec = importlib.util.spec_from_file_location("tvmq_ci_boards_faults", BOARDS_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Boards:
    """A tracker and boards started by ``.ci/board/boards.py``, all on 127.0.0.1."""

    def __init__(self, state_file: Path, key: str) -> None:
        state = json.loads(state_file.read_text())
        self.state_file = state_file
        self.key = key
        self.port = state["tracker"]["port"]
        self.groups = [state["tracker"]["pid"], *(b["pid"] for b in state["boards"])]
        self.board_groups = self.groups[1:]

    def kill_board(self, index: int = 0) -> None:
        os.killpg(self.board_groups[index], signal.SIGKILL)

    def rpc_argv(self) -> list:
        return ["--rpc", f"{LOOPBACK}:{self.port}", "--key", self.key, "--rpc-timeout", 5]


@pytest.fixture
def start_boards(tmp_path_factory) -> Iterator[Callable[[int], Boards]]:
    """``start_boards(n)``: n fresh boards behind a tracker, all stopped after the test."""
    boards_py = _boards_module()
    if not boards_py.is_set_up() or shutil.which("aarch64-linux-gnu-g++") is None:
        if os.environ.get("TVMQ_BOARD_DIR"):
            pytest.fail(f"TVMQ_BOARD_DIR is set but no board is set up in {boards_py.board_dir()}")
        pytest.skip("no emulated board: run .ci/board/setup-sysroot.sh (and set TVMQ_BOARD_DIR)")
    started: list[tuple[list, Boards]] = []

    def start(n: int) -> Boards:
        state_file = tmp_path_factory.mktemp("fault-boards") / "boards.json"
        key = f"tvmq-faults-{os.getpid()}-{len(started)}"
        cmd = [sys.executable, str(BOARDS_PY), "--state", str(state_file)]
        done = subprocess.run(
            [*cmd, "start", str(n), key, "--port", "0"], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        boards = Boards(state_file, key)
        started.append((cmd, boards))
        return boards

    yield start
    for cmd, boards in started:
        stopped = subprocess.run([*cmd, "stop"], capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        stray = {g: boards_py._group_members(g) for g in boards.groups}
        assert not any(stray.values()), f"processes left after stop: {stray}"


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """A temporary folder for this process and its workers, to see what is left in it."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture(scope="module")
def mlp_for_board(tmp_path_factory) -> Path:
    import tvmq

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    out = tmp_path_factory.mktemp("board-model") / "mlp-rasp4b"
    tvmq.compile(
        model.eval(), "rasp4b", example_inputs=(torch.zeros(2, 32),), output_dir=out,
        progress=False,
    )  # fmt: skip
    return out


@pytest.mark.board
def test_board_killed_mid_run(
    expect_user_error, start_boards, mlp_for_board, tmp_path, monkeypatch
):
    """``tvmq run --rpc``: the board dies after the model is loaded, before it runs."""
    from tvmq.rpc import RemoteModel

    boards = start_boards(1)
    set_inputs = RemoteModel._set_inputs

    def kill_then_set_inputs(self, arrays):
        boards.kill_board()
        time.sleep(0.5)  # the board's sockets are closed by then
        return set_inputs(self, arrays)

    monkeypatch.setattr(RemoteModel, "_set_inputs", kill_then_set_inputs)
    x = tmp_path / "x.npz"
    np.savez(x, x=np.zeros((2, 32), "float32"))
    argv = ["run", mlp_for_board, "-i", x, "-o", tmp_path / "y.npz", *boards.rpc_argv()]
    start = time.monotonic()
    line = expect_user_error(argv, watch=[mlp_for_board, tmp_path], contains="disconnected or died")
    assert "failed while running the model" in line
    assert time.monotonic() - start < 60


def _tune_model(folder: Path) -> Path:
    """A .pt2 with one tunable kernel (dense + ReLU)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU()).eval()
    path = folder / "dense.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(4, 32),)), path)
    return path


def _kill_after_first_batch(monkeypatch, kill: Callable[[], None]) -> list[int]:
    """Kill a board once the first batch (the default schedule) has been measured."""
    from tvmq import tuning_measure

    update = tuning_measure.Progress.update
    batches: list[int] = []

    def update_then_kill(self, run_secs):
        update(self, run_secs)
        batches.append(len(run_secs))
        if len(batches) == 1:
            kill()
            time.sleep(1.0)  # let the tracker see the board's connection close

    monkeypatch.setattr(tuning_measure.Progress, "update", update_then_kill)
    return batches


def _records(work_dir: Path) -> list[str]:
    from tvmq.tuning import RECORD_FILE

    return (work_dir / RECORD_FILE).read_text().splitlines()


@pytest.mark.board
@pytest.mark.tuning
def test_board_killed_mid_tune_ends_with_one_line(
    expect_user_error, start_boards, tmp_path, private_tmp, monkeypatch
):
    """The only board dies: the tune stops with one line and keeps the record it measured."""
    boards = start_boards(1)
    batches = _kill_after_first_batch(monkeypatch, boards.kill_board)
    work_dir = tmp_path / "logs"
    argv = ["tune", _tune_model(tmp_path), "-t", "arm-a76", "--trials", "2"]
    argv += ["--work-dir", work_dir, "--cost-model", "random", *boards.rpc_argv()]
    start = time.monotonic()
    line = expect_user_error(argv, watch=[private_tmp], contains="no board to measure on")
    assert f"no board is registered under key {boards.key!r}" in line
    assert f"the records measured so far are in {work_dir}" in line
    assert batches == [1]  # the default schedule, measured before the board died
    assert len(_records(work_dir)) == 1
    # Without tvmq's runner the tune waited for a board forever; 2 loaded cores need minutes.
    assert time.monotonic() - start < 600


@pytest.mark.board
@pytest.mark.tuning
def test_board_killed_mid_tune_goes_on_with_the_other(
    cli, start_boards, tmp_path, private_tmp, monkeypatch
):
    """One of two boards dies: the tune finishes on the other one."""
    boards = start_boards(2)
    batches = _kill_after_first_batch(monkeypatch, boards.kill_board)
    work_dir = tmp_path / "logs"
    argv = ["tune", _tune_model(tmp_path), "-t", "arm-a76", "--trials", "2"]
    argv += ["--work-dir", work_dir, "--cost-model", "random", *boards.rpc_argv()]
    status, out, err = cli(argv)
    assert status == 0, err
    assert batches == [1, 1] and len(_records(work_dir)) == 2
    assert "Traceback" not in err
    assert not list(private_tmp.glob("tvmq-tune-*"))  # every built candidate removed
