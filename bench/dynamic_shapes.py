"""One all-MiniLM-L6-v2 library for any batch and sequence length vs per-shape static builds.

    python bench/dynamic_shapes.py                      # float + int8-dynamic + int8 (~25 min)
    python bench/dynamic_shapes.py --schemes none --repeat 20

Exports the zoo's MiniLM (real weights, mean-pooled embedding; eager attention) to ONNX with
dynamic ``batch`` and ``seq`` axes, compiles it once per scheme with both dims symbolic
(``tvmq.compile``, untuned), and for the (batch, seq) pairs of ``--shapes`` (batch 1..32,
seq 8..128) compares the dynamic library's output with PyTorch float (cosine, SQNR dB, max
abs error) and, at ``--static-shapes``, with a static build of the same scheme pinned to that
shape (max abs difference) and their latencies (``benchmark``, median ms; ``TVM_NUM_THREADS``
as set). Static int8 calibrates on batches of several shapes (8 sentences each of 16, 64 and
128 tokens): calibration data need not match the symbolic dims. A static int8 build takes
only its own sequence length: it calibrates on as many sentences of that length, so its
ranges (and outputs) differ from the dynamic build's by more than the kernels do.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import zoo  # noqa: E402

import tvmq  # noqa: E402


def _pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in p.split("x")) for p in text.split(",")]  # type: ignore[misc]


def _feed(vocab: int, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    ids, mask = zoo.token_inputs(batch, seq, vocab, seed=seed)
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def _stats(y: np.ndarray, ref: np.ndarray) -> str:
    a, b = y.reshape(len(y), -1).astype(np.float64), ref.reshape(len(ref), -1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    sqnr = 10 * np.log10((b**2).sum() / max(((a - b) ** 2).sum(), 1e-30))
    return f"min cos {cos.min():.4f}  SQNR {sqnr:5.1f} dB  max|err| {np.abs(a - b).max():.2e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schemes", default="none,int8-dynamic,int8")
    ap.add_argument("--shapes", type=_pairs, default=_pairs("1x8,4x32,7x100,16x64,32x128"))
    ap.add_argument("--static-shapes", type=_pairs, default=_pairs("1x128,8x32"))
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default="build/dynamic-shapes")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, example, _ = zoo.build("minilm", "full")
    model.model.config._attn_implementation = "eager"  # SDPA puts a -inf constant in the graph
    vocab = model.model.config.vocab_size
    onnx_path = zoo.export_onnx(
        model, example, out / "minilm-dyn.onnx", names=["input_ids", "attention_mask"],
        dynamic_axes={0: "batch", 1: "seq"},
    )  # fmt: skip
    calib = [_feed(vocab, 8, s, seed=10 + s) for s in (16, 64, 128)]
    for scheme in args.schemes.split(","):
        kw = {} if scheme == "none" else {"quantize": scheme}
        if scheme == "int8":
            kw["calibration_data"] = calib
        t0 = time.perf_counter()
        tvmq.compile(onnx_path, output_dir=out / f"{scheme}-dyn", progress=False,
                     tuning_logs=None, **kw)  # fmt: skip
        dyn = tvmq.load(out / f"{scheme}-dyn")
        print(f"\n[{scheme}] dynamic build {time.perf_counter() - t0:.0f} s, inputs "
              f"{[tuple(s.shape) for s in dyn.inputs]}")  # fmt: skip
        for b, s in args.shapes:
            f = _feed(vocab, b, s, seed=b * 1000 + s)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = model(*(torch.from_numpy(v) for v in f.values())).numpy()
            print(f"  batch {b:2d} seq {s:3d}: vs PyTorch {_stats(dyn(**f), ref)}")
        for b, s in args.static_shapes:
            name = f"{scheme}-{b}x{s}"
            shapes = {"input_ids": [b, s], "attention_mask": [b, s]}
            skw = dict(kw)
            if scheme == "int8":  # a static build takes only its own sequence length
                skw["calibration_data"] = [_feed(vocab, 8, s, seed=10 + s2) for s2 in (16, 64, 128)]
            tvmq.compile(onnx_path, output_dir=out / name, progress=False, tuning_logs=None,
                         input_shapes=shapes, **skw)  # fmt: skip
            static = tvmq.load(out / name)
            f = _feed(vocab, b, s, seed=7)
            y, ref = dyn(**f), static(**f)
            diff = np.abs(y - ref).max()
            sqnr = 10 * np.log10((ref**2).sum() / max(((y - ref) ** 2).sum(), 1e-30))
            inputs = [f["input_ids"], f["attention_mask"]]
            t_dyn = dyn.benchmark(inputs, warmup=3, repeat=args.repeat).median_ms
            t_static = static.benchmark(inputs, warmup=3, repeat=args.repeat).median_ms
            print(f"  batch {b:2d} seq {s:3d}: dynamic vs static build max|diff| {diff:.2e} "
                  f"(SQNR {sqnr:.1f} dB), "
                  f"latency dynamic {t_dyn:.2f} ms, static {t_static:.2f} ms "
                  f"({t_dyn / t_static:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
