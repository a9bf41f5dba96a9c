"""tvmq's Python API end to end: import, quantize, compile, load, run, measure.

    python examples/python_api.py

Trains nothing: it takes a small random CNN, so only the mechanics are shown; see
``tvmq demo`` for accuracy on real digits.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch

import tvmq
from tvmq.demo import make_cnn
from tvmq.quantization import qmath


def main() -> None:
    torch.manual_seed(0)
    model = make_cnn().eval()
    x = torch.rand(1, 784)
    calib = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tvmq.compile(model, "host", example_inputs=(x,), output_dir=out / "fp32")
        tvmq.compile(
            model,
            "host",
            example_inputs=(x,),
            output_dir=out / "int8",
            quantize="int8",
            calibration_data=calib,
        )
        with torch.no_grad():
            ref = model(x).numpy()
        for name in ("fp32", "int8"):
            m = tvmq.load(out / name)
            y = m(x.numpy())
            stats = m.benchmark(repeat=100)
            print(
                f"{name}: {m.manifest.library['bytes'] / 1024:.0f} KiB, "
                f"SQNR vs PyTorch {qmath.sqnr(ref, y):.1f} dB, median {stats.median_ms:.3f} ms"
            )


if __name__ == "__main__":
    main()
