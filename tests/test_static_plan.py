"""The static call plan (tvmq/static_plan.py, tvmq/static_plan_record.py): a static CPU
model's calls make the VM's kernel calls themselves, on buffers allocated at load, and give
the VM's results bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tvmq
from tvmq.static_plan import PlanRunner


class _ConvTwoHeads(torch.nn.Module):
    """conv -> relu -> pool -> flatten (a reshape the VM runs as a view) -> linear, and a
    second output (a mean) read from the same pooled tensor."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(y.flatten(1)), y.mean(dim=(2, 3))


def _vm_outputs(m, arrays) -> list[np.ndarray]:
    """The same model's outputs through the Relax VM's main (the path without a plan)."""
    for buffer, a in zip(m._slots.arrays, arrays, strict=True):
        np.copyto(buffer, a)
    result = m._main(*m._slots.main_args)
    items = [result] if hasattr(result, "shape") else list(result)
    return [np.from_dlpack(r).copy() for r in items]


def _as_list(y) -> list[np.ndarray]:
    return list(y) if isinstance(y, tuple) else [y]


@pytest.mark.parametrize("kind", ["mlp-float", "mlp-int8", "mlp-clustered", "conv-two-outputs"])
def test_plan_calls_give_the_vms_bits(kind, tmp_path, small_mlp, rng):
    if kind == "conv-two-outputs":
        torch.manual_seed(0)
        model, shape, kwargs = _ConvTwoHeads().eval(), (1, 3, 8, 8), {}
    else:
        model, shape = small_mlp, (2, 32)
        kwargs = {}
        if kind == "mlp-int8":
            calib = rng.standard_normal((16, 32)).astype("float32")
            kwargs = dict(quantize="int8", calibration_data=calib)
        if kind == "mlp-clustered":  # weights stored as codes, decoded at load: main's params
            from tvmq.compression import ClusterConfig

            kwargs = dict(cluster=ClusterConfig(bits=4))
    out = tmp_path / "m"
    tvmq.compile(
        model, "host", example_inputs=torch.zeros(shape), output_dir=out, progress=False, **kwargs
    )
    m = tvmq.load(out)
    assert isinstance(m._plan, PlanRunner) and m._plan.native  # the library's runner calls
    plan = m.manifest.library["plan"]
    assert len(m._plan.steps) == len(plan["steps"]) >= 2
    if kind == "mlp-clustered":  # the decoded weights are main's parameters after the input
        assert {a for _, args in plan["steps"] for a in args} >= {"p0", "p1"}
    first = rng.standard_normal(shape).astype("float32")
    got_first = _as_list(m(first))
    with torch.no_grad():
        ref = [t.numpy() for t in _as_list(model(torch.from_numpy(first)))]
    for g, r in zip(got_first, ref, strict=True):
        if kind == "mlp-float" or kind == "conv-two-outputs":  # int8 / 4-bit: vs the VM below
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
    kept = [g.copy() for g in got_first]
    for seed in range(3):  # random inputs: the plan's buffers are refilled on every call
        x = np.random.default_rng(seed).standard_normal(shape).astype("float32")
        got = _as_list(m(x))
        for g, v in zip(got, _vm_outputs(m, [x]), strict=True):
            np.testing.assert_array_equal(g, v)
        got_kw = _as_list(m(**{m.inputs[0].name: x}))  # the general call path
        for g, v in zip(got_kw, got, strict=True):
            np.testing.assert_array_equal(g, v)
    for g, k in zip(got_first, kept, strict=True):  # the caller's arrays are its own
        np.testing.assert_array_equal(g, k)


def test_the_native_runner_and_python_make_the_same_calls(tmp_path, rng):
    """The library's native runner (RUNNER_FUNCTION) and the Python loop over the plan's
    steps (a library without the runner) give the same bits, each step's operands its own
    (a conv, pool, reshape and dense: operands of one to five tensors)."""
    torch.manual_seed(1)
    out = tmp_path / "m"
    tvmq.compile(
        _ConvTwoHeads().eval(), "host", example_inputs=torch.zeros(1, 3, 8, 8), output_dir=out
    )
    native = tvmq.load(out)
    x = rng.standard_normal((1, 3, 8, 8)).astype("float32")
    native_out = _as_list(native(x))
    plan = native._plan
    calls = []
    python = PlanRunner(
        native.manifest.library["plan"],
        native._lib,
        native._vm,
        list(native._slots.main_args),
    )
    python._native = None  # as for a library exported without the runner
    python.steps = tuple(
        (lambda *a, f=f: calls.append(1) or f(*a), args) for f, args in python.steps
    )
    for buffer in native._slots.arrays:
        buffer.fill(0)
    np.copyto(native._slots.arrays[0], x)
    python.run()
    assert len(calls) == len(plan.steps)
    for got, ref in zip([o.copy() for o in python.outputs], native_out, strict=True):
        np.testing.assert_array_equal(got, ref)
    for got, ref in zip(_as_list(native(x)), _vm_outputs(native, [x]), strict=True):
        np.testing.assert_array_equal(got, ref)
    # the timed runner: the same calls, each step's seconds read between them
    steps = plan.time_steps()
    assert steps.shape == (len(plan.steps),) and (steps >= 0).all() and steps.sum() > 0
    for got, ref in zip([o.copy() for o in plan.outputs], native_out, strict=True):
        np.testing.assert_array_equal(got, ref)


