"""Run a compiled tvmq directory on a board over TVM RPC, through an RPC tracker.

A board (a Raspberry Pi, a Jetson's CPU, or the emulated aarch64 board of ``.ci/board/``) runs
TVM's RPC server registered with a tracker under a key, e.g. ``rasp4b``. :func:`connect` asks
the tracker for a free board under that key; :class:`RemoteModel` uploads ``model.so`` to it and
runs or times the model there, with the same calling conventions as
:class:`tvmq.runtime.CompiledModel`::

    session = tvmq.rpc.connect("127.0.0.1", 9190, "rasp4b")
    model = tvmq.rpc.RemoteModel("build-pi/", session)
    y = model(x)                     # inputs checked against model.json, run on the board
    print(model.benchmark(repeat=20).median_ms)

The board needs only the TVM runtime and Python (``pip install apache-tvm``, then
``python -m tvm.exec.rpc_server --host BOARD_LAN_ADDRESS --tracker HOST:9190 --key rasp4b``);
the library was linked on this machine by the target's cross compiler.

Security: a TVM RPC server loads and runs any library uploaded to it, and a tracker hands
its boards to anyone who asks; tvmq sends libraries unsigned. Bind both to 127.0.0.1 or to
a private interface (TVM's default, ``0.0.0.0``, is every interface), or reach them through
an SSH tunnel; never expose them on a public address.

Every failure is a :class:`BoardError` (a :class:`~tvmq.errors.TvmqError`): the tracker cannot
be reached, closes the connection, does not answer within ``timeout`` or is not a TVM
tracker; no board is registered under the key; all of them stay busy past ``timeout``; the
board refuses the session; the library does not load on the board; or the board
disconnects in the middle of a call.

Limits: a board that hangs without closing its connection (stopped, not dead) makes a call
wait forever unless the session was opened with ``session_timeout``; TVM's RPC client has no
per-call timeout.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tvm
import tvm.rpc
import tvm_ffi
from tvm import relax
from tvm.rpc import base as rpc_base

from tvmq.errors import TvmqError
from tvmq.frontends.model import TensorSpec
from tvmq.manifest import Manifest
from tvmq.runtime import LatencyStats, check_inputs, random_inputs, verified_library

__all__ = ["BoardError", "BoardSession", "RemoteModel", "connect"]

DEFAULT_PORT = 9190
DEFAULT_TIMEOUT_S = 60.0
_POLL_S = 0.5
_MIN_IO_S = 1.0  # the least time a tracker gets to answer one request
_MIN_SESSION_S = 10.0  # the least time a board gets to start a session
_MAX_REPLY_BYTES = 16 << 20  # a longer reply is not from a tracker


@tvm_ffi.register_error  # raised inside MetaSchedule's C++ loop (tuning_runner), kept as is
class BoardError(TvmqError):
    """The tracker or a board cannot be reached, or a board failed during a call."""


class BoardSession:
    """An RPC session with one board, obtained from a tracker by :func:`connect`.

    The board serves no one else while the session is open; :meth:`close` (or leaving a
    ``with`` block) closes it and every :class:`RemoteModel` on it, and so gives the board
    back to the tracker.
    """

    def __init__(
        self, rpc: tvm.rpc.RPCSession, key: str, address: tuple[str, int], tracker: tuple[str, int]
    ):
        self._rpc = rpc
        self.key = key
        self.address = address
        self.tracker = tracker
        self._models: weakref.WeakSet[RemoteModel] = weakref.WeakSet()

    @property
    def rpc(self) -> tvm.rpc.RPCSession:
        """The TVM RPC session (for anything tvmq does not wrap)."""
        if self._rpc is None:
            raise BoardError(f"the session with {self.describe()} is closed")
        return self._rpc

    def device(self, kind: str = "cpu", index: int = 0) -> tvm.runtime.Device:
        """A device on the board, e.g. ``device("cpu", 0)``."""
        return self.rpc.device(kind, index)

    def describe(self) -> str:
        """``board 127.0.0.1:PORT (key K)``, for messages."""
        return f"board {self.address[0]}:{self.address[1]} (key {self.key!r})"

    def close(self) -> None:
        """Close the session and the models loaded through it; the board becomes free."""
        for model in list(self._models):
            model._release()
        self._rpc = None

    def __enter__(self) -> BoardSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._rpc is None else "open"
        return f"<BoardSession {self.describe()} via {self.tracker[0]}:{self.tracker[1]}, {state}>"


def connect(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    key: str = "rasp4b",
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    session_timeout: float = 0.0,
) -> BoardSession:
    """Get a session with a free board registered under ``key`` at the tracker ``host:port``.

    tvmq speaks the tracker's small JSON protocol (``tvm.rpc.base``) over its own socket
    rather than through ``tvm.rpc.connect_tracker``: TVM's client sets no socket timeout,
    and its constructor does the handshake before a caller could set one, so a tracker that
    accepts the connection and never answers hangs it forever; it also retries a refused
    connection for 60 s and turns every fault into the same ``RuntimeError``. Here every
    read and write is bounded by ``timeout``, and each fault gets its own message.

    Parameters
    ----------
    host, port : str, int
        The TVM RPC tracker.
    key : str
        The boards' key (a target preset's ``rpc_key``, e.g. ``"rasp4b"``).
    timeout : float
        Seconds to wait for the tracker to answer and for a board under ``key`` to be
        registered, free and to accept the session.
    session_timeout : float
        If non-zero, the board ends the session after this many seconds (TVM's own limit,
        enforced on the board); a call still running then fails with :class:`BoardError`.

    Returns
    -------
    BoardSession

    Raises
    ------
    BoardError
        The tracker is unreachable, closes the connection, does not answer within
        ``timeout`` or is not a TVM tracker; no board is registered under ``key`` within
        ``timeout`` (the message lists the keys the tracker knows); all are busy for
        ``timeout``; or the boards the tracker hands out refuse the session.
    """
    tracker = _Tracker(host, port, time.monotonic() + timeout, timeout)
    with tracker:
        boards = tracker.wait_for_boards(key)
        while True:
            board_host, board_port, match_key = tracker.request(key, boards)
            try:
                rpc = _open_session(board_host, board_port, match_key, session_timeout, tracker)
                break
            except BoardError:
                # A board that died a moment ago can still be in the tracker's queue: ask
                # again for another one until the time is up.
                if tracker.remaining() <= _POLL_S:
                    raise
                time.sleep(_POLL_S)
    return BoardSession(rpc, key, (board_host, int(board_port)), (host, port))


def tuning_session(rpc_config, timeout: float = DEFAULT_TIMEOUT_S) -> tvm.rpc.RPCSession:
    """MetaSchedule's ``f_create_session`` for :class:`~tvm.s_tir.meta_schedule.runner.RPCRunner`.

    Runs in the runner's worker process. Unlike MetaSchedule's default (TVM's tracker client,
    which waits forever for a board), a session that cannot be had within ``timeout`` fails
    with a message marked for :func:`tuning_runner`, which ends the tune.
    """
    try:
        session = connect(
            rpc_config.tracker_host,
            rpc_config.tracker_port,
            rpc_config.tracker_key,
            timeout,
            session_timeout=rpc_config.session_timeout_sec or 0.0,
        )
    except BoardError as err:
        raise BoardError(f"{NO_SESSION_MARK}{err}") from None
    return session.rpc


NO_SESSION_MARK = "[tvmq: no board session] "
"""Starts the message of a tuning worker that could not get a board (see :func:`tuning_runner`)."""


def tuning_runner(inner):
    """Wrap an ``RPCRunner`` so that a worker that cannot get a board ends the tune.

    A candidate that fails on the board (it crashes, or the board dies under it) is one
    failed measurement and the tune goes on with the boards left. But when no board can be
    had at all (:func:`tuning_session` failed: the tracker is gone, or no board is left
    under the key), every further candidate would wait ``timeout`` and fail the same way:
    the wrapped runner's future raises :class:`BoardError` instead, after cancelling the
    batch's other measurements, stopping the runner's worker and removing the batch's
    built candidates (MetaSchedule removes them only after a batch completes).

    Parameters
    ----------
    inner : tvm.s_tir.meta_schedule.runner.RPCRunner
        With ``f_create_session`` = :func:`tuning_session`.

    Returns
    -------
    tvm.s_tir.meta_schedule.runner.PyRunner
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture

    @derived_object
    class _Future(PyRunnerFuture):
        def __init__(self, future, artifacts: list[str]) -> None:
            super().__init__()
            self.future = future  # MetaSchedule's RunnerFuture (a TVM object)
            self.artifacts = artifacts

        def done(self) -> bool:
            return self.future.done()

        def result(self):
            result = self.future.result()
            message = str(result.error_msg or "")
            if NO_SESSION_MARK not in message:
                return result
            _abandon_batch(inner, self.artifacts)
            reason = message.split(NO_SESSION_MARK, 1)[1].strip().splitlines()[0]
            raise BoardError(f"no board to measure on: {reason}")

    @derived_object
    class _Runner(PyRunner):
        def run(self, runner_inputs: list) -> list:
            artifacts = [str(i.artifact_path) for i in runner_inputs]
            return [_Future(f, artifacts) for f in inner.run(runner_inputs)]

    return _Runner()


