"""The prepared GPU check: compile here, run on the GPU machine with TVM's runtime only.

A GPU machine often has no room, network or toolchain for TVM's compiler, so the work is split::

    python bench/gpu_check.py prepare --out DIR       # here: nvcc writes sm_90a PTX (minutes)
    python3 DIR/gpu_check.py run [--out RESULTS]      # there: runtime + the machine's torch
    python bench/gpu_check.py run --dry-run DIR       # here: the rehearsal, no GPU needed

``prepare`` builds CUDA sm_90a libraries for a 4096^3 GEMM and BERT's FFN pair at 1024 rows
(1024x768x3072, 1024x3072x768): tvmq's tensor-core kernels (fp16 ``mma.sync`` with fp32
output, int8 IMMA with int32 output; the default tiles, which pipeline the K loop two stages
deep with ``cp.async``, and beside them unpipelined, 3 stages, a K step twice as wide and, for
4096^3, 8-warp 128x256 tiles), its ``dp4a`` int8 kernel and a plain fp16
``relax.matmul`` (dlight's schedule); all-MiniLM-L6-v2 (batch 32, sequence 128, its vocabulary
cut to :data:`VOCAB` rows) and ResNet-18 (batch 32) in tvmq's static int8 (calibrated; ``w8``
where static int8 does not build for CUDA; the default) or ``--precision fp16``
(``--scheme fp16``). It writes a runtime-only
bundle (``tvmq bundle --python 3.12``: TVM's runtime libraries and Python files, the
apache-tvm-ffi wheel) with the libraries, the models' inputs and their PyTorch fp32 outputs
computed here, and this script. The folder must stay under 55 MiB (refused otherwise, naming
its largest files): one device run is sent 64 MiB, the repository's 8.6 MiB included, and
about two model builds fit, so ``--no-gemms``, ``--model`` and ``--scheme`` split the work
into several folders, each run by its own call. GEMM operands are not shipped: the device
makes them from a seed.

For the device tool: prepare into a folder of the repository that ``.git/info/exclude``
ignores (say ``.gpu/``), name it in the call's ``carry``, and run
``python3 .gpu/gpu_check.py run --out $OUT``.

``run`` (on the device, with its Python 3.12 and torch; no tvmq install, no TVM compiler)
measures, per case: max error (vs PyTorch fp32 for float results, exact for int8 GEMMs) and
median latency over CUDA-event-timed calls of each tvmq kernel or model, PyTorch fp16 eager
(cuBLAS / cuDNN), ``torch._int_mm`` (int8 GEMMs) and ``torch.compile`` fp16 (models, last, skipped
past ``--budget`` seconds), with TFLOP/s and % of the bf16 peak measured first (an 8192^3 bf16
matmul). The PyTorch model rows use the same architecture with random weights made there (their
error is fp16 vs fp32 of that model); tvmq's model rows are compared with the fp32 outputs
computed here from the real weights (relative L2 error and the least cosine of a row too). A
row that fails to launch says so and the others still run. ``--profile`` prints each model's
top GPU kernels (``torch.profiler``, whose CUPTI trace holds TVM's launches too) to
``profile.txt``. It writes ``gpu_check.txt``,
``gpu_check.json`` and, row by row, ``gpu_check.jsonl`` to ``--out`` (default ``$OUT``, else
the current folder). ``--dry-run`` skips everything that needs a GPU: it checks that the folder
is complete and under 55 MiB, and loads every library with the runtime-only TVM (a stand-in
``libcuda.so.1`` lets TVM's CUDA runtime load where no driver is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

LIMIT = 55 * 2**20  # one device run is sent 64 MiB: this folder and the repository (8.6 MiB)
GEMMS = {
    "gemm-4096": (4096, 4096, 4096),
    "ffn1-1024": (1024, 768, 3072),
    "ffn2-1024": (1024, 3072, 768),
}
BATCH, SEQ, SEED = 32, 128, 0
VOCAB = 4096
"""MiniLM's word embeddings keep their first 4096 rows (token ids are drawn below it): the whole
30522-row table is 47 MB in float32, too much for one device call beside the other models.
The gather reads 32 x 128 rows either way, so latency does not depend on it."""
FORMAT = "tvmq-gpu-check/1"


# ======================================================================================
# prepare (here: tvmq, TVM's compiler, nvcc)


def prepare(
    out: Path,
    models: bool = True,
    gemms: list[str] | None = None,
    schemes: tuple[str, ...] = ("int8",),
    only: list[str] | None = None,
) -> None:
    import torch
    import tvm

    import tvmq
    import tvmq.passes  # noqa: F401  (before tvmq.kernels)
    from tvmq.build import build_with_info, export_library
    from tvmq.bundle import make_bundle
    from tvmq.targets import get_target

    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"gpu_check: {out} is not empty; give a new folder")
    preset = get_target("cuda-sm90")
    stage = Path(
        tempfile.mkdtemp(prefix=".gpu-check-", dir=out.parent if out.parent.exists() else None)
    )
    spec: dict = {"format": FORMAT, "preset": preset.name, "gemms": {}, "models": {}}

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    (stage / "kernels").mkdir()
    for name, (m, k, n) in GEMMS.items():
        if gemms is not None and name not in gemms:
            continue
        row = spec["gemms"][name] = {"mkn": [m, k, n], "kernels": {}}
        for label, operands, mod, tiles in _gemm_modules(m, k, n, name == "gemm-4096"):
            t = time.perf_counter()
            entry = row["kernels"][label] = {"operands": operands, "tiles": tiles}
            try:
                ex, info = build_with_info(mod, preset, tuning_logs=None)
                lib = f"kernels/{name}-{label}.so"
                export_library(ex, stage / lib, preset)
                entry.update(lib=lib, build=info.summary())
            except Exception as e:  # a row that cannot be built is reported, not fatal
                entry["error"] = _reason(e)
            log(f"{name} {label}: {entry} ({time.perf_counter() - t:.0f} s)")

    arrays: dict[str, np.ndarray] = {}
    builds: list[Path] = []
    if models:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import zoo

        encoder, _, _ = zoo.minilm("full")
        _cut_vocabulary(encoder, VOCAB)
        ids, mask = zoo.token_inputs(BATCH, SEQ, VOCAB, seed=100)
        calib_ids, calib_mask = zoo.token_inputs(BATCH, SEQ, VOCAB, seed=7)
        resnet, _, _ = zoo.resnet18("full")
        images = zoo.smooth_images(BATCH, 224, seed=100)
        u8 = np.clip(np.rint(images.numpy() * 32 + 128), 0, 255).astype(np.uint8)
        calib_u8 = np.clip(
            np.rint(zoo.smooth_images(BATCH, 224, seed=7).numpy() * 32 + 128), 0, 255
        )
        arrays.update(
            minilm_input_ids=ids.numpy(), minilm_attention_mask=mask.numpy(), resnet18_u8=u8
        )
        cases = {
            "minilm-b32": (
                encoder,
                (ids, mask),
                [{"input_ids": calib_ids.numpy(), "attention_mask": calib_mask.numpy()}],
            ),
            "resnet18-b32": (
                resnet,
                (torch.from_numpy(_pixels(u8)),),
                [_pixels(calib_u8.astype(np.uint8))],
            ),
        }
        for name, (model, inputs, calib) in cases.items():
            if only and name not in only:
                continue
            with torch.no_grad():
                arrays[f"{name}_reference"] = model(*inputs).numpy()
            row = spec["models"][name] = {"builds": {}}
            for scheme in schemes:
                # int8 falls back to w8 where static int8 does not build for CUDA
                for tried in (scheme, "w8") if scheme == "int8" else (scheme,):
                    t = time.perf_counter()
                    build = stage / "models" / f"{name}-{tried}"
                    options = (
                        {"precision": tried}
                        if tried in ("fp16", "bf16")
                        else {
                            "quantize": tried,
                            "calibration_data": calib if tried == "int8" else None,
                        }
                    )
                    try:
                        tvmq.compile(
                            model,
                            preset,
                            example_inputs=inputs,
                            output_dir=build,
                            progress=False,
                            **options,
                        )
                        row["builds"][tried] = f"models/{build.name}"
                        builds.append(build)
                        log(f"{name} {tried}: built ({time.perf_counter() - t:.0f} s)")
                        break
                    except Exception as e:
                        row.setdefault("errors", []).append(f"{tried}: {_reason(e)}")
                        log(f"{name} {tried}: {row['errors'][-1]}")
    np.savez(stage / "data.npz", **arrays)

    # The runtime-only bundle: made from a model build when there is one (which then lives
    # only in bundle/model, not twice), else from a tiny seed build.
    seed_build = builds[0] if builds else _seed_build(stage, preset)
    make_bundle(seed_build, stage / "bundle", python="3.12")
    shutil.rmtree(seed_build)
    for row in spec["models"].values():
        for scheme, where in row["builds"].items():
            if where == f"models/{seed_build.name}":
                row["builds"][scheme] = "bundle/model"
    shutil.copyfile(__file__, stage / "gpu_check.py")
    (stage / "check.json").write_text(json.dumps(spec, indent=2) + "\n")
    size = _tree_bytes(stage)
    if size > LIMIT:
        files = [(p.stat().st_size, p.relative_to(stage)) for p in stage.rglob("*") if p.is_file()]
        big = sorted(files, reverse=True)[:5]
        shutil.rmtree(stage, ignore_errors=True)
        raise SystemExit(
            f"gpu_check: the prepared folder is {size / 2**20:.1f} MiB, over {LIMIT / 2**20:.0f} "
            "MiB (prepare fewer models or schemes per folder); largest: "
            + ", ".join(f"{p} {n / 2**20:.1f} MiB" for n, p in big)
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    os.replace(stage, out)
    log(f"wrote {out} ({size / 2**20:.1f} MiB); on the GPU machine: python3 {out}/gpu_check.py run")
    _ = tvm  # imported first so that a broken TVM fails before any work


def _seed_build(stage: Path, preset) -> Path:
    """A tiny CUDA build (for make_bundle) when no model was built."""
    import torch

    import tvmq

    d = stage / "seed-build"
    tvmq.compile(
        torch.nn.Linear(8, 8),
        preset,
        example_inputs=(torch.zeros(1, 8),),
        output_dir=d,
        progress=False,
    )
    return d


def _gemm_modules(m: int, k: int, n: int, variants: bool):
    """(label, operands, Relax module, tiles) for each GEMM kernel of one shape: tvmq's
    tensor-core kernels (fp16 ``mma.sync``, int8 IMMA; default tiles, software-pipelined, and
    with ``variants`` a few other tilings), the ``dp4a`` int8 kernel, and a plain fp16
    ``relax.matmul`` built as a user's graph would be. ``operands`` says how ``run`` feeds it:
    ``fp16`` (A, B), ``imma`` (A, B.T), ``dp4a`` (A, B packed by :func:`pack_dp4a`)."""
    from dataclasses import astuple, replace

    from tvm import relax

    from tvmq.kernels.cuda_int8 import choose_cuda_tiles, int8_dense_dp4a, padded_mkn
    from tvmq.kernels.cuda_mma import (
        MmaTiles,
        choose_mma_tiles,
        fp16_dense_mma,
        int8_dense_imma,
        padded_mkn_mma,
    )

    def wrap(kernel, x_type, w_type, out_dtype):
        x, w = relax.Var("x", x_type), relax.Var("w", w_type)
        bb = relax.BlockBuilder()
        with bb.function("main", [x, w]):
            gv = bb.add_func(kernel.with_attr("op_pattern", 8), "gemm")
            out_ty = relax.TensorType((m, n), out_dtype)
            bb.emit_func_output(bb.emit(relax.call_tir(gv, [x, w], out_ty=out_ty)))
        return bb.get()

    out = []
    a16, b16 = relax.TensorType((m, k), "float16"), relax.TensorType((k, n), "float16")
    bb = relax.BlockBuilder()
    a, b = relax.Var("a", a16), relax.Var("b", b16)
    with bb.function("main", [a, b]):
        bb.emit_func_output(bb.emit(relax.op.matmul(a, b, out_dtype="float16")))
    out.append(("fp16-relax", "fp16", bb.get(), None))
    for operand, build in (("float16", fp16_dense_mma), ("int8", int8_dense_imma)):
        base = choose_mma_tiles(m, k, n, operand)
        tilings = {
            "": base,
            "-nopipe": replace(base, stages=1),
            "-pipe3": replace(base, stages=3),
            "-bk2x-pipe2": replace(base, bk=2 * base.bk, stages=2),
        }
        if variants:
            tilings["-128x256-pipe2"] = MmaTiles(2, 4, 4, 4, base.bk, stages=2)  # 8 warps
        for suffix, tiles in tilings.items():
            if padded_mkn_mma(m, k, n, tiles) != (m, k, n):
                continue
            if operand == "float16":
                label, operands = f"fp16-mma{suffix}", "fp16"
                mod = wrap(build(m, k, n, tiles=tiles), a16, b16, "float32")
            else:
                label, operands = f"int8-imma{suffix}", "imma"
                i8 = relax.TensorType((m, k), "int8")
                mod = wrap(
                    build(m, k, n, tiles=tiles), i8, relax.TensorType((n, k), "int8"), "int32"
                )
            out.append((label, operands, mod, list(astuple(tiles))))
    tiles = choose_cuda_tiles(m, k, n)
    if padded_mkn(m, k, n, tiles) == (m, k, n):
        kernel = int8_dense_dp4a(m, k, n, tiles=tiles)
        x8, wp = relax.TensorType((m, k), "int8"), relax.TensorType((k // 4, n, 4), "int8")
        out.append(("int8-dp4a", "dp4a", wrap(kernel, x8, wp, "int32"), None))
    return out


def _cut_vocabulary(model, rows: int) -> None:
    """Keep the first ``rows`` rows of a BERT model's word-embedding table (in place)."""
    import torch

    for name, module in model.named_modules():
        if name.endswith("embeddings.word_embeddings"):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            cut = torch.nn.Embedding.from_pretrained(module.weight.data[:rows].clone())
            parent.word_embeddings = cut
            return
    raise ValueError("no embeddings.word_embeddings in the model")


