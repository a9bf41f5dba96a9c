"""Getting a board from a TVM RPC tracker: :func:`connect`, :class:`BoardSession`, errors.

The tracker is spoken to through TVM's own client (``tvm.rpc.connect_tracker``), with every
call bounded by a deadline (see :func:`connect`) and each fault given its own message.
Running a model on the board is :mod:`tvmq.rpc`, which re-exports these names.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import weakref

import tvm
import tvm.rpc
import tvm_ffi
from tvm.rpc import base as rpc_base

from tvmq.errors import TvmqError, first_line

__all__ = ["BoardError", "BoardSession", "connect"]

DEFAULT_PORT = 9190
DEFAULT_TIMEOUT_S = 60.0
_POLL_S = 0.5
_MIN_IO_S = 1.0  # the least time a tracker gets to answer one request
_MIN_SESSION_S = 10.0  # the least time a board gets to start a session


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
        self._models: weakref.WeakSet = weakref.WeakSet()  # of tvmq.rpc.RemoteModel

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

    The tracker is reached with TVM's client (``tvm.rpc.connect_tracker``, its
    ``summary()``, and the tracker request of its ``request()``), kept within ``timeout``:
    TVM's client sets no socket timeout and shakes hands in its constructor (a tracker that
    accepts the connection and never answers would hang it forever), retries a refused
    connection for 60 s, and its ``request()`` also opens the board session itself, five
    times over, with neither a timeout nor the board's address. So the port is reached first,
    the handshake runs in a thread given ``timeout``, each later call runs under a socket
    timeout, and the board session is opened here (:func:`_open_session`).

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


class _Tracker:
    """TVM's tracker client (``tvm.rpc.connect_tracker``) whose every call ends by a deadline.

    Each fault becomes a :class:`BoardError` that says which one it was: unreachable,
    connection closed, no answer in time, or an answer that is not the tracker protocol.
    """

    def __init__(self, host: str, port: int, deadline: float, timeout: float) -> None:
        self.name = f"RPC tracker {host}:{port}"
        self.deadline = deadline
        self.timeout = timeout
        try:  # TVM's client would retry a refused connection for 60 s
            socket.create_connection((host, port), timeout=self._io_timeout()).close()
        except OSError as err:
            raise BoardError(
                f"cannot reach the {self.name}: {err.strerror or err}; start one with "
                f"`python -m tvm.exec.rpc_tracker --host {_listen_host(host)} --port {port}`"
            ) from None
        self.session = self._handshake(host, port)

    def __enter__(self) -> _Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.session.close()

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
        summary = self._call(self.session.summary, "the summary of its boards")
        try:
            return [str(s["key"]).removeprefix("server:") for s in summary["server_info"]]
        except (TypeError, KeyError, IndexError, ValueError, AttributeError):
            raise self._garbled("the summary of its boards") from None

    def request(self, key: str, boards: int) -> tuple[str, int, str]:
        """A free board under ``key``: (host, port, match key), waiting while all are busy."""
        doing = f"a board under key {key!r}"
        busy = (
            f"all {boards} board(s) under key {key!r} at the {self.name} stayed busy "
            f"for {self.timeout:g} s"
        )

        def ask() -> object:  # the tracker half of TrackerSession.request
            rpc_base.sendjson(self.session._sock, [rpc_base.TrackerCode.REQUEST, key, "", 1])
            return rpc_base.recvjson(self.session._sock)

        reply = self._call(ask, doing, on_timeout=busy)
        if not isinstance(reply, list) or not reply or reply[0] != rpc_base.TrackerCode.SUCCESS:
            raise BoardError(f"the {self.name} refused the request for key {key!r}: {reply!r}")
        try:
            board_host, board_port, match_key = reply[1]
            if not (isinstance(board_port, int) and 0 < board_port < 65536):
                raise ValueError(board_port)
            return str(board_host), board_port, str(match_key)
        except (TypeError, ValueError, IndexError):
            raise self._garbled(doing) from None

    def _handshake(self, host: str, port: int) -> tvm.rpc.client.TrackerSession:
        """``tvm.rpc.connect_tracker`` in a thread given until the deadline.

        TVM's constructor reads the tracker's answer with no timeout: a tracker that never
        answers leaves that thread blocked (a daemon) until it closes the connection.
        """
        result: list = []

        def connect_it() -> None:
            try:
                result.append(tvm.rpc.connect_tracker(host, port))
            except Exception as err:  # OSError, or RuntimeError for a wrong magic number
                result.append(err)

        thread = threading.Thread(target=connect_it, name="tvmq-tracker-connect", daemon=True)
        thread.start()
        thread.join(self._io_timeout())
        if not result:
            raise BoardError(
                f"the {self.name} accepted the connection but did not answer within "
                f"{self.timeout:g} s (is it a TVM RPC tracker?)"
            )
        if isinstance(result[0], OSError):
            raise self._dropped("the handshake", result[0])
        if isinstance(result[0], Exception):
            raise BoardError(  # TVM's RuntimeError does not say what came instead
                f"{self.name} is not a TVM RPC tracker (it did not answer with the tracker's "
                "magic number)"
            )
        return result[0]

    def _call(self, fn, doing: str, on_timeout: str | None = None) -> object:
        """``fn()``, one exchange with the tracker, within the deadline; its decoded reply."""
        self.session._sock.settimeout(self._io_timeout())
        try:
            return fn()
        except TimeoutError:
            raise BoardError(
                on_timeout
                or f"the {self.name} did not answer within {self.timeout:g} s when asked for {doing}"
            ) from None
        except (UnicodeDecodeError, ValueError, struct.error, RuntimeError):
            # json's errors are ValueErrors; TrackerSession.summary raises RuntimeError for
            # a reply that is not SUCCESS
            raise self._garbled(doing) from None
        except OSError as err:
            raise self._dropped(f"the request for {doing}", err) from None

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
        raise BoardError(f"{where} refused the session: {first_line(result[0])}")
    return result[0]


def _listen_host(host: str) -> str:
    """The address to suggest a tracker listen on: never every interface by default."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "localhost") else host
