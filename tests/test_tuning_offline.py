"""Offline tuning round trip on the host: candidates built, timed by a bundle's run.py, imported."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmq.build import build_with_info
from tvmq.bundle import make_bundle
from tvmq.cli import main
from tvmq.errors import TvmqError
from tvmq.tuning import RECORD_FILE, tune
from tvmq.tuning_offline import CANDIDATES, TIMINGS


def _weight() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)


def _tiny_model() -> tvm.IRModule:
    """relu(x @ W): one kernel to tune."""
    x = relax.Var("x", relax.TensorType((8, 64), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(relax.op.matmul(x, relax.const(_weight()))))
        bb.emit_func_output(out)
    return bb.get()


def _records(work_dir) -> list[str]:
    path = work_dir / RECORD_FILE
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
@pytest.mark.tuning
def test_offline_round_trip(tmp_path, compiled_mlp_dir, capsys):
    work_dir, cands = tmp_path / "logs", tmp_path / "cands"
    # Two candidates: tvmq's default schedule, then one from the search (which is what takes
    # the time: MetaSchedule's evolutionary search samples hundreds of schedules).
    report = tune(
        _tiny_model(), "host", work_dir=work_dir, trials=2, offline=cands,
        cost_model="random", seed=0, progress=False,
    )  # fmt: skip
    assert report.offline == cands.resolve() and report.new_trials == 2
    assert "candidates written to" in report.summary()
    info = json.loads((cands / CANDIDATES).read_text())
    assert len(info["candidates"]) == 2 and all(
        (cands / c["file"]).is_file() for c in info["candidates"]
    )
    assert _records(work_dir) == []  # nothing measured, nothing recorded
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    bundle = make_bundle(compiled_mlp_dir, tmp_path / "bundle")
    proc = subprocess.run(
        [sys.executable, str(bundle.path / "run.py"), "measure", str(cands)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "timed 2 candidates (0 failed)" in proc.stdout
    timings = json.loads((cands / TIMINGS).read_text())["timings"]
    assert all(isinstance(t, list) and t and min(t) > 0 for t in timings.values())

    assert main(["tune", "--import", str(cands), "--work-dir", str(work_dir)]) == 0
    assert "imported 2 records" in capsys.readouterr().out
    assert len(_records(work_dir)) == 2
    assert main(["tune", "--import", str(cands), "--work-dir", str(work_dir)]) == 2
    assert "already imported" in capsys.readouterr().err
    assert len(_records(work_dir)) == 2

    ex, info = build_with_info(_tiny_model(), "host", tuning_logs=work_dir)
    assert len(info.tuned) == 1 and info.default == ()
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(out, np.maximum(x @ _weight(), 0), rtol=1e-5, atol=1e-5)


def test_offline_folder_must_be_new(tmp_path):
    (tmp_path / "cands").mkdir()
    (tmp_path / "cands" / "mine.txt").write_text("keep")
    with pytest.raises(TvmqError, match="not an empty folder"):
        tune(
            _tiny_model(), "host", work_dir=tmp_path / "logs", trials=1, offline=tmp_path / "cands"
        )
    assert [p.name for p in (tmp_path / "cands").iterdir()] == ["mine.txt"]


def test_import_needs_timings(tmp_path, capsys):
    (tmp_path / "cands").mkdir()
    assert main(["tune", "--import", str(tmp_path / "cands")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tvmq: error: ") and "candidates.json" in err