def _reason(e: BaseException) -> str:
    """A build failure in a few lines: its first line and every line that says error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = lines[:1] + [ln for ln in lines[1:] if "error" in ln.lower()][-5:]
    return f"{type(e).__name__}: " + " | ".join(ln[:400] for ln in keep)


def _pixels(u8: np.ndarray) -> np.ndarray:
    """The float32 image batch a uint8 one stands for (exact, the same here and there)."""
    return (u8.astype(np.float32) - 128.0) * np.float32(1 / 32)


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ======================================================================================
# run (there: TVM's runtime from the bundle, the machine's torch)


def _runtime(folder: Path):
    """Import the bundle's runtime-only TVM and tvmq loader; return (tvm, tvmq.runtime)."""
    bundle = folder / "bundle"
    info = json.loads((bundle / "bundle.json").read_text())
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    sys.path.insert(0, str(bundle / "python"))
    try:
        from importlib import metadata

        have = metadata.version("apache-tvm-ffi")
    except Exception:
        have = None
    if have != info["versions"]["tvm_ffi"]:
        deps = Path(tempfile.mkdtemp(prefix="tvm-ffi-"))
        with zipfile.ZipFile(bundle / info["wheel"]) as z:
            z.extractall(deps)
        sys.path.insert(1, str(deps))
    import tvm
    import tvm.base

    import tvmq.runtime

    if not tvm.base._RUNTIME_ONLY or "tvm.relax" in sys.modules:
        raise SystemExit("gpu_check: TVM's compiler was loaded; the check must run without it")
    return tvm, tvmq.runtime


