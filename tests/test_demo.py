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
    names = [r.name for r in rows]
    assert names[:2] == ["float32, PyTorch (reference)", "float32, tvmq host"]
    ref, compiled = rows[0], rows[1]
    assert ref.accuracy > 0.85
    # The compiled float model is the same function: same predictions up to float ties.
    assert abs(compiled.accuracy - ref.accuracy) <= 0.002
    assert compiled.library_bytes > 0 and compiled.median_ms > 0
    assert compiled.weights_bytes == ref.weights_bytes  # same fp32 weights, all as constants
    assert "test acc" in out and "float32, tvmq host" in out
    assert (tmp_path / "float32-tvmq-host" / "model.so").is_file()
