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
``python -m tvm.exec.rpc_server --tracker HOST:9190 --key rasp4b``); the library was linked
on this machine by the target's cross compiler.

Every failure is a :class:`BoardError` (a :class:`~tvmq.errors.TvmqError`): the tracker does not
answer, no board is registered under the key, all of them stay busy past ``timeout``, the
library does not load on the board, or the board disconnects in the middle of a call.

Limits: a board that hangs without closing its connection (stopped, not dead) makes a call
wait forever unless the session was opened with ``session_timeout``; TVM's RPC client has no
per-call timeout.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tvm
import tvm.rpc
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

    Parameters
    ----------
    host, port : str, int
        The TVM RPC tracker.
    key : str
        The boards' key (a target preset's ``rpc_key``, e.g. ``"rasp4b"``).
    timeout : float
        Seconds to wait for a board under ``key`` to be registered and free.
    session_timeout : float
        If non-zero, the board ends the session after this many seconds (TVM's own limit,
        enforced on the board); a call still running then fails with :class:`BoardError`.

    Returns
    -------
    BoardSession

    Raises
    ------
    BoardError
        The tracker is unreachable; no board is registered under ``key`` within ``timeout``
        (the message lists the keys the tracker knows); all are busy for ``timeout``; or the
        board the tracker chose refuses the connection.
    """
    tracker = f"RPC tracker {host}:{port}"
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=max(0.1, min(timeout, 10.0)))
    except OSError as err:
        raise BoardError(
            f"cannot reach the {tracker}: {err.strerror or err}; start one with "
            f"`python -m tvm.exec.rpc_tracker --host {host} --port {port}`"
        ) from None
    with sock:
        try:
            _tracker_handshake(sock, tracker)
            while not (boards := _registered_boards(sock, key)):
                if time.monotonic() >= deadline:
                    keys = sorted(_registered_keys(sock)) or "none"
                    raise BoardError(
                        f"no board is registered under key {key!r} at the {tracker} "
                        f"(waited {timeout:g} s; keys there: {keys})"
                    )
                time.sleep(_POLL_S)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            rpc_base.sendjson(sock, [rpc_base.TrackerCode.REQUEST, key, "", 1])
            reply = rpc_base.recvjson(sock)
        except TimeoutError:
            raise BoardError(
                f"all {boards} board(s) under key {key!r} at the {tracker} stayed busy "
                f"for {timeout:g} s"
            ) from None
        except OSError as err:
            raise BoardError(f"the {tracker} dropped the connection: {err}") from None
    if not (isinstance(reply, list) and reply[0] == rpc_base.TrackerCode.SUCCESS):
        raise BoardError(f"the {tracker} refused the request for key {key!r}: {reply!r}")
    board_host, board_port, match_key = reply[1]
    try:
        rpc = tvm.rpc.connect(board_host, board_port, match_key, session_timeout)
    except Exception as err:  # TVM raises RuntimeError or its own error types
        raise BoardError(
            f"board {board_host}:{board_port} (key {key!r}) from the {tracker} refused the "
            f"session: {_first_line(err)}"
        ) from None
    return BoardSession(rpc, key, (board_host, int(board_port)), (host, port))


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


def _tracker_handshake(sock: socket.socket, tracker: str) -> None:
    sock.sendall(struct.pack("<i", rpc_base.RPC_TRACKER_MAGIC))
    magic = struct.unpack("<i", rpc_base.recvall(sock, 4))[0]
    if magic != rpc_base.RPC_TRACKER_MAGIC:
        raise BoardError(f"{tracker} is not a TVM RPC tracker")


def _summary(sock: socket.socket) -> dict:
    rpc_base.sendjson(sock, [rpc_base.TrackerCode.SUMMARY])
    reply = rpc_base.recvjson(sock)
    return reply[1]


def _registered_keys(sock: socket.socket) -> set[str]:
    return {s["key"].removeprefix("server:") for s in _summary(sock)["server_info"]}


def _registered_boards(sock: socket.socket, key: str) -> int:
    """How many boards (busy or free) are registered under ``key``."""
    return sum(s["key"] == f"server:{key}" for s in _summary(sock)["server_info"])


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