def _preload_cudart(torch) -> None:
    """Make ``libcudart.so.13`` (which TVM's CUDA runtime links) findable: torch's own copy
    (``nvidia/cu13/lib``) or the CUDA toolkit's. Nothing found: TVM's loader says so."""
    import ctypes
    import glob

    site = Path(torch.__file__).resolve().parents[1]
    found = sorted(glob.glob(str(site / "nvidia" / "**" / "libcudart.so.13"), recursive=True))
    found += sorted(glob.glob("/usr/local/cuda*/lib*/libcudart.so.13"))
    if found:
        ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)


def _fake_libcuda(where: Path) -> None:
    """A stand-in libcuda.so.1 (every driver call fails) so that TVM's CUDA runtime loads here."""
    import ctypes

    lib = Path(sys.modules["tvm"].__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True)
    names = sorted(
        {
            ln.split()[-1]
            for ln in nm.stdout.splitlines()
            if ln.split()[-1].startswith("cu") and "@" not in ln.split()[-1]
        }
    )
    (where / "cuda.c").write_text("".join(f"int {n}(void) {{ return 999; }}\n" for n in names))
    subprocess.run(
        [
            "cc",
            "-shared",
            "-fPIC",
            "-Wl,-soname,libcuda.so.1",
            "-o",
            str(where / "libcuda.so.1"),
            str(where / "cuda.c"),
        ],
        check=True,
    )
    ctypes.CDLL(str(where / "libcuda.so.1"), mode=ctypes.RTLD_GLOBAL)


