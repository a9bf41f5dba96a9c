"""Getting a board from a TVM RPC tracker: :func:`connect`, :class:`BoardSession`, errors.

tvmq speaks the tracker's small JSON protocol over its own socket (see :func:`connect` for
why), so that every read and write ends by a deadline and each fault gets its own message.
Running a model on the board is :mod:`tvmq.rpc`, which re-exports these names.
"""

from __future__ import annotations

import errno
import json
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
        raise BoardError(f"{where} refused the session: {first_line(result[0])}")
    return result[0]


def _listen_host(host: str) -> str:
    """The address to suggest a tracker listen on: never every interface by default."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "localhost") else host
