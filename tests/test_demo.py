import json

import pytest

from tvmq.demo import load_mnist, run_demo


def test_mnist_split_is_real_and_stratified():
    data = load_mnist()
    assert data.x_train.shape == (4000, 784) and data.x_test.shape == (1000, 784)
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    assert sorted(set(data.y_test.tolist())) == list(range(10))
    assert (data.y_test == 3).sum() == 100


@pytest.mark.slow
def test_quick_demo_prints_measured_table(capsys, tmp_path):
    rows = run_demo(output_dir=tmp_path, quick=True, progress=False)
    out = capsys.readouterr().out
    by_name = {r.name: r for r in rows}
    assert [r.name for r in rows][:3] == [
        "float32, PyTorch (reference)",
        "float32, tvmq",
        "int8 static, tvmq",
    ]
    ref, compiled, int8 = rows[0], rows[1], rows[2]
    assert ref.accuracy > 0.85
    # The compiled float model is the same function: same predictions up to float ties.
    assert abs(compiled.accuracy - ref.accuracy) <= 0.002
    assert compiled.library_bytes > 0 and compiled.median_ms > 0
    assert compiled.weights_bytes == ref.weights_bytes  # same fp32 weights, all as constants
    # int8: weights a quarter of float, accuracy close (the bar is 0.3 points on the
    # full demo; the quick run trains less, so allow 1 point here).
    assert int8.weights_bytes < 0.27 * ref.weights_bytes
    assert int8.library_bytes < 0.4 * compiled.library_bytes
    assert abs(int8.accuracy - ref.accuracy) <= 0.01
    # Removing half the hidden neurons really shrinks the model.
    shrunk = by_name["50% neurons removed + int8, tvmq"]
    assert shrunk.weights_bytes < 0.6 * int8.weights_bytes
    # Shared weights: stored as codebooks + 4-bit codes, decoded once at load, so the float
    # and int8 kernels run as for the unclustered models (a loose bound on a shared machine;
    # decoding on every call made the clustered row 4-8x slower than float).
    clustered = by_name["clustered 16 values, tvmq"]
    assert clustered.weights_bytes < 0.15 * compiled.weights_bytes
    assert clustered.median_ms < 1.5 * compiled.median_ms
    clustered_int8 = by_name["clustered 16 values + int8, tvmq"]
    assert clustered_int8.weights_bytes < 0.55 * int8.weights_bytes
    assert clustered_int8.library_bytes < int8.library_bytes
    assert clustered_int8.median_ms < 1.5 * int8.median_ms
    assert "test acc" in out and "int8 static, tvmq" in out
    assert (tmp_path / "float32-tvmq" / "model.so").is_file()
    # the int8 row's report: its accuracy is the table's, measured the same way
    report = tmp_path / "int8-static-tvmq" / "report.html"
    assert report.is_file() and str(report) in out
    acc = json.loads(report.with_suffix(".json").read_text())["accuracy"]
    assert acc["samples"] == 1000
    assert acc["accuracy"] == pytest.approx(int8.accuracy, abs=1e-12)
    assert acc["float_accuracy"] == pytest.approx(ref.accuracy, abs=1e-12)