def _libraries(folder: Path, spec: dict) -> dict[str, Path]:
    libs = {}
    for name, row in spec["gemms"].items():
        for label, entry in row["kernels"].items():
            if "lib" in entry:
                libs[f"{name} {label}"] = folder / entry["lib"]
    for name, row in spec["models"].items():
        for scheme, where in row["builds"].items():
            libs[f"{name} {scheme}"] = folder / where / "model.so"
    return libs


def _module_kinds(mod) -> set[str]:
    """The kinds of a loaded module and of everything it imports ("library", "cuda", ...)."""
    return {mod.kind}.union(*(_module_kinds(m) for m in mod.imports))


def dry_run(folder: Path) -> list[str]:
    """Everything but the GPU: the folder is complete, small enough, and every library loads."""
    spec = json.loads((folder / "check.json").read_text())
    lines = [
        f"{folder}: {_tree_bytes(folder)} bytes ({_tree_bytes(folder) / 2**20:.1f} MiB, limit {LIMIT / 2**20:.0f} MiB)"
    ]
    if _tree_bytes(folder) > LIMIT:
        raise SystemExit(f"gpu_check: {lines[0]}")
    data = np.load(folder / "data.npz")
    for name, row in spec["models"].items():
        if row["builds"] and f"{name}_reference" not in data:
            raise SystemExit(f"gpu_check: no reference output for {name} in data.npz")
    tvm, runtime = _runtime(folder)
    lines.append(f"TVM runtime only, from {Path(tvm.__file__).parent}")
    with tempfile.TemporaryDirectory() as tmp:
        _fake_libcuda(Path(tmp))
        runtime.load_device_runtime(tvm.cuda(0))
        for label, path in _libraries(folder, spec).items():
            lib = tvm.runtime.load_module(str(path))
            kinds = sorted(_module_kinds(lib))
            if "cuda" not in kinds:
                raise SystemExit(f"gpu_check: {path} holds no CUDA code ({kinds})")
            lines.append(
                f"{label}: loads with the runtime only ({path.stat().st_size / 2**20:.1f} MiB, {kinds})"
            )
    missing = [
        f"{n} {label}: {e['error']}"
        for n, r in spec["gemms"].items()
        for label, e in r["kernels"].items()
        if "error" in e
    ]
    missing += [f"{n}: {r['errors']}" for n, r in spec["models"].items() if r.get("errors")]
    lines += [f"not built: {m}" for m in missing]
    return lines


