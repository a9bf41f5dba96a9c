"""Static int8 all-MiniLM-L6-v2 at sequence 128: accuracy and speed of candidate configurations.

    python bench/minilm_static_sweep.py                 # full sweep (about 10 min cold, 1 min warm)
    python bench/minilm_static_sweep.py --configs default,smooth-ln+dyn-ffn2-held32 --repeat 40
    python bench/minilm_static_sweep.py --list          # the configurations
    python bench/minilm_static_sweep.py --no-time       # accuracy only

For each configuration: the minimum and mean cosine similarity of the int8 model's
mean-pooled embeddings to PyTorch float's, over the 31 ``SENTENCES`` of bench/bench_peers.py
at sequence 128 (the accuracy bench_peers reports), the latency of the compiled model
(``tvmq.load``; batch 1, ``TVM_NUM_THREADS=1``, ``--repeat`` runs in 5 round-robin rounds
over the configurations, the median of the rounds' medians, so a busy machine skews them
alike), and the matmuls left computing in float. Builds are untuned (``tuning_logs=None``),
as bench_peers builds its MiniLM rows.

Calibration sets (``calib`` column):

- ``peers8``: what bench_peers calibrates on: 8 batches cycling through ``SENTENCES`` (the
  evaluated sentences: *in-sample*, not held out).
- ``heldN``: the first N of ``CALIB_SENTENCES`` below, written for this script and disjoint
  from ``SENTENCES`` (held out), at sequence 128 like the evaluation.

Besides the scheme's other knobs (observer, skip, bias correction), its ``smooth`` and
``dynamic`` fields (``Int8Static``; defaults ``(("after:layer_norm", 0.5),)`` and
``("after:gelu",)``), applied here by the same helpers ``tvmq.quantization.quantize`` uses:

- ``smooth``: SmoothQuant (``tvmq.passes.SmoothQuant``) on the prepared float model before
  calibration, for the sites a selector names (``after:layer_norm``: Q/K/V and FFN-in).
- ``dynamic``: sites left out of static quantization and then quantized by
  ``QuantizeDynamic`` (int8-dynamic, per-row ranges) on the static result
  (``after:gelu``: FFN-out).

``_s()`` is the host scheme *without* them (tvmq's static int8 before they existed), so the
manual rows compare each change alone; the ``public-*`` rows use the library defaults.

How it stays cheap: every calibration set (and smoothing) runs the float model once, with
one observer per tensor that feeds all the registered observers at once (``_FanOut``); its
statistics are pickled in ``--cache`` (default build/minilm-static-sweep). A configuration
then only picks its observers' ranges and runs the steps of
``tvmq.quantization.quantize`` (calibrated qparams -> ``static_pipeline_params`` [with bias
corrections] -> ``static_int8_passes``), and ``tvmq.compile`` builds the result into ``<cache>/<config>``;
a build whose configuration is unchanged is reused, with its accuracy. The ``public-*``
rows are built by ``tvmq.compile(quantize=...)`` itself (``public-int8-held32`` matches
``smooth-ln+dyn-ffn2-held32``: same scheme and calibration).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pickle
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts its thread pool
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ == "__main__":
    # Run as the module, not as __main__: the pickled statistics name their observer class
    # by module, and an observer name can be registered only once.
    import minilm_static_sweep

    minilm_static_sweep.main()
    sys.exit(0)

import bench_peers as bp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tvmq.calibration import get_observer, list_observers  # noqa: E402
from tvmq.calibration.base import Observer  # noqa: E402
from tvmq.quantization import Int8Static  # noqa: E402

NAMES = ["input_ids", "attention_mask"]

# Held-out calibration sentences: none of them is in bench_peers.SENTENCES. Varied topics,
# languages and lengths (a few one-word inputs, a few that fill most of the 128 tokens).
CALIB_SENTENCES = bp.CALIB_SENTENCES  # held out: disjoint from bp.SENTENCES


# --------------------------------------------------------------------------------------
# Configurations


# all-MiniLM-L6-v2's sites per role (6 layers; tvmq numbers the matmuls in dataflow order:
# Q, K, V, attention output, FFN in, FFN out per layer; two matmul_act per layer).
LAYERS = range(6)
GROUPS = {
    "qkv": tuple(f"matmul_{6 * i + j}" for i in LAYERS for j in range(3)),
    "attn_out": tuple(f"matmul_{6 * i + 3}" for i in LAYERS),
    "ffn1": tuple(f"matmul_{6 * i + 4}" for i in LAYERS),
    "ffn2": tuple(f"matmul_{6 * i + 5}" for i in LAYERS),
    "matmul_act": ("matmul_act",),
}


def _s(**kw) -> Int8Static:
    """The host's static int8 scheme (uint8 activations on VNNI) without SmoothQuant and
    dynamic sites (tvmq's static int8 before those options), with ``kw`` changed."""
    from tvmq.pipeline import scheme_for_target
    from tvmq.targets import get_target

    kw = {"smooth": (), "dynamic": (), **kw}
    return dataclasses.replace(scheme_for_target("int8", get_target("host")), **kw)


@dataclass(frozen=True)
class Config:
    name: str
    scheme: Int8Static = field(default_factory=_s)
    calib: str = "peers8"
    bias_correction: bool = False
    # Build through the public API instead: tvmq.compile(quantize=public, calibration_data=...).
    public: str | None = None
    note: str = ""

    def smoothing(self) -> str:
        return ",".join(f"{p}@{a:g}" for p, a in self.scheme.smooth)

    def key(self) -> str:
        return json.dumps(
            {
                "scheme": self.scheme.to_dict(), "calib": self.calib,
                "bc": self.bias_correction, "public": self.public,
            },
            sort_keys=True,
        )  # fmt: skip


# SmoothQuant on the sites that read a LayerNorm output (Q/K/V and FFN-in), alpha 0.5;
# int8-dynamic on the sites that read a GELU output (FFN-out).
SMOOTH_LN = (("after:layer_norm", 0.5),)
DYN_GELU = ("after:gelu",)


def configs() -> list[Config]:
    """The sweep, in table order."""
    G = GROUPS
    return [
        Config("default", note="static int8 before smooth/dynamic (bench_peers' old row)"),
        Config("default-held32", calib="held32"),
        Config("obs-mse", _s(observer="mse")),
        Config("obs-percentile", _s(observer="percentile")),
        Config("obs-entropy", _s(observer="entropy")),
        Config("bias-corr", bias_correction=True),
        Config("float-matmul_act", _s(skip=("matmul_act",))),
        Config("float-ffn1", _s(skip=G["ffn1"])),
        Config("float-ffn2", _s(skip=G["ffn2"])),
        Config("dyn-ffn2", _s(dynamic=DYN_GELU), note="FFN-out int8-dynamic (per row)"),
        Config("smooth-ln", _s(smooth=SMOOTH_LN), note="SmoothQuant a=0.5 on Q/K/V + FFN-in"),
        Config("smooth-ln+dyn-ffn2", _s(smooth=SMOOTH_LN, dynamic=DYN_GELU)),
        Config(
            "smooth-ln+dyn-ffn2-held32",
            _s(smooth=SMOOTH_LN, dynamic=DYN_GELU),
            calib="held32",
            note="held-out calibration",
        ),  # fmt: skip
        Config("smooth-ln+float-ffn2", _s(skip=G["ffn2"], smooth=SMOOTH_LN)),
        # Public-API builds (calibration inside tvmq.compile; the library's defaults).
        Config("public-int8", calib="peers8", public="int8", note="tvmq.compile(quantize='int8')"),
        Config(
            "public-int8-held32",
            calib="held32",
            public="int8",
            note="tvmq.compile(quantize='int8'), held-out calibration: bench_peers' row",
        ),  # fmt: skip
        Config("public-int8-dynamic", public="int8-dynamic", note="tvmq.compile('int8-dynamic')"),
    ]


# --------------------------------------------------------------------------------------
# Calibration statistics, once per calibration set


class _FanOut(Observer):
    """Feeds every registered observer (default options) the same batches."""

    name = "sweep_fanout"

    def _reset(self) -> None:
        self.subs = {n: get_observer(n) for n in list_observers() if n not in (self.name, "auto")}
        self.channel_absmax = None  # max |x| per channel (last axis), for smoothing

    def _update(self, x: np.ndarray) -> None:
        for obs in self.subs.values():
            obs.update(x)
        m = np.abs(x).reshape(-1, x.shape[-1]).max(axis=0)
        self.channel_absmax = (
            m if self.channel_absmax is None else np.maximum(self.channel_absmax, m)
        )

    def _compute_range(self, dtype, symmetric):
        raise NotImplementedError


class _FanOutScheme:
    """Just enough of a scheme for ``collect_activation_stats``: fan-out observers."""

    num_calibration_batches = None

    @staticmethod
    def observer_for(name, kind=None):
        return _FanOut.name


def calibration_batches(calib: str) -> list[dict[str, np.ndarray]]:
    if calib == "peers8":  # bench_peers' own calibration (batch 1)
        sents = [bp.SENTENCES[k % len(bp.SENTENCES)] for k in range(8)]
    elif calib.startswith("held"):
        n = int(calib[4:])
        if n > len(CALIB_SENTENCES):
            raise SystemExit(f"{calib}: only {len(CALIB_SENTENCES)} held-out sentences")
        sents = CALIB_SENTENCES[:n]
    else:
        raise SystemExit(f"unknown calibration set {calib!r}")
    overlap = set(sents) & set(bp.SENTENCES)
    assert calib == "peers8" or not overlap, overlap
    return [dict(zip(NAMES, bp._tokenize([s]), strict=True)) for s in sents]


class Workbench:
    """The float model, its prepared module, cached statistics, builds and accuracy."""

    def __init__(self, cache: Path):
        from tvmq.frontends import import_model
        from tvmq.passes import prepare_passes

        self.cache = cache
        cache.mkdir(parents=True, exist_ok=True)
        self.encoder = bp._minilm_model()
        example = bp._tokenize(bp.SENTENCES[:1])
        self.imported = import_model(
            self.encoder, example_inputs=tuple(torch.from_numpy(a) for a in example),
            input_names=NAMES,
        )  # fmt: skip
        self.prepared = prepare_passes()(self.imported.mod)
        self.eval_inputs = [bp._tokenize([s]) for s in bp.SENTENCES]
        with torch.no_grad():
            self.reference = [
                self.encoder(*[torch.from_numpy(a) for a in x]).numpy().ravel()
                for x in self.eval_inputs
            ]
        self._stats: dict = {}

    def module(self, cfg: Config):
        """The prepared float module ``cfg`` quantizes (smoothed when it asks for it), as
        ``tvmq.quantization.quantize`` smooths it (statistics from the unsmoothed run)."""
        from tvmq.passes import SmoothQuant
        from tvmq.quantization.static import dynamic_sites, smooth_site_names

        scheme = cfg.scheme
        if not scheme.smooth:
            return self.prepared
        stats = self.stats(dataclasses.replace(cfg, scheme=_s(smooth=())))
        func = self.prepared["main"]
        names = set(smooth_site_names(func, scheme, dynamic_sites(func, scheme)))
        absmax = {n: f.channel_absmax for n, f in stats.observers.items() if n in names}
        return SmoothQuant(absmax, scheme.smooth)(self.prepared)

    def stats(self, cfg: Config):
        key = f"{cfg.calib}{'-' + cfg.smoothing() if cfg.scheme.smooth else ''}"
        if key in self._stats:
            return self._stats[key]
        from tvmq.quantization.collect import collect_activation_stats

        path = self.cache / f"stats-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pkl"
        if path.exists():
            stats = pickle.loads(path.read_bytes())
        else:
            t = time.perf_counter()
            stats = collect_activation_stats(
                self.module(cfg), calibration_batches(cfg.calib), _FanOutScheme(),
                inputs=self.imported.inputs, progress=False,
            )  # fmt: skip
            stats.samples = {}  # not needed here; keeps the pickle small
            path.write_bytes(pickle.dumps(stats))
            _log(f"calibration {key}: {time.perf_counter() - t:.0f} s")
        self._stats[key] = stats
        return stats

    def qparams(self, cfg: Config) -> dict[str, tuple[float, int]]:
        """What ``activation_qparams`` gives for ``cfg``'s scheme and calibration set."""
        from tvmq.quantization.collect import ActivationStats, activation_qparams

        stats = self.stats(cfg)
        view = ActivationStats(
            observers={
                n: fan.subs[cfg.scheme.observer_for(n, stats.site_kinds[n])]
                for n, fan in stats.observers.items()
            },
            site_kinds=stats.site_kinds,
        )
        return activation_qparams(view, cfg.scheme)

    def build(self, cfg: Config) -> dict:
        """Build ``cfg`` (or reuse its build) and measure its accuracy; returns its facts."""
        import tvmq
        from tvmq.frontends import ImportedModel
        from tvmq.passes import static_int8_passes
        from tvmq.passes.analysis import float_compute_ops
        from tvmq.quantization.bias_correction import bias_corrections
        from tvmq.quantization.static import static_pipeline_params

        out = self.cache / cfg.name
        facts_path = out / "sweep.json"
        if facts_path.exists():
            facts = json.loads(facts_path.read_text())
            if facts.get("key") == cfg.key():
                return facts
        t = time.perf_counter()
        if cfg.public is not None:
            art = tvmq.compile(
                self.encoder, "host", output_dir=out, progress=False, tuning_logs=None,
                example_inputs=tuple(torch.from_numpy(a) for a in self.eval_inputs[0]),
                input_names=NAMES, quantize=cfg.public,
                calibration_data=calibration_batches(cfg.calib) if cfg.public == "int8" else None,
            )  # fmt: skip
            float_ops = list(art.manifest.notes.get("float_ops", []) or [])
            facts = {"key": cfg.key(), "float_ops": float_ops, **self.accuracy(out)}
            facts_path.write_text(json.dumps(facts, indent=1))
            _log(f"built {cfg.name}: {time.perf_counter() - t:.0f} s")
            return facts
        qparams = self.qparams(cfg)
        prepared = self.module(cfg)
        # the parameters tvmq.quantization.quantize builds (dynamic sites left to QuantizeDynamic)
        params = static_pipeline_params(prepared, cfg.scheme, qparams)
        if cfg.bias_correction:
            params["bias_corrections"] = bias_corrections(
                prepared, calibration_batches(cfg.calib), cfg.scheme,
                params["activation_qparams"], inputs=self.imported.inputs,
            )  # fmt: skip
        quantized = static_int8_passes(**params)(prepared)
        float_ops = float_compute_ops(quantized["main"])
        model = ImportedModel(
            quantized, self.imported.inputs, self.imported.outputs, self.imported.source
        )
        tvmq.compile(model, "host", output_dir=out, progress=False, tuning_logs=None)
        facts = {"key": cfg.key(), "float_ops": float_ops, **self.accuracy(out)}
        facts_path.write_text(json.dumps(facts, indent=1))
        _log(f"built {cfg.name}: {time.perf_counter() - t:.0f} s")
        return facts

    def accuracy(self, path: Path) -> dict:
        import tvmq

        m = tvmq.load(path)
        cos = []
        for x, ref in zip(self.eval_inputs, self.reference, strict=True):
            y = np.asarray(m(*x)).ravel()
            cos.append(float(y @ ref / (np.linalg.norm(y) * np.linalg.norm(ref))))
        return {"min_cos": min(cos), "mean_cos": statistics.fmean(cos), "cos": cos}


def _log(msg: str) -> None:
    print(f"[sweep] {msg}", file=sys.stderr, flush=True)


def latencies(paths: dict[str, Path], repeat: int, rounds: int = 5) -> dict[str, float]:
    """Per model, the median over ``rounds`` round-robin rounds of the median ms of
    ``repeat / rounds`` runs."""
    import tvmq

    models = {name: tvmq.load(p) for name, p in paths.items()}
    inputs = bp._tokenize(bp.SENTENCES[:1])
    per = max(1, -(-repeat // rounds))
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            times[name].append(m.benchmark(list(inputs), warmup=1, repeat=per).median_ms)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("build/minilm-static-sweep"))
    ap.add_argument("--configs", help="comma-separated configuration names (default: all)")
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per configuration")
    ap.add_argument("--no-time", action="store_true", help="accuracy only")
    ap.add_argument("--list", action="store_true", help="list the configurations and exit")
    args = ap.parse_args(argv)
    todo = configs()
    if args.list:
        for c in todo:
            print(f"{c.name:28s} {c.note}")
        return
    if args.configs:
        wanted = args.configs.split(",")
        unknown = set(wanted) - {c.name for c in todo}
        if unknown:
            raise SystemExit(f"unknown configurations: {', '.join(sorted(unknown))}")
        todo = [c for c in todo if c.name in wanted]
    t0 = time.perf_counter()
    wb = Workbench(args.cache)
    facts = {c.name: wb.build(c) for c in todo}
    lat = {} if args.no_time else latencies({c.name: wb.cache / c.name for c in todo}, args.repeat)
    print(
        f"all-MiniLM-L6-v2, seq {bp.SEQ}, batch 1: cosine of int8 to PyTorch fp32 embeddings over "
        f"{len(bp.SENTENCES)} bench_peers sentences; latency median of {args.repeat} runs, "
        f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}, untuned builds"
    )
    head = f"{'config':28s} {'calib':7s} {'min cos':>8s} {'mean cos':>9s} {'ms':>7s} {'float ops':>9s}  note"
    print(head)
    print("-" * len(head))
    for c in todo:
        f = facts[c.name]
        ms = f"{lat[c.name]:7.2f}" if c.name in lat else f"{'-':>7s}"
        calib = c.calib if c.public != "int8-dynamic" else "-"
        print(
            f"{c.name:28s} {calib:7s} {f['min_cos']:8.4f} {f['mean_cos']:9.4f} {ms} "
            f"{len(f['float_ops']):9d}  {c.note}"
        )
    _log(f"total {time.perf_counter() - t0:.0f} s")
