"""Calibration data: every accepted form becomes {input name: numpy array} batches."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tvmq.calibration import count_batches, iter_calibration_batches
from tvmq.errors import TvmqError

X = np.arange(24, dtype=np.float32).reshape(6, 4)
Y = np.arange(12, dtype=np.int64).reshape(6, 2)


def batches(data, names, **kw):
    return list(iter_calibration_batches(data, names, **kw))


def test_single_array():
    (b,) = batches(X, ["x"])
    assert list(b) == ["x"] and np.array_equal(b["x"], X)
    assert count_batches(X) == 1
    split = batches(X, ["x"], batch_size=4)
    assert [s["x"].shape for s in split] == [(4, 4), (2, 4)]
    np.testing.assert_array_equal(np.concatenate([s["x"] for s in split]), X)
    assert count_batches(X, batch_size=4) == 2
    assert len(batches(X, ["x"], batch_size=1, max_batches=3)) == 3
    assert count_batches(X, batch_size=1, max_batches=3) == 3


def test_torch_tensor_with_grad():
    t = torch.ones(2, 3, requires_grad=True)
    (b,) = batches(t, ["x"])
    assert isinstance(b["x"], np.ndarray) and b["x"].shape == (2, 3)


def test_dict_one_batch_extra_keys_ignored():
    (b,) = batches({"a": X, "b": Y, "label": Y}, ["a", "b"])
    assert list(b) == ["a", "b"] and b["b"].dtype == np.int64
    split = batches({"a": X, "b": Y}, ["a", "b"], batch_size=5)
    assert [(s["a"].shape[0], s["b"].shape[0]) for s in split] == [(5, 5), (1, 1)]
    assert count_batches({"a": X, "b": Y}, batch_size=5) == 2


def test_list_of_arrays_and_of_dicts():
    assert len(batches([X, X[:2]], ["x"])) == 2
    out = batches([{"a": X, "b": Y}, {"a": X[:1], "b": Y[:1]}], ["a", "b"])
    assert [o["a"].shape[0] for o in out] == [6, 1]
    assert count_batches([X, X[:2]]) == 2
    assert count_batches([X, X[:2]], batch_size=4) == 3


def test_tuple_of_inputs_is_one_batch_for_multi_input_models():
    (b,) = batches((X, Y), ["a", "b"])
    assert np.array_equal(b["a"], X) and np.array_equal(b["b"], Y)
    assert count_batches((X, Y), ["a", "b"]) == 1
    # the same tuple for a single-input model is two batches
    assert len(batches((X, Y), ["x"])) == 2


def test_npz_and_npy(tmp_path):
    np.savez(tmp_path / "named.npz", a=X, b=Y)
    (b,) = batches(tmp_path / "named.npz", ["a", "b"])
    assert np.array_equal(b["b"], Y)
    np.savez(tmp_path / "single.npz", X)  # key arr_0: fine for a single-input model
    (b,) = batches(str(tmp_path / "single.npz"), ["input"])
    assert np.array_equal(b["input"], X)
    assert count_batches(tmp_path / "single.npz", batch_size=4) == 2
    np.save(tmp_path / "x.npy", X)
    assert np.array_equal(batches(tmp_path / "x.npy", ["x"])[0]["x"], X)
    with pytest.raises(TvmqError, match=r"arrays \['a', 'b'\].*inputs are \['a', 'c'\]"):
        batches(tmp_path / "named.npz", ["a", "c"])
    with pytest.raises(TvmqError, match="does not exist"):
        batches(tmp_path / "missing.npz", ["x"])
    (tmp_path / "calib.txt").write_text("1 2 3")
    with pytest.raises(TvmqError, match=r"\.npz or \.npy"):
        batches(tmp_path / "calib.txt", ["x"])


def test_torch_dataloaders():
    xs = torch.randn(10, 3)
    labels = torch.arange(10)
    labelled = DataLoader(TensorDataset(xs, labels), batch_size=4)
    out = batches(labelled, ["x"])
    assert [o["x"].shape for o in out] == [(4, 3), (4, 3), (2, 3)]
    assert all(isinstance(o["x"], np.ndarray) for o in out)
    np.testing.assert_array_equal(out[0]["x"], xs[:4].numpy())
    assert count_batches(labelled) == 3
    # two inputs and a label: inputs taken positionally, label ignored
    two = DataLoader(TensorDataset(xs, xs * 2, labels), batch_size=5)
    out = batches(two, ["a", "b"])
    assert len(out) == 2 and np.allclose(out[0]["b"], 2 * out[0]["a"])
    # unlabelled loader of a single tensor yields [x] lists
    plain = DataLoader(TensorDataset(xs), batch_size=10)
    assert batches(plain, ["x"])[0]["x"].shape == (10, 3)


def test_generators_and_nested_labelled_batches():
    def gen():
        for i in range(3):
            yield ((X[i : i + 1], Y[i : i + 1]), np.zeros(1))

    out = batches(gen(), ["a", "b"])
    assert len(out) == 3 and out[2]["b"].tolist() == [[4, 5]]
    assert count_batches(gen()) is None
    assert len(batches(gen(), ["a", "b"], max_batches=2)) == 2


def test_errors_name_what_was_expected():
    with pytest.raises(TvmqError, match=r"single array but the model has 2 inputs \['a', 'b'\]"):
        batches(X, ["a", "b"])
    with pytest.raises(TvmqError, match=r"keys \['a'\].*inputs are \['a', 'b'\].*missing: \['b'\]"):
        batches({"a": X}, ["a", "b"])
    with pytest.raises(TvmqError, match="type int is not supported; expected a numpy array"):
        batches(3, ["x"])
    with pytest.raises(TvmqError, match="batch is a str"):
        batches(["not an array"], ["x"])
    with pytest.raises(TvmqError, match="empty"):
        batches([], ["x"])
    with pytest.raises(TvmqError, match="batch_size"):
        batches(X, ["x"], batch_size=0)
    with pytest.raises(TvmqError, match="leading"):
        batches({"a": X, "b": Y[:3]}, ["a", "b"], batch_size=2)
    with pytest.raises(TvmqError, match="input_names"):
        batches(X, [])