def run(
    folder: Path,
    results: Path,
    quick: bool = False,
    torch_models: bool = True,
    budget: float = 300.0,
    profile: bool = False,
) -> int:
    """The measurements on the GPU (see the module's docstring); returns the exit status."""
    import torch

    start = time.perf_counter()
    spec = json.loads((folder / "check.json").read_text())
    _preload_cudart(torch)
    tvm, runtime = _runtime(folder)
    dev = tvm.cuda(0)
    runtime.load_device_runtime(dev)
    name = torch.cuda.get_device_name(0)
    reps = 5 if quick else 50
    results.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def timed(fn) -> float:
        """Median ms of ``reps`` calls, each between two CUDA events (after 5 warm-up calls)."""
        for _ in range(5):
            fn()
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(reps)
        ]
        for a, b in events:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in events)

    bf = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2 * 8192**3 / timed(lambda: bf @ bf) / 1e9  # TFLOP/s

    def vm_of(path: Path):
        return tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(path)), dev)

    def tvm_t(t):
        return tvm.runtime.from_dlpack(t.contiguous())

    def add(case, engine, ms, err, flop=None, note=""):
        tf = flop / ms / 1e9 if flop and ms else None
        rows.append(
            {
                "case": case,
                "engine": engine,
                "ms": ms,
                "max_err": err,
                "tflops": tf,
                "pct_peak": 100 * tf / peak if tf else None,
                "note": note,
            }
        )
        print(_fmt(rows[-1]), flush=True)
        with open(results / "gpu_check.jsonl", "a") as f:  # kept if the run is cut short
            f.write(json.dumps(rows[-1]) + "\n")

    gen = torch.Generator(device="cuda").manual_seed(SEED)

    def gemm(case: str, row: dict) -> None:
        m, k, n = row["mkn"]
        flop = 2 * m * k * n
        a = torch.randn(m, k, device="cuda", generator=gen)
        b = torch.randn(k, n, device="cuda", generator=gen) / k**0.5
        ref = a @ b  # PyTorch fp32 (TF32 off by default for matmul)
        a16, b16 = a.half(), b.half()
        a8 = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8, generator=gen)
        b8 = torch.randint(-128, 128, (k, n), device="cuda", dtype=torch.int8, generator=gen)
        exact = (a8.double() @ b8.double()).round()
        feeds = {
            "fp16": ([tvm_t(a16), tvm_t(b16)], ref),
            "imma": ([tvm_t(a8), tvm_t(b8.t().contiguous())], exact),
            "dp4a": ([tvm_t(a8), tvm_t(pack_dp4a(b8))], exact),
        }
        torch_rows = {
            "fp16": lambda: [("PyTorch fp16 eager", lambda: a16 @ b16)],  # cuBLAS
            "imma": lambda: [("torch._int_mm int8", lambda: torch._int_mm(a8, b8))],
        }
        # tvmq's kernels, then PyTorch's for the same operands; risky rows (pipelined,
        # other tilings) come after the plain ones of their kind: a launch that fails is
        # reported in its row and the others still run.
        for kind in ("fp16", "imma", "dp4a"):
            args, want = feeds[kind]
            for label, entry in row["kernels"].items():
                if entry["operands"] != kind:
                    continue
                if "lib" not in entry:
                    add(case, f"tvmq {label}", None, None, None, entry.get("error", "?")[:60])
                    continue
                try:
                    fn = vm_of(folder / entry["lib"])["main"]
                    y = torch.from_dlpack(fn(*args))
                    add(
                        case,
                        f"tvmq {label}",
                        timed(lambda fn=fn, args=args: fn(*args)),
                        _err(y, want),
                        flop,
                        f"tiles {entry['tiles']}" if entry.get("tiles") else entry["build"],
                    )
                except Exception as e:  # noqa: BLE001  (one row; the next ones still run)
                    add(case, f"tvmq {label}", None, None, None, f"failed: {_first_line(e)}")
            for engine, fn in torch_rows.get(kind, list)():
                add(case, engine, timed(fn), _err(fn(), want), flop)

    for case, row in spec["gemms"].items():
        gemm(case, row)

    data = np.load(folder / "data.npz")
    torch_models_of = _torch_models(torch)
    compiled = []  # torch.compile rows last: their compile time is the least certain
    for case, row in spec["models"].items():
        ref = torch.from_numpy(data[f"{case}_reference"]).cuda()
        inputs = _model_inputs(case, data)
        args = [tvm.runtime.tensor(x, dev) for x in inputs]
        for scheme, where in row.get("builds", {}).items():
            try:
                fn = runtime.CompiledModel(folder / where, dev)._vm["main"]
                y = torch.from_dlpack(_first(fn(*args))).float()
                add(
                    case,
                    f"tvmq {scheme}",
                    timed(lambda fn=fn, args=args: fn(*args)),
                    _err(y, ref),
                    None,
                    _agreement(y, ref),
                )
                if profile:
                    _print_profile(
                        torch, lambda fn=fn, args=args: fn(*args), f"{case} tvmq {scheme}", results
                    )
            except Exception as e:  # noqa: BLE001  (one row; the next ones still run)
                add(case, f"tvmq {scheme}", None, None, None, f"failed: {_first_line(e)}")
        if not torch_models:
            continue
        net, t_inputs = torch_models_of[case](data)
        with torch.no_grad():
            ref32 = net(*t_inputs)
            half = net.half()
            f16 = [x.half() if x.is_floating_point() else x for x in t_inputs]
            add(
                case,
                "PyTorch fp16 eager",
                timed(lambda h=half, x=f16: h(*x)),
                _err(half(*f16), ref32),
                None,
                "random weights, vs its fp32; " + _agreement(half(*f16).float(), ref32),
            )
            if profile:
                _print_profile(torch, lambda h=half, x=f16: h(*x), f"{case} PyTorch fp16", results)
        compiled.append((case, half, f16, ref32))
    for case, half, f16, ref32 in compiled:
        if time.perf_counter() - start > budget:
            add(case, "torch.compile fp16", None, None, None, f"skipped: past {budget:.0f} s")
            continue
        with torch.no_grad():
            comp = torch.compile(half)
            add(
                case,
                "torch.compile fp16",
                timed(lambda c=comp, x=f16: c(*x)),
                _err(comp(*f16), ref32),
                None,
                "random weights, vs its fp32",
            )

    took = time.perf_counter() - start
    header = f"device: {name}; bf16 peak measured {peak:.0f} TFLOP/s (8192^3); {took:.0f} s"
    table = "\n".join([header, _fmt(None), *(_fmt(r) for r in rows)])
    (results / "gpu_check.txt").write_text(table + "\n")
    (results / "gpu_check.json").write_text(
        json.dumps({"device": name, "peak_tflops": peak, "seconds": took, "rows": rows}, indent=1)
    )
    print(table)
    return 0


