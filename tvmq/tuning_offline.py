"""Offline tuning: candidates built here, timed on a device this machine cannot reach.

One round, repeated as often as wanted (each round's search starts from the best records so far)::

    tvmq tune model.onnx -t PRESET --trials N --offline cands/   # build candidates into cands/
    python bundle/run.py measure cands/                          # on the device: cands/timings.json
    tvmq tune --import cands/ -t PRESET                          # timings -> records in tuning_logs/

The folder holds one ``.so`` per candidate and ``candidates.json``: for each, its kernel's
workload and its MetaSchedule record without timings (trace, target, argument shapes).
:func:`measure_candidates` times them with TVM's runtime only (it is shipped in every bundle:
nothing here imports more than the standard library at module level); :func:`import_timings`
commits the timed ones to a record folder, once.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from tvmq.errors import TvmqError

FORMAT = "tvmq-offline-tuning/1"
CANDIDATES = "candidates.json"
TIMINGS = "timings.json"
IMPORTED = "imported.json"
FAILED = "error"


# --------------------------------------------------------------------------------------
# Here: the candidates of one round


@dataclass
class OfflineRound:
    """The staging folder of one round's candidates; :meth:`commit` puts it at ``folder``."""

    folder: Path
    target: str
    kind: str = "llvm"
    stage: Path | None = None
    candidates: list = field(default_factory=list)
    workloads: dict = field(default_factory=dict)  # workload JSON (str) -> index

    def __post_init__(self) -> None:
        from tvmq.output import _make_unique_dir, recover

        recover(Path(self.folder).resolve())  # staging folders of killed rounds
        self.folder = check_new_folder(self.folder)
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self.stage = _make_unique_dir(
                self.folder.parent, f".{self.folder.name}.tmp-{os.getpid()}-"
            )
        except OSError as e:
            raise TvmqError(f"{self.folder}: cannot write here ({e.strerror})") from None

    def runner(self):
        """A MetaSchedule runner that measures nothing: every candidate is timed later."""
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult

        @derived_object
        class Later(PyRunnerFuture):
            def done(self) -> bool:
                return True

            def result(self) -> RunnerResult:
                return RunnerResult(None, "measured offline")

        @derived_object
        class OfflineRunner(PyRunner):
            def run(self, runner_inputs):
                return [Later() for _ in runner_inputs]

        return OfflineRunner()

    def callbacks(self, context, tracker) -> list:
        """Measure callbacks that keep each built candidate (no database, no cost model update)."""
        from tvm.ir.utils import derived_object
        from tvm.s_tir import meta_schedule as ms

        round_ = self

        @derived_object
        class KeepCandidates(ms.measure_callback.PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, results):
                errors = []
                for candidate, built in zip(measure_candidates, builder_results, strict=True):
                    if built.error_msg is None:
                        round_.keep(context, candidate, built.artifact_path)
                    else:
                        errors.append(built.error_msg.strip().splitlines()[-1][:300])
                report = tracker.reports[tracker.current]
                report.new_trials += len(measure_candidates)
                report.failed_trials += len(errors)
                tracker.note_failures(errors)
                tracker.bar.update(len(measure_candidates))

        return [KeepCandidates(), ms.measure_callback.RemoveBuildArtifact()]

    def keep(self, context, candidate, artifact: str) -> None:
        from tvm.s_tir import meta_schedule as ms

        workload = json.dumps(ms.database.Workload(context.mod).as_json())
        index = self.workloads.setdefault(workload, len(self.workloads))
        record = ms.database.TuningRecord(
            candidate.sch.trace, ms.database.Workload(context.mod), None, context.target,
            candidate.args_info,
        )  # fmt: skip
        name = f"c{len(self.candidates):05d}.so"
        shutil.copyfile(artifact, self.stage / name)
        self.candidates.append(
            {
                "file": name,
                "kernel": context.task_name,
                "workload": index,
                "args": [a.as_json() for a in candidate.args_info],
                "record": record.as_json(),
            }
        )

    def commit(self) -> int:
        """Write ``candidates.json`` and move the folder into place; the number of candidates."""
        info = {
            "format": FORMAT,
            "target": self.target,
            "kind": self.kind,
            "workloads": [json.loads(w) for w in self.workloads],
            "candidates": self.candidates,
        }
        (self.stage / CANDIDATES).write_text(json.dumps(info) + "\n")
        try:
            os.replace(self.stage, self.folder)  # replaces an empty folder
        except OSError as e:
            raise TvmqError(
                f"{self.folder}: writing the candidates failed ({e.strerror})"
            ) from None
        return len(self.candidates)

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


def check_new_folder(folder: Path) -> Path:
    """``folder`` resolved: missing or empty (a round never writes over anything)."""
    folder = Path(folder).resolve()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise TvmqError(f"{folder}: exists and is not an empty folder; give a new one")
    return folder


def _read(folder: Path) -> dict:
    try:
        info = json.loads((folder / CANDIDATES).read_text())
    except (OSError, ValueError) as e:
        raise TvmqError(
            f"{folder}: no readable {CANDIDATES} ({e}); is it a tvmq tune --offline folder?"
        ) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise TvmqError(f"{folder / CANDIDATES}: not a tvmq offline-tuning file")
    return info


