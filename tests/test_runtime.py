import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import tvmq
from tvmq.errors import InputMismatchError, TvmqError


def test_round_trip_matches_pytorch(compiled_mlp_dir, small_mlp, rng):
    m = tvmq.load(compiled_mlp_dir)
    x = rng.standard_normal((2, 32)).astype("float32")
    with torch.no_grad():
        ref = small_mlp(torch.from_numpy(x)).numpy()
    y = m(x)
    assert y.shape == (2, 10) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(m(x=x), y)  # by name too


def test_calls_reuse_input_buffers_but_return_arrays_of_their_own(compiled_mlp_dir, small_mlp, rng):
    """A call copies its input into a buffer the model keeps (no TVM tensor per call): any
    memory layout is taken, and a returned array (the tensor the VM allocated for that call,
    not a copy) is never changed by a later call."""
    m = tvmq.load(compiled_mlp_dir)
    xs = [rng.standard_normal((2, 32)).astype("float32") for _ in range(3)]
    with torch.no_grad():
        refs = [small_mlp(torch.from_numpy(x)).numpy() for x in xs]
    ys = [m(x) for x in xs]
    for y, ref in zip(ys, refs, strict=True):  # earlier results still hold their values
        np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
        assert y.flags.writeable
    assert not any(np.shares_memory(a, b) for i, a in enumerate(ys) for b in ys[:i])
    wide = np.zeros((2, 64), np.float32)
    wide[:, ::2] = xs[0]
    np.testing.assert_allclose(m(wide[:, ::2]), refs[0], atol=1e-5, rtol=1e-5)  # strided
    np.testing.assert_allclose(m(np.asfortranarray(xs[1])), refs[1], atol=1e-5, rtol=1e-5)


def test_calls_from_several_threads_get_their_own_results(compiled_mlp_dir, small_mlp, rng):
    m = tvmq.load(compiled_mlp_dir)
    xs = [rng.standard_normal((2, 32)).astype("float32") for _ in range(8)]
    with torch.no_grad():
        refs = [small_mlp(torch.from_numpy(x)).numpy() for x in xs]

    def run(i):
        return [m(xs[i]) for _ in range(50)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(len(xs))))
    for ys, ref in zip(results, refs, strict=True):
        for y in ys:
            np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)


def test_input_checks_name_the_problem(compiled_mlp_dir):
    m = tvmq.load(compiled_mlp_dir)
    with pytest.raises(
        InputMismatchError, match=r"input 'x': shape \(3, 32\).*compiled for \(2, 32\)"
    ):
        m(np.zeros((3, 32), np.float32))
    with pytest.raises(InputMismatchError, match="dtype float64, the model expects float32"):
        m(np.zeros((2, 32)))
    with pytest.raises(InputMismatchError, match=r"takes 1 input\(s\) \['x'\], got 2"):
        m(np.zeros((2, 32), np.float32), np.zeros((2, 32), np.float32))
    with pytest.raises(InputMismatchError, match="unknown"):
        m(y=np.zeros((2, 32), np.float32))


def test_benchmark_reports_ordered_stats(compiled_mlp_dir):
    stats = tvmq.load(compiled_mlp_dir).benchmark(warmup=2, repeat=20)
    assert stats.repeat == 20
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms


