"""Keras 3 files (``.keras``, legacy ``.h5``) compiled through Keras's torch backend, vs Keras.

The models are built here with Keras on the torch backend (the backend tvmq itself imports
Keras with; TensorFlow is never imported in this process), saved in both formats, compiled
with ``tvmq.compile`` and compared with the Keras model's own outputs on random inputs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np
import pytest

import tvmq
from tvmq.cli import main
from tvmq.errors import TvmqError

if importlib.util.find_spec("keras") is None:  # not importorskip: that would pick a backend
    pytest.skip("the tflite extra (keras) is not installed", allow_module_level=True)

from tvmq.frontends.keras import _keras_on_torch, from_keras  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keras():
    before = os.environ.get("KERAS_BACKEND")
    module = _keras_on_torch()
    assert os.environ.get("KERAS_BACKEND") == before  # the caller's environment is kept
    module.utils.set_random_seed(0)
    return module


@pytest.fixture(scope="module")
def saved(keras, tmp_path_factory):
    """name -> (path, model): an MLP and a CNN, each as .keras and .h5."""
    layers = keras.layers
    mlp = keras.Sequential(
        [keras.Input((20,), name="x"), layers.Dense(32, activation="relu"), layers.Dense(5)]
    )
    cnn = keras.Sequential(
        [
            keras.Input((12, 12, 3), name="image"),
            layers.Conv2D(6, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.BatchNormalization(),
            layers.Flatten(),
            layers.Dense(7, activation="softmax"),
        ]
    )
    out = tmp_path_factory.mktemp("keras")
    files = {}
    for name, model in (("mlp", mlp), ("cnn", cnn)):
        for suffix in (".keras", ".h5"):
            path = out / f"{name}{suffix}"
            model.save(path)
            files[path.name] = (path, model)
    return files


@pytest.mark.parametrize("name", ["mlp.keras", "mlp.h5", "cnn.keras", "cnn.h5"])
def test_keras_file_matches_keras(saved, tmp_path, name, rng):
    path, model = saved[name]
    batch = 4
    art = tvmq.compile(
        path,
        "host",
        output_dir=tmp_path / "b",
        input_shapes={model.inputs[0].name: (batch, *model.inputs[0].shape[1:])},
        progress=False,
    )
    assert art.manifest.source == "keras"
    x = rng.standard_normal((batch, *model.inputs[0].shape[1:])).astype(np.float32)
    ref = model(x).detach().cpu().numpy()  # Keras itself (torch backend, inference mode)
    ours = np.asarray(tvmq.load(tmp_path / "b")(x))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_batch_defaults_to_one(saved):
    path, model = saved["mlp.keras"]
    imported = from_keras(path)
    assert imported.inputs[0].shape == (1, 20)
    assert imported.inputs[0].name == model.inputs[0].name == "x"


def test_lambda_layer_is_refused_without_running_it(keras, tmp_path, capsys):
    ran = tmp_path / "ran"

    def marks(t):  # leaves a file each time it runs (Keras runs it once to build the model)
        ran.touch()
        return t * 2

    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(marks), keras.layers.Dense(2)])
    path = tmp_path / "lam.keras"
    model.save(path)
    ran.unlink()
    capsys.readouterr()
    status = main(["-q", "compile", str(path), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, err
    assert "Lambda" in lines[0] and "lam.keras" in lines[0]
    assert not ran.exists() and not (tmp_path / "o").exists()


def test_unknown_input_name_is_refused(saved):
    path, _ = saved["mlp.keras"]
    with pytest.raises(TvmqError, match="not an input"):
        from_keras(path, {"nope": (1, 20)})


def test_keras_on_another_backend_is_refused(monkeypatch):
    other = types.SimpleNamespace(backend=types.SimpleNamespace(backend=lambda: "jax"))
    monkeypatch.setitem(sys.modules, "keras", other)
    with pytest.raises(TvmqError, match="already imported .* 'jax' backend.*KERAS_BACKEND=torch"):
        _keras_on_torch()


def test_missing_extra_gives_a_one_line_hint(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.setattr(
        "builtins.__import__",
        _refusing("keras", __import__),
    )
    with pytest.raises(TvmqError, match=r"pip install 'tvmq\[tflite\]'"):
        _keras_on_torch()


def _refusing(name, real_import):
    def fake(module, *args, **kwargs):
        if module == name:
            raise ImportError(f"No module named {name!r}")
        return real_import(module, *args, **kwargs)

    return fake
