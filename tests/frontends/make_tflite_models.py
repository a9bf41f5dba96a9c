"""Writes the TFLite test models: ``python make_tflite_models.py OUT_DIR``.

Run in a subprocess by tests/frontends/test_tflite.py: importing TensorFlow also imports
Keras on its TensorFlow backend, which must stay out of the pytest process (tvmq loads Keras
files on the torch backend there). Tiny random Keras models, each converted by the TFLite
converter in the five forms tvmq reads: float32, dynamic range, float16, full int8 with int8
and with uint8 inputs/outputs. Plus models tvmq must refuse with the op's name.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MODES = ("float", "dynamic", "float16", "int8", "uint8")


def mlp():
    # 64x64 = 4096 weights: large enough for the converter's dynamic-range quantization
    # (it keeps weights under 1,024 elements float, as here the second layer).
    return keras.Sequential(
        [
            keras.Input((64,), batch_size=8),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def cnn():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3), batch_size=2),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.DepthwiseConv2D(3, padding="same"),
            keras.layers.Flatten(),
            keras.layers.Dense(40, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def gelu():
    return keras.Sequential(
        [keras.Input((16,), batch_size=1), keras.layers.Dense(16, activation="gelu")]
    )


def convert(model, mode, rng):
    shape = tuple(model.inputs[0].shape)
    c = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode != "float":
        c.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        c.target_spec.supported_types = [tf.float16]
    if mode in ("int8", "uint8"):
        c.representative_dataset = lambda: (
            [rng.standard_normal(shape).astype(np.float32)] for _ in range(32)
        )
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        c.inference_input_type = getattr(tf, mode)
        c.inference_output_type = getattr(tf, mode)
    return c.convert()


def main(out):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    for name, make in (("mlp", mlp), ("cnn", cnn)):
        model = make()
        for mode in MODES:
            with open(os.path.join(out, f"{name}_{mode}.tflite"), "wb") as f:
                f.write(convert(model, mode, rng))
    with open(os.path.join(out, "gelu_int8.tflite"), "wb") as f:
        f.write(convert(gelu(), "int8", rng))


if __name__ == "__main__":
    main(sys.argv[1])