def _err(y, want) -> float:
    """Max absolute error of ``y`` against ``want`` (NaN anywhere gives NaN)."""
    return (y.double() - want.double()).abs().max().item()


def _print_profile(torch, fn, label: str, results: Path, calls: int = 5, top: int = 12) -> None:
    """The GPU kernels of ``calls`` calls of ``fn`` (CUPTI, through torch.profiler: TVM's
    launches are seen too): the ``top`` by time, per call, printed and appended to
    ``profile.txt``."""
    try:
        text = _profile_text(torch, fn, label, calls, top)
    except Exception as e:  # noqa: BLE001  (a profile is extra; the run goes on)
        text = f"-- {label}: no profile ({_first_line(e)})"
    print(text, flush=True)
    with open(results / "profile.txt", "a") as f:
        f.write(text + "\n")


def _profile_text(torch, fn, label: str, calls: int, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            t, n = kernels.get(e.name, (0.0, 0))
            kernels[e.name] = (t + e.device_time / calls, n + 1)
    total = sum(t for t, _ in kernels.values()) or float("nan")
    lines = [f"-- {label}: {total / 1e3:.3f} ms of kernels a call, {len(kernels)} kinds"]
    for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"   {t / 1e3:8.3f} ms {100 * t / total:5.1f}%  x{n // calls:<3} {name[:110]}")
    return "\n".join(lines)


