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
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from tvmq.errors import TvmqError
from tvmq.frontends.model import TensorSpec
from tvmq.manifest import Manifest
from tvmq.rpc_session import DEFAULT_PORT, DEFAULT_TIMEOUT_S, BoardError, BoardSession, connect
from tvmq.runtime import (
    DECODE_AT_LOAD,
    LatencyStats,
    check_inputs,
    random_inputs,
    verified_library,
)

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT_S",
    "BoardError",
    "BoardSession",
    "RemoteModel",
    "connect",
]


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
            self._params = _decoded_params(self._vm)
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
        self._params = []

    def _set_inputs(self, arrays: list[np.ndarray]) -> None:
        # Over RPC a tuple result is an opaque handle, so the VM's stateful calls
        # (set_input / invoke_stateful / get_outputs) replace vm["main"](...).
        inputs = [tvm.runtime.tensor(a, self.device) for a in arrays]
        self._vm.set_input("main", *inputs, *self._params)

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


def _decoded_params(vm: relax.VirtualMachine) -> list:
    """On the board, the weights a library decodes at load (see ``tvmq.runtime.decoded_params``),
    fetched through the VM's stateful calls (a tuple result is an opaque RPC handle)."""
    if not vm.module.implements_function(DECODE_AT_LOAD):
        return []
    vm.set_input(DECODE_AT_LOAD)
    vm.invoke_stateful(DECODE_AT_LOAD)
    arity = vm.module["get_output_arity"](DECODE_AT_LOAD)
    return [vm.module["get_output"](DECODE_AT_LOAD, i) for i in range(arity)]


def _fetch_outputs(vm_module: tvm.runtime.Module, index: tuple[int, ...]) -> list[np.ndarray]:
    """The outputs of the last ``invoke_stateful("main")``, nested tuples flattened.

    Like ``VirtualMachine.get_outputs``, whose self-recursive closure holds the VM (and so the
    board) in a reference cycle until the garbage collector runs.
    """
    arity = vm_module["get_output_arity"]("main", *index)
    if arity == -1:
        return [vm_module["get_output"]("main", *index).numpy()]
    return [y for i in range(arity) for y in _fetch_outputs(vm_module, (*index, i))]


def _last_line(err: BaseException) -> str:
    """TVM puts the reason last, after "Error caught from RPC call:" and any traceback."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1][:400] if lines else type(err).__name__