def test_damaged_library_is_detected(compiled_mlp_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(compiled_mlp_dir, copy)
    with open(copy / "model.so", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage")
    with pytest.raises(TvmqError, match="sha256 differs"):
        tvmq.load(copy)


def test_library_for_features_this_cpu_lacks_is_refused(compiled_mlp_dir, monkeypatch):
    """A library built for ISA features this CPU does not have (here: a CPU without AVX-512,
    as /proc/cpuinfo would say) is refused in one line instead of dying of SIGILL."""
    import tvmq.machine

    features = tvmq.load(compiled_mlp_dir).manifest.target["features"]
    if "avx512f" not in features:
        pytest.skip("the build uses no AVX-512 here")
    monkeypatch.setattr(tvmq.machine, "cpu_flags", lambda: frozenset({"sse2", "avx2", "fma"}))
    with pytest.raises(TvmqError, match=r"with avx512f, .*which this CPU does not have") as e:
        tvmq.load(compiled_mlp_dir)
    assert "\n" not in str(e.value)


def test_missing_cpu_features_asks_the_os_for_amx(monkeypatch):
    import tvmq.machine

    flags = frozenset({"avx512f", "avx512_vnni", "amx_tile", "amx_int8"})
    monkeypatch.setattr(tvmq.machine, "cpu_flags", lambda: flags)
    monkeypatch.setattr(tvmq.machine, "this_machine", lambda: "x86_64")
    monkeypatch.setattr(tvmq.machine, "amx_granted", lambda: False)
    assert tvmq.machine.missing_cpu_features(["avx512f", "amx-tile", "amx-int8"]) == [
        "amx-tile",
        "amx-int8",
    ]
    assert tvmq.machine.missing_cpu_features(["avx512f", "avx512vnni", "neon"]) == []
    monkeypatch.setattr(tvmq.machine, "amx_granted", lambda: True)
    assert tvmq.machine.missing_cpu_features(["amx-int8", "amx-bf16"]) == ["amx-bf16"]


def test_not_a_build_dir(tmp_path):
    with pytest.raises(TvmqError, match="no model.json"):
        tvmq.load(tmp_path)
    with pytest.raises(TvmqError, match="no such directory"):
        tvmq.load(tmp_path / "nope")
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(TvmqError, match="damaged manifest"):
        tvmq.load(tmp_path)


def test_manifest_records_what_it_is(compiled_mlp_dir):
    import hashlib

    d = json.loads((compiled_mlp_dir / "model.json").read_text())
    assert d["format"] == "tvmq-model/1"
    assert d["inputs"] == [{"name": "x", "shape": [2, 32], "dtype": "float32"}]
    assert d["outputs"] == [{"name": "output0", "shape": [2, 10], "dtype": "float32"}]
    assert d["target"]["name"] == "host"
    lib = (compiled_mlp_dir / "model.so").read_bytes()
    plan = d["library"].pop("plan")  # the kernel calls (tests/test_static_plan.py)
    assert len(plan["steps"]) == len(plan["kernels"]) == 2 and plan["outputs"] == ["t1"]
    assert d["library"] == {
        "file": "model.so",
        "bytes": len(lib),
        "sha256": hashlib.sha256(lib).hexdigest(),
        "fresh_outputs": True,  # the output is a kernel's: the VM allocates it per call
    }
    assert d["versions"]["tvmq"] == tvmq.__version__ and d["versions"]["tvm"]
    assert d["compression"] == {}


class _PassThrough(torch.nn.Module):
    """Returns its input and one result twice: outputs the VM does not allocate per call."""

    def forward(self, x):
        y = x * 2.0
        return x, y, y


def test_outputs_that_alias_an_input_or_each_other_are_copied(tmp_path, rng):
    out = tmp_path / "m"
    tvmq.compile(_PassThrough(), "host", example_inputs=torch.zeros(2, 3), output_dir=out)
    m = tvmq.load(out)
    assert m.manifest.library["fresh_outputs"] is False
    x = rng.standard_normal((2, 3)).astype("float32")
    a, b, c = m(x)
    np.testing.assert_array_equal(a, x)
    np.testing.assert_allclose(b, 2 * x)
    assert not np.shares_memory(b, c)  # one tensor twice in the model: two arrays here
    m(rng.standard_normal((2, 3)).astype("float32"))
    np.testing.assert_array_equal(a, x)  # the input buffer was refilled, not this array
    np.testing.assert_allclose(c, 2 * x)


def test_recompiling_into_the_same_directory_loads_the_new_model(tmp_path, rng):
    """dlopen caches by path: a second build into one directory must not run the first."""
    out = tmp_path / "m"
    x = rng.standard_normal((1, 8)).astype("float32")
    results = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = torch.nn.Linear(8, 3).eval()
        tvmq.compile(model, "host", example_inputs=torch.zeros(1, 8), output_dir=out)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        y = tvmq.load(out)(x)
        np.testing.assert_allclose(y, ref, atol=1e-5)
        results.append(y)
    assert not np.allclose(results[0], results[1])


def test_latency_stats_p90_interpolates_like_numpy_percentile():
    from tvmq.runtime import LatencyStats

    stats = LatencyStats.from_seconds([i / 1e3 for i in (10, 1, 9, 2, 8, 3, 7, 4, 6, 5)])
    assert stats.p90_ms == pytest.approx(9.1)  # 1..10 ms: linear between the 9th and 10th
    assert (stats.median_ms, stats.min_ms, stats.repeat) == (5.5, 1.0, 10)


def test_a_dropped_model_is_freed_at_once(compiled_mlp_dir, rng):
    """The fast one-input call must not hold the model in a reference cycle (its VM and
    weights would wait for the garbage collector)."""
    import gc
    import weakref

    m = tvmq.load(compiled_mlp_dir)
    m(rng.standard_normal((2, 32)).astype("float32"))
    ref = weakref.ref(m)
    gc.disable()
    try:
        del m
        assert ref() is None
    finally:
        gc.enable()


class _Embedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.type_embed = torch.nn.Embedding(2, 8)

    def forward(self, ids, types):
        return self.embed(ids) + self.type_embed(types)


def test_token_ids_outside_the_embedding_are_refused(tmp_path, rng):
    """An integer input that indexes an embedding carries the table's rows in the manifest
    (the smallest, where it indexes several); a value outside them is one clear error, not
    a read outside the table (the compiled lookup checks nothing)."""
    out = tmp_path / "m"
    ids, types = torch.tensor([[3, 7, 49, 0]]), torch.tensor([[0, 1, 1, 0]])
    model = _Embedding().eval()
    tvmq.compile(model, "host", example_inputs=(ids, types), output_dir=out, progress=False)
    m = tvmq.load(out)
    assert [s.index_bound for s in m.manifest.inputs] == [50, 2]
    assert json.loads((out / "model.json").read_text())["inputs"][0]["index_bound"] == 50
    with torch.no_grad():
        np.testing.assert_allclose(m(ids.numpy(), types.numpy()), model(ids, types).numpy())
    for bad, value in ((50, 50), (-1, -1)):
        wrong = ids.numpy().copy()
        wrong[0, 2] = bad
        with pytest.raises(InputMismatchError, match=rf"'ids': value {value} is outside 0..49"):
            m(wrong, types.numpy())
    with pytest.raises(InputMismatchError, match=r"'types': value 2 is outside 0..1"):
        m(ids.numpy(), types.numpy() + 1)
    assert m.benchmark(warmup=1, repeat=2).median_ms > 0  # its random inputs are in range
    manifest = json.loads((out / "model.json").read_text())
    manifest["inputs"][0]["index_bound"] = -3
    (out / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(TvmqError, match=r"inputs\[0\].index_bound' must be a positive integer"):
        tvmq.load(out)