def _agreement(y, ref) -> str:
    """``y`` against ``ref`` in words: relative L2 error, and the least cosine similarity of a
    row (a sentence embedding, an image's logits)."""
    y, ref = y.double().flatten(1), ref.double().flatten(1)
    rel = ((y - ref).norm() / ref.norm()).item()
    cos = torch_cosine(y, ref).min().item()
    return f"rel L2 {rel:.2e}, min cos {cos:.5f}"


def torch_cosine(a, b):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:120] if lines else ''}"


def pack_dp4a(w):
    """tvmq's ``pack_weight_dp4a`` for a torch int8 (K, N) weight, K % 4 == 0, no padding."""
    k, n = w.shape
    return w.reshape(k // 4, 4, n).permute(0, 2, 1).contiguous()


def _first(result):
    return result if hasattr(result, "__dlpack__") else result[0]


def _model_inputs(case: str, data) -> list[np.ndarray]:
    if case.startswith("minilm"):
        return [data["minilm_input_ids"], data["minilm_attention_mask"]]
    return [_pixels(data["resnet18_u8"])]


def _torch_models(torch):
    """case -> f(data) = (the same architecture in PyTorch, random weights, on the GPU; inputs)."""

    def minilm(data):
        from transformers import BertConfig, BertModel

        cfg = BertConfig(
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            vocab_size=VOCAB,
            attn_implementation="eager",
        )
        torch.manual_seed(SEED)
        bert = BertModel(cfg, add_pooling_layer=False).eval().cuda()

        class Pooled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = bert  # a submodule, so that .half() converts it

            def forward(self, ids, mask):
                h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
                w = mask.unsqueeze(-1).to(h.dtype)
                return (h * w).sum(1) / w.sum(1).clamp(min=1e-4)

        return Pooled().eval().cuda(), [
            torch.from_numpy(x).cuda() for x in _model_inputs("minilm", data)
        ]

    def resnet18(data):
        import torchvision

        torch.manual_seed(SEED)
        net = torchvision.models.resnet18(weights=None).eval().cuda()
        return net, [torch.from_numpy(_model_inputs("resnet18", data)[0]).cuda()]

    return {"minilm-b32": minilm, "resnet18-b32": resnet18}


def _fmt(r: dict | None) -> str:
    if r is None:
        return (
            f"{'case':13} {'engine':20} {'ms':>9} {'TFLOP/s':>8} {'% peak':>7} {'max err':>9}  note"
        )

    def num(v, f):
        return format(v, f) if v is not None else "-"

    return (
        f"{r['case']:13} {r['engine']:20} {num(r['ms'], '9.4f')} {num(r['tflops'], '8.1f')} "
        f"{num(r['pct_peak'], '7.1f')} {num(r['max_err'], '9.3g')}  {r['note']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="compile here and write the folder for the GPU machine")
    p.add_argument("--out", required=True, help="a new folder")
    p.add_argument("--no-models", action="store_true", help="GEMMs only (fast; for tests)")
    p.add_argument("--gemm", action="append", choices=list(GEMMS), help="only these GEMMs")
    p.add_argument("--no-gemms", action="store_true", help="models only")
    p.add_argument(
        "--model", action="append", choices=["minilm-b32", "resnet18-b32"], help="only these models"
    )
    p.add_argument(
        "--scheme",
        action="append",
        choices=["int8", "w8", "fp16", "bf16"],
        help="the models' schemes (default: int8; one device call holds about two model builds: "
        "prepare fp16 with --no-gemms and one --model)",
    )
    r = sub.add_parser("run", help="measure on the GPU machine (or rehearse with --dry-run)")
    r.add_argument(
        "folder",
        nargs="?",
        default=str(Path(__file__).resolve().parent),
        help="the prepared folder (default: this script's)",
    )
    r.add_argument("--out", default=os.environ.get("OUT", "."), help="where the table goes")
    r.add_argument(
        "--dry-run", action="store_true", help="no GPU: check the folder, load every library"
    )
    r.add_argument("--quick", action="store_true", help="5 timed calls per row instead of 50")
    r.add_argument(
        "--no-torch-models",
        action="store_true",
        help="no PyTorch rows for the models (when another call measures them)",
    )
    r.add_argument("--profile", action="store_true", help="print each model's top GPU kernels")
    r.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="seconds after which torch.compile rows are skipped",
    )
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(
            Path(args.out).resolve(),
            models=not args.no_models,
            gemms=[] if args.no_gemms else args.gemm,
            schemes=tuple(args.scheme or ("int8",)),
            only=args.model,
        )
        return 0
    folder = Path(args.folder).resolve()
    if not (folder / "check.json").is_file():
        raise SystemExit(f"gpu_check: {folder} is not a prepared folder (no check.json)")
    if args.dry_run:
        print("\n".join(dry_run(folder)))
        return 0
    return run(
        folder, Path(args.out), args.quick, not args.no_torch_models, args.budget, args.profile
    )


if __name__ == "__main__":
    sys.exit(main())
