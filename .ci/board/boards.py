"""Start, check and stop emulated aarch64 boards for tvmq's RPC tests.

A "board" is TVM's RPC server running in the arm64 Python that ``setup-sysroot.sh`` builds
(qemu-user), registered with a TVM RPC tracker under a key. Everything listens on 127.0.0.1.

    python .ci/board/boards.py start N KEY [--port 9190] [--state FILE]
    python .ci/board/boards.py status      [--state FILE]   # exit 1 if a board or the tracker died
    python .ci/board/boards.py stop        [--state FILE]

``start`` runs the tracker (this Python, which must have TVM) and N boards, waits until all N are
registered and free, and writes their process ids to the state file (default
``$TVMQ_BOARD_DIR/run/boards.json``). Each process leads its own process group, so ``stop``
ends it together with what it forked (TVM's popen worker, per-session children) and checks that
nothing of those groups is left. ``--port 0`` picks a free tracker port; ``start`` prints
``TVMQ_RPC_TRACKER=127.0.0.1:PORT`` and ``TVMQ_RPC_KEY=KEY`` for the caller to use.

Importable too (the tests do): :func:`start`, :func:`status`, :func:`stop`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 180.0
STOP_GRACE_S = 5.0


class BoardError(RuntimeError):
    """A board could not be started, or the state file does not describe running boards."""


def board_dir() -> Path:
    """Where setup-sysroot.sh put the sysroot: ``$TVMQ_BOARD_DIR`` or ``~/.cache/tvmq-board``."""
    return Path(os.environ.get("TVMQ_BOARD_DIR") or Path.home() / ".cache" / "tvmq-board")


def board_python() -> Path:
    """The launcher of the emulated arm64 Python."""
    return board_dir() / "bin" / "board-python"


def is_set_up() -> bool:
    """Whether setup-sysroot.sh has finished in :func:`board_dir`."""
    return (board_dir() / "setup.stamp").is_file() and os.access(board_python(), os.X_OK)


def default_state_file() -> Path:
    return board_dir() / "run" / "boards.json"


def start(
    n: int,
    key: str,
    *,
    port: int = 9190,
    state_file: Path | None = None,
    timeout: float = STARTUP_TIMEOUT_S,
) -> dict:
    """Start a tracker and ``n`` boards under ``key``; return the state written to the file."""
    state_file = Path(state_file or default_state_file())
    if not is_set_up():
        raise BoardError(f"no board sysroot in {board_dir()}: run .ci/board/setup-sysroot.sh")
    if state_file.exists():
        alive = [p for p in _processes(_read(state_file)) if _group_alive(p["pid"])]
        if alive:
            raise BoardError(
                f"boards from {state_file} are still running (pids "
                f"{[p['pid'] for p in alive]}): stop them first"
            )
        state_file.unlink()
    state_file.parent.mkdir(parents=True, exist_ok=True)
    logs = state_file.parent / "logs"
    logs.mkdir(exist_ok=True)

    tracker_port = port or _free_port()
    state = {"key": key, "tracker": None, "boards": [], "board_dir": str(board_dir())}
    t0 = time.monotonic()
    try:
        state["tracker"] = _spawn(
            [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", HOST]
            + ["--port", str(tracker_port), "--port-end", str(tracker_port + 1)],
            logs / "tracker.log",
            port=tracker_port,
        )
        _write(state_file, state)  # so that stop() finds what is already running
        _wait_for_tracker(state, deadline=t0 + timeout)
        for i in range(n):
            board_port = _free_port()
            state["boards"].append(
                _spawn(
                    [str(board_python()), "-m", "tvm.exec.rpc_server", "--host", HOST]
                    + ["--port", str(board_port), "--port-end", str(board_port + 1)]
                    + ["--tracker", f"{HOST}:{tracker_port}", "--key", key],
                    logs / f"board-{i}.log",
                    port=board_port,
                )
            )
            _write(state_file, state)
        _wait_for_boards(state, deadline=t0 + timeout)
    except BaseException:
        stop(state_file)
        raise
    state["startup_s"] = round(time.monotonic() - t0, 1)
    _write(state_file, state)
    return state


def status(state_file: Path | None = None) -> list[str]:
    """Problems with the running boards (dead processes, boards missing at the tracker)."""
    state_file = Path(state_file or default_state_file())
    if not state_file.exists():
        return [f"{state_file}: no boards started"]
    state = _read(state_file)
    problems = []
    for proc in _processes(state):
        if not _group_alive(proc["pid"]):
            problems.append(
                f"{proc['name']} (pid {proc['pid']}, port {proc['port']}) died; "
                f"log {proc['log']}:\n{_tail(proc['log'])}"
            )
    if _group_alive(state["tracker"]["pid"]):
        try:
            registered = _registered(state)
        except OSError as err:
            problems.append(f"tracker on port {state['tracker']['port']} does not answer: {err}")
        else:
            for board in state["boards"]:
                if board["port"] not in registered:
                    problems.append(f"{board['name']} (port {board['port']}) is not registered")
    return problems


def stop(state_file: Path | None = None) -> None:
    """Stop every process group in the state file (boards first) and remove the file."""
    state_file = Path(state_file or default_state_file())
    if not state_file.exists():
        return
    procs = _processes(_read(state_file))
    for proc in procs:
        _signal_group(proc["pid"], signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(_group_alive(p["pid"]) for p in procs):
        time.sleep(0.1)
    for proc in procs:
        _signal_group(proc["pid"], signal.SIGKILL)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(_group_alive(p["pid"]) for p in procs):
        time.sleep(0.1)
    left = [p["pid"] for p in procs if _group_alive(p["pid"])]
    if left:
        raise BoardError(f"process groups {left} survived SIGKILL")
    state_file.unlink(missing_ok=True)


def _spawn(cmd: list[str], log: Path, *, port: int) -> dict:
    """Start ``cmd`` as the leader of a new process group, output to ``log``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=log.parent,
        )  # fmt: skip
    name = "tracker" if log.stem == "tracker" else log.stem
    return {"name": name, "pid": proc.pid, "port": port, "log": str(log)}