def _abandon_batch(inner, artifacts: list[str]) -> None:
    """Drop the runner's queued measurements, stop its worker, remove the built candidates."""
    # PopenPoolExecutor.shutdown() cannot cancel what is queued, and each queued candidate
    # would wait ``timeout`` for a board in a fresh worker: cancel them in its thread pool
    # (a private attribute of TVM 0.27's PopenPoolExecutor, hence the getattr).
    threadpool = getattr(inner.pool, "_threadpool", None)
    if threadpool is not None:
        threadpool.shutdown(wait=False, cancel_futures=True)
    inner.pool.shutdown(wait=False)  # kills the worker, and any board session it holds
    for artifact in artifacts:
        folder = Path(artifact).parent
        # Only the folders tvmq's builder made (tuning_measure.export_candidate), nothing else.
        if folder.name.startswith("tvmq-tune-"):
            shutil.rmtree(folder, ignore_errors=True)


class RemoteModel:
    """A compiled tvmq directory loaded on a board, callable on numpy arrays.

    ``model(x)`` or ``model(input_name=x)`` checks the inputs against ``model.json`` (as
    :class:`~tvmq.runtime.CompiledModel` does), runs the model on the board's device and
    returns one array, or a tuple of arrays in the manifest's output order.

    Parameters
    ----------
    directory : path
        The output of ``tvmq compile`` for the board's target (e.g. ``rasp4b``).
    session : BoardSession
        From :func:`connect`.
    """

    def __init__(self, directory: os.PathLike, session: BoardSession):
        self.directory = Path(directory)
        self.manifest = Manifest.read(self.directory)
        self.session = session
        lib_path = verified_library(self.directory, self.manifest)
        device_kind = "cuda" if self.manifest.target.get("kind") == "cuda" else "cpu"
        # Uploads land in the session's temporary directory on the board; the sha names them
        # so that two models on one session do not overwrite each other.
        remote_name = f"tvmq-{(self.manifest.library.get('sha256') or 'model')[:16]}.so"
        load_hint = (
            f"was {lib_path.name} compiled for target '{self.manifest.target.get('name')}' "
            "right for this board?"
        )
        with self._board_errors(f"loading {lib_path.name}", load_hint):
            self.device = session.device(device_kind, 0)
            session.rpc.upload(str(lib_path), target=remote_name)
            self._lib = session.rpc.load_module(remote_name)
            self._vm = relax.VirtualMachine(self._lib, self.device)
        session._models.add(self)

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.manifest.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.manifest.outputs

    def __call__(self, *args, **kwargs):
        arrays = check_inputs(self.manifest.inputs, args, kwargs)
        self._check_open()
        with self._board_errors("running the model"):
            self._set_inputs(arrays)
            self._vm.invoke_stateful("main")
            outs = _fetch_outputs(self._vm.module, ())
        return outs[0] if len(outs) == 1 else tuple(outs)

    def benchmark(
        self, inputs: list[np.ndarray] | None = None, *, warmup: int = 10, repeat: int = 100
    ) -> LatencyStats:
        """Time ``repeat`` calls on the board after ``warmup`` calls (inputs already there).

        The board's own clock times each run, so the network is not counted.
        """
        arrays = check_inputs(self.manifest.inputs, inputs or random_inputs(self.inputs), {})
        self._check_open()
        with self._board_errors("benchmarking the model"):
            self._set_inputs(arrays)
            for _ in range(max(warmup, 0)):
                self._vm.invoke_stateful("main")
            timer = self._vm.time_evaluator(
                "invoke_stateful", self.device, number=1, repeat=max(repeat, 1)
            )
            return LatencyStats.from_seconds(list(timer("main").results))

    def _check_open(self) -> None:
        if self._vm is None:
            raise BoardError(f"{self} cannot run: its session was closed")

    def _release(self) -> None:
        """Drop every handle to the board (the session is closing)."""
        self._vm = self._lib = self.device = None

    def _set_inputs(self, arrays: list[np.ndarray]) -> None:
        # Over RPC a tuple result is an opaque handle, so the VM's stateful calls
        # (set_input / invoke_stateful / get_outputs) replace vm["main"](...).
        self._vm.set_input("main", *[tvm.runtime.tensor(a, self.device) for a in arrays])

    @contextlib.contextmanager
    def _board_errors(
        self, doing: str, hint: str = "the board may have disconnected or died"
    ) -> Iterator[None]:
        """Turn TVM's RPC failures into a BoardError that names the board and the model."""
        try:
            yield
        except TvmqError:
            raise
        except Exception as err:  # any TVM/RPC failure on the far side
            raise BoardError(
                f"{self.session.describe()} failed while {doing} from {self.directory}: "
                f"{_last_line(err)} ({hint})"
            ) from None

    def __repr__(self) -> str:
        return f"<RemoteModel {self.directory} on {self.session.describe()}>"