# --------------------------------------------------------------------------------------
# On the device (TVM's runtime only)


def measure_candidates(folder: os.PathLike, *, number: int = 3, min_repeat_ms: int = 40) -> dict:
    """Time every candidate in ``folder`` on this machine; write and return ``timings.json``.

    Each candidate runs on random arguments of its shapes, as MetaSchedule's local runner
    times them (``number`` runs per measurement, at least ``min_repeat_ms``). A candidate
    that fails to load or run is recorded with its error, not timed.
    """
    import numpy as np
    import tvm

    folder = Path(folder)
    info = _read(folder)
    dev = tvm.cuda(0) if info.get("kind") == "cuda" else tvm.cpu(0)
    rng = np.random.default_rng(0)
    timings = {}
    for c in info["candidates"]:
        try:
            lib = tvm.runtime.load_module(str(folder / c["file"]))
            args = [_random_tensor(a, rng, dev) for a in c["args"]]
            f = lib.time_evaluator(
                lib.entry_name, dev, number=number, repeat=1, min_repeat_ms=min_repeat_ms
            )
            timings[c["file"]] = [float(s) for s in f(*args).results]
        except Exception as e:  # one broken candidate must not end the round
            last = (str(e).strip().splitlines() or [""])[-1]
            timings[c["file"]] = {FAILED: f"{type(e).__name__}: {last}"[:300]}
    out = {"format": FORMAT, "device": str(dev), "timings": timings}
    tmp = folder / f".{TIMINGS}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, folder / TIMINGS)
    return out


def random_argument(dtype: str, shape, rng):
    """Measurement data for one kernel argument: floats in [-1, 1], small integers (valid as
    indices and in range for every integer type), booleans."""
    import numpy as np

    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.uniform(-1.0, 1.0, shape).astype(dt)
    if dt.kind == "b":
        return rng.integers(0, 2, shape).astype(dt)
    return rng.integers(0, 8, shape).astype(dt)


def _random_tensor(arg_info, rng, dev):
    """A device tensor for one ``["TENSOR", dtype, shape]`` argument."""
    import tvm

    kind, dtype, shape = arg_info
    if kind != "TENSOR":
        raise TvmqError(f"argument kind {kind!r} cannot be measured offline")
    return tvm.runtime.tensor(random_argument(dtype, shape, rng), dev)


# --------------------------------------------------------------------------------------
# Here again: timings -> records


@dataclass(frozen=True)
class ImportReport:
    folder: Path
    work_dir: Path
    records: int
    failed: int
    best_ms: dict  # kernel -> fastest candidate's mean milliseconds

    def summary(self) -> str:
        best = ", ".join(f"{k} {v:.4g} ms" for k, v in sorted(self.best_ms.items()))
        bad = f" ({self.failed} failed on the device)" if self.failed else ""
        return f"imported {self.records} records{bad} into {self.work_dir}; best: {best or '-'}"


def import_timings(folder: os.PathLike, work_dir: os.PathLike | None = None) -> ImportReport:
    """Commit each timed candidate of ``folder`` as a record in ``work_dir`` (once per folder).

    ``work_dir`` defaults to ``./tuning_logs/<the round's preset>/``, where compile looks.
    """
    from tvm.s_tir import meta_schedule as ms

    from tvmq.tuning_database import default_work_dir, open_database
    from tvmq.tuning_lock import writer_lock
    from tvmq.tuning_records import check_for_tuning

    folder = Path(folder).resolve()
    info = _read(folder)
    work_dir = Path(work_dir or default_work_dir(info["target"])).resolve()
    if (folder / IMPORTED).exists():
        done = json.loads((folder / IMPORTED).read_text()).get("work_dir")
        raise TvmqError(
            f"{folder}: already imported into {done}; a second import would double its records"
        )
    try:
        timings = json.loads((folder / TIMINGS).read_text())["timings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TvmqError(
            f"{folder}: no readable {TIMINGS} ({e}); measure first: python BUNDLE/run.py measure {folder}"
        ) from None
    work_dir.mkdir(parents=True, exist_ok=True)
    check_for_tuning(work_dir)
    records = failed = 0
    best: dict[str, float] = {}
    with writer_lock(work_dir):
        database = open_database(work_dir)
        workloads = [ms.database.Workload.from_json(w) for w in info["workloads"]]
        for c in info["candidates"]:
            secs = timings.get(c["file"])
            if not isinstance(secs, list) or not secs:
                failed += secs is not None
                continue
            workload = database.commit_workload(workloads[c["workload"]].mod)
            rec = ms.database.TuningRecord.from_json(c["record"], workload)
            database.commit_tuning_record(
                ms.database.TuningRecord(rec.trace, workload, secs, rec.target, rec.args_info)
            )
            records += 1
            ms_ = statistics.fmean(secs) * 1e3
            best[c["kernel"]] = min(best.get(c["kernel"], ms_), ms_)
        (folder / IMPORTED).write_text(json.dumps({"work_dir": str(work_dir)}) + "\n")
    return ImportReport(folder, work_dir, records, failed, best)