def test_a_library_exported_without_a_plan_has_no_runner(tmp_path):
    import tvm

    from tvmq.build import build, export_library
    from tvmq.frontends import import_model
    from tvmq.static_plan import RUNNER_FUNCTION, _library_function

    imported = import_model(torch.nn.Linear(4, 3).eval(), example_inputs=torch.zeros(2, 4))
    ex = build(imported.mod, "host")
    export_library(ex, tmp_path / "bare.so", "host")
    assert (
        _library_function(tvm.runtime.load_module(str(tmp_path / "bare.so")), RUNNER_FUNCTION)
        is None
    )


def test_outputs_that_are_an_input_or_one_tensor_twice_are_separate_copies(tmp_path, rng):
    class PassThrough(torch.nn.Module):
        def forward(self, x):
            y = x * 2.0
            return x, y, y

    out = tmp_path / "m"
    tvmq.compile(PassThrough(), "host", example_inputs=torch.zeros(2, 3), output_dir=out)
    m = tvmq.load(out)
    assert m._plan is not None and m.manifest.library["plan"]["outputs"][0] == "p0"
    x = rng.standard_normal((2, 3)).astype("float32")
    a, b, c = m(x)
    np.testing.assert_array_equal(a, x)
    assert not np.shares_memory(b, c) and not np.shares_memory(a, m._slots.arrays[0])
    m(rng.standard_normal((2, 3)).astype("float32"))
    np.testing.assert_array_equal(a, x)
    np.testing.assert_array_equal(c, 2 * x)


def test_an_edited_plan_runs_on_the_vm(compiled_mlp_dir, tmp_path, rng):
    """The kernels have no argument checks: a plan that is not the one compiled into the
    library (its digest differs) must not be made, whatever it says."""
    import shutil

    out = tmp_path / "m"
    shutil.copytree(compiled_mlp_dir, out)
    manifest = json.loads((out / "model.json").read_text())
    manifest["library"]["plan"]["steps"].reverse()  # the second layer first
    (out / "model.json").write_text(json.dumps(manifest))
    m = tvmq.load(out)
    assert m._plan is None
    x = rng.standard_normal((2, 32)).astype("float32")
    np.testing.assert_array_equal(m(x), tvmq.load(compiled_mlp_dir)(x))


def test_a_model_with_dynamic_shapes_has_no_plan(tmp_path, small_mlp, rng):
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(
        small_mlp, (torch.zeros(2, 32),), str(path), input_names=["x"],
        dynamic_axes={"x": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    out = tmp_path / "m"
    tvmq.compile(path, "host", output_dir=out, progress=False)
    m = tvmq.load(out)
    assert "plan" not in m.manifest.library and m._plan is None
    x = rng.standard_normal((5, 32)).astype("float32")
    with torch.no_grad():
        np.testing.assert_allclose(m(x), small_mlp(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_benchmark_times_the_plan(compiled_mlp_dir, monkeypatch):
    m = tvmq.load(compiled_mlp_dir)
    runs = []
    run = m._plan.run
    monkeypatch.setattr(m._plan, "run", lambda: runs.append(1) or run())
    stats = m.benchmark(warmup=3, repeat=7)
    assert len(runs) == 10 and stats.repeat == 7 and 0 < stats.min_ms <= stats.median_ms


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="Linux only")
def test_megabyte_storages_are_huge_page_aligned_and_give_the_vms_bits(tmp_path, rng):
    from tvmq.static_plan import HUGE_PAGE

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8)
    ).eval()
    out = tmp_path / "m"
    tvmq.compile(model, "host", example_inputs=torch.zeros(1024, 256), output_dir=out)
    m = tvmq.load(out)
    plan = m.manifest.library["plan"]
    big = [i for i, n in enumerate(plan["storage"]) if n >= HUGE_PAGE // 2]
    assert big, plan["storage"]  # the 1024 x 512 hidden layer: 2 MiB
    views = [(s, t) for s, t in zip(plan["tensors"], m._plan.tensors, strict=True)]
    for (source, _, _), tensor in views:
        if source[0] == "s" and int(source[1:]) in big:
            assert tensor.data_ptr() % HUGE_PAGE == 0
    x = rng.standard_normal((1024, 256)).astype("float32")
    np.testing.assert_array_equal(m(x), _vm_outputs(m, [x])[0])
    with torch.no_grad():
        np.testing.assert_allclose(m(x), model(torch.from_numpy(x)).numpy(), atol=1e-4)