def _wait_for_tracker(state: dict, deadline: float) -> None:
    while True:
        _check_alive(state)
        try:
            _registered(state)
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BoardError(
                f"the tracker did not answer in time; log:\n{_tail(state['tracker']['log'])}"
            )
        time.sleep(0.2)


def _wait_for_boards(state: dict, deadline: float) -> None:
    want = {b["port"] for b in state["boards"]}
    while True:
        _check_alive(state)
        registered = _registered(state)
        if want <= registered and _free_count(state) >= len(want):
            return
        if time.monotonic() > deadline:
            missing = sorted(want - registered)
            raise BoardError(
                f"boards on ports {missing} did not register with the tracker in time; logs in "
                f"{Path(state['tracker']['log']).parent}"
            )
        time.sleep(0.5)


def _check_alive(state: dict) -> None:
    for proc in _processes(state):
        if not _group_alive(proc["pid"]):
            raise BoardError(f"{proc['name']} exited during start-up; log:\n{_tail(proc['log'])}")


def _summary(state: dict) -> dict:
    """The tracker's summary, from TVM's own tracker client."""
    import tvm.rpc

    address = (HOST, state["tracker"]["port"])
    # TVM's client retries a refused connection for 60 s; while the tracker is starting, the
    # caller polls, so a refused connection must fail at once (OSError).
    socket.create_connection(address, timeout=5).close()
    tracker = tvm.rpc.connect_tracker(*address)
    try:
        return tracker.summary()
    finally:
        tracker.close()


def _registered(state: dict) -> set[int]:
    """Ports of the boards registered under the state's key."""
    servers = _summary(state)["server_info"]
    return {s["addr"][1] for s in servers if s["key"] == f"server:{state['key']}"}


def _free_count(state: dict) -> int:
    return _summary(state)["queue_info"].get(state["key"], {}).get("free", 0)


def _processes(state: dict) -> list[dict]:
    """Boards first, then the tracker."""
    return list(state.get("boards", [])) + ([state["tracker"]] if state.get("tracker") else [])


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _group_alive(pgid: int) -> bool:
    return bool(_group_members(pgid))


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _read(state_file: Path) -> dict:
    try:
        return json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BoardError(f"{state_file}: unreadable board state ({err})") from err


def _write(state_file: Path, state: dict) -> None:
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, state_file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--state", type=Path, help="state file (default $TVMQ_BOARD_DIR/run/boards.json)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start a tracker and N boards under KEY")
    s.add_argument("n", type=int)
    s.add_argument("key")
    s.add_argument("--port", type=int, default=9190, help="tracker port (0: any free port)")
    s.add_argument("--timeout", type=float, default=STARTUP_TIMEOUT_S)
    sub.add_parser("status", help="exit 1 if a board or the tracker died")
    sub.add_parser("stop", help="stop everything start started")
    args = p.parse_args(argv)
    try:
        if args.command == "start":
            state = start(
                args.n, args.key, port=args.port, state_file=args.state, timeout=args.timeout
            )
            print(f"TVMQ_RPC_TRACKER={HOST}:{state['tracker']['port']}")
            print(f"TVMQ_RPC_KEY={state['key']}")
            print(f"# {args.n} board(s) up in {state['startup_s']} s", file=sys.stderr)
        elif args.command == "status":
            problems = status(args.state)
            for problem in problems:
                print(problem, file=sys.stderr)
            if problems:
                return 1
            print("all boards up", file=sys.stderr)
        else:
            stop(args.state)
    except BoardError as err:
        print(f"boards: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