class _Tracker:
    """A connection to a TVM RPC tracker whose every read and write ends by a deadline.

    Each fault becomes a :class:`BoardError` that says which one it was: unreachable,
    connection closed, no answer in time, or an answer that is not the tracker protocol.
    """

    def __init__(self, host: str, port: int, deadline: float, timeout: float) -> None:
        self.name = f"RPC tracker {host}:{port}"
        self.deadline = deadline
        self.timeout = timeout
        try:
            self.sock = socket.create_connection((host, port), timeout=self._io_timeout())
        except OSError as err:
            raise BoardError(
                f"cannot reach the {self.name}: {err.strerror or err}; start one with "
                f"`python -m tvm.exec.rpc_tracker --host {_listen_host(host)} --port {port}`"
            ) from None
        try:
            self._handshake()
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> _Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def wait_for_boards(self, key: str) -> int:
        """How many boards are registered under ``key``, waiting until one is (or time is up)."""
        while not (boards := sum(k == key for k in self.registered_keys())):
            if self.remaining() <= 0:
                keys = sorted(set(self.registered_keys())) or "none"
                raise BoardError(
                    f"no board is registered under key {key!r} at the {self.name} "
                    f"(waited {self.timeout:g} s; keys there: {keys})"
                )
            time.sleep(min(_POLL_S, max(self.remaining(), 0.01)))
        return boards

    def registered_keys(self) -> list[str]:
        """The key of every registered board (one entry per board)."""
        reply = self._call([rpc_base.TrackerCode.SUMMARY], "the summary of its boards")
        try:
            if reply[0] != rpc_base.TrackerCode.SUCCESS:
                raise ValueError(reply)
            return [str(s["key"]).removeprefix("server:") for s in reply[1]["server_info"]]
        except (TypeError, KeyError, IndexError, ValueError, AttributeError):
            raise self._garbled("the summary of its boards") from None

    def request(self, key: str, boards: int) -> tuple[str, int, str]:
        """A free board under ``key``: (host, port, match key), waiting while all are busy."""
        doing = f"a board under key {key!r}"
        busy = (
            f"all {boards} board(s) under key {key!r} at the {self.name} stayed busy "
            f"for {self.timeout:g} s"
        )
        reply = self._call([rpc_base.TrackerCode.REQUEST, key, "", 1], doing, on_timeout=busy)
        if not isinstance(reply, list) or not reply or reply[0] != rpc_base.TrackerCode.SUCCESS:
            raise BoardError(f"the {self.name} refused the request for key {key!r}: {reply!r}")
        try:
            board_host, board_port, match_key = reply[1]
            if not (isinstance(board_port, int) and 0 < board_port < 65536):
                raise ValueError(board_port)
            return str(board_host), board_port, str(match_key)
        except (TypeError, ValueError, IndexError):
            raise self._garbled(doing) from None

    def _handshake(self) -> None:
        self._settimeout()
        try:
            self.sock.sendall(struct.pack("<i", rpc_base.RPC_TRACKER_MAGIC))
            answer = _recv_exactly(self.sock, 4)
        except TimeoutError:
            raise BoardError(
                f"the {self.name} accepted the connection but did not answer within "
                f"{self.timeout:g} s (is it a TVM RPC tracker?)"
            ) from None
        except OSError as err:
            raise self._dropped("the handshake", err) from None
        if struct.unpack("<i", answer)[0] != rpc_base.RPC_TRACKER_MAGIC:
            raise BoardError(f"{self.name} is not a TVM RPC tracker (it answered {answer!r})")

    def _call(self, request: list, doing: str, on_timeout: str | None = None) -> object:
        """Send one request and return the decoded reply."""
        self._settimeout()
        try:
            rpc_base.sendjson(self.sock, request)
            size = struct.unpack("<i", _recv_exactly(self.sock, 4))[0]
            if not 0 < size <= _MAX_REPLY_BYTES:
                raise self._garbled(doing)
            return json.loads(_recv_exactly(self.sock, size).decode("utf-8"))
        except TimeoutError:
            raise BoardError(
                on_timeout
                or f"the {self.name} did not answer within {self.timeout:g} s when asked for {doing}"
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._garbled(doing) from None
        except OSError as err:
            raise self._dropped(f"the request for {doing}", err) from None

    def _settimeout(self) -> None:
        self.sock.settimeout(self._io_timeout())

    def _io_timeout(self) -> float:
        # At least a moment, so that a tracker can still say why after the deadline
        # (e.g. the keys it knows when the one asked for is missing).
        return max(self.deadline - time.monotonic(), _MIN_IO_S)

    def _garbled(self, doing: str) -> BoardError:
        return BoardError(
            f"the {self.name} sent a reply that is not the TVM tracker protocol when asked for "
            f"{doing} (is it a TVM RPC tracker?)"
        )

    def _dropped(self, doing: str, err: OSError) -> BoardError:
        return BoardError(
            f"the {self.name} closed the connection during {doing} ({err.strerror or err})"
        )


def _recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    """``nbytes`` from ``sock``; ConnectionError if the peer closes first."""
    chunks, got = [], 0
    while got < nbytes:
        chunk = sock.recv(min(nbytes - got, 65536))
        if not chunk:
            raise ConnectionError(errno.ECONNRESET, "the connection was closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _open_session(
    host: str, port: int, match_key: str, session_timeout: float, tracker: _Tracker
) -> tvm.rpc.RPCSession:
    """TVM's RPC session with the board the tracker chose, waiting at most until the deadline.

    TVM's client has no timeout of its own (a board that accepts and never answers hangs
    it), so it runs in a daemon thread; on time-out that thread is abandoned, blocked until
    the board answers or this process exits.
    """
    result: list = []

    def open_it() -> None:
        try:
            result.append(tvm.rpc.connect(host, port, match_key, session_timeout))
        except Exception as err:  # TVM raises RuntimeError or its own error types
            result.append(err)

    thread = threading.Thread(target=open_it, name="tvmq-rpc-connect", daemon=True)
    thread.start()
    # Emulated boards start a process per session: give them a while past a short deadline.
    thread.join(max(tracker.remaining(), _MIN_SESSION_S))
    where = f"board {host}:{port} (key {match_key.split(':')[0]!r}) from the {tracker.name}"
    if not result:
        raise BoardError(f"{where} accepted the connection but did not start a session")
    if isinstance(result[0], Exception):
        raise BoardError(f"{where} refused the session: {_first_line(result[0])}")
    return result[0]


def _listen_host(host: str) -> str:
    """The address to suggest a tracker listen on: never every interface by default."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "localhost") else host


def _fetch_outputs(vm_module: tvm.runtime.Module, index: tuple[int, ...]) -> list[np.ndarray]:
    """The outputs of the last ``invoke_stateful("main")``, nested tuples flattened.

    Like ``VirtualMachine.get_outputs``, whose self-recursive closure holds the VM (and so the
    board) in a reference cycle until the garbage collector runs.
    """
    arity = vm_module["get_output_arity"]("main", *index)
    if arity == -1:
        return [vm_module["get_output"]("main", *index).numpy()]
    return [y for i in range(arity) for y in _fetch_outputs(vm_module, (*index, i))]


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _last_line(err: BaseException) -> str:
    """TVM puts the reason last, after "Error caught from RPC call:" and any traceback."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1][:400] if lines else type(err).__name__
