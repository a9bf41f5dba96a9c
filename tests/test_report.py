"""``tvmq report``: the HTML page, its JSON/CSV twins, the kernel profile and --eval accuracy."""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import tvmq
from tvmq.cli import main
from tvmq.errors import TvmqError
from tvmq.profiling import DISPATCH_ROW, profile_kernels
from tvmq.report import write_report

SECTIONS = ("sqnr", "kernels", "size", "applied", "accuracy")


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory, small_mlp):
    """The small MLP in int8 (batch 2) with its second layer kept in float."""
    from tvmq.pipeline import scheme_for_target
    from tvmq.targets import get_target

    scheme = dataclasses.replace(scheme_for_target("int8", get_target("host")), skip=("matmul_1",))
    calib = np.random.default_rng(0).standard_normal((8, 32)).astype("float32")
    out = tmp_path_factory.mktemp("report") / "int8"
    tvmq.compile(
        small_mlp,
        "host",
        example_inputs=(torch.zeros(2, 32),),
        output_dir=out,
        quantize=scheme,
        calibration_data=calib,
        progress=False,
    )
    return out


class _Page(HTMLParser):
    """Tags, section ids and every URL-bearing attribute of a page."""

    def __init__(self):
        super().__init__()
        self.sections, self.urls, self.images, self.stack = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag not in ("meta", "img", "br", "link"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack.pop() == tag, f"</{tag}> closes another element"


def _read_csv(path) -> dict[tuple[str, str, str], str]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["section", "item", "metric", "value"]
    return {(s, i, m): v for s, i, m, v in rows[1:]}


def test_report_holds_the_manifest_values_and_is_self_contained(int8_build):
    html_path = write_report(int8_build, repeat=3)
    assert html_path == int8_build / "report.html"
    manifest = json.loads((int8_build / "model.json").read_text())
    # tvmq owns the three files now: the next build into the folder replaces them
    assert {"report.html", "report.json", "report.csv"} <= set(manifest["files"])

    page = html_path.read_text()
    parser = _Page()
    parser.feed(page)
    assert parser.stack == []  # every element closed
    assert [s for s in parser.sections] == list(SECTIONS)
    assert parser.images and all(u.startswith("data:image/png;base64,") for u in parser.urls)
    assert not re.search(r"https?://|//cdn|url\(", page)  # nothing fetched from anywhere

    data = json.loads((int8_build / "report.json").read_text())
    rows = _read_csv(int8_build / "report.csv")
    layers = manifest["compression"]["quantize"]["layers"]
    assert [r["name"] for r in data["quantization"]["layers"]] == ["matmul_0", "matmul_1"]
    for ref, got in zip(layers, data["quantization"]["layers"], strict=True):
        for key in ("weight_sqnr_db", "activation_sqnr_db", "output_sqnr_db", "quantized"):
            assert got[key] == ref[key]
            cell = rows[("layer", ref["name"], key)]
            if isinstance(ref[key], float):
                assert float(cell) == ref[key]
                assert f"{ref[key]:.1f}" in page  # the table shows it
            else:
                assert cell == ("" if ref[key] is None else str(ref[key]))
    # the float layer is marked as such, with the reason
    assert layers[1]["quantized"] is False and layers[1]["reason"]
    assert re.search(r'<tr class="float"><td>matmul_1</td>', page)
    assert layers[1]["reason"] in page
    out_sqnr = manifest["compression"]["quantize"]["output_sqnr_db"][0]
    assert float(rows[("model", "output0", "output_sqnr_db")]) == out_sqnr

    # size: the parts add up to the library; weights by dtype as the build recorded them
    size = data["size"]
    assert sum(size["library"].values()) == size["library_bytes"] == manifest["library"]["bytes"]
    for dtype, n in manifest["notes"]["weights"].items():
        assert size["library"][f"weights {dtype}"] == n
        assert int(rows[("size", f"weights {dtype}", "bytes")]) == n
    assert manifest["notes"]["weights"]["int8"] >= 32 * 16  # the quantized first layer
    assert manifest["notes"]["weights"]["float32"] >= 16 * 10  # the float second layer

    # kernels: those the build lists, each once per call, shares adding up to 100 %
    assert data["kernels"]["in_sequence"] is True  # the build has a static plan
    kernels = data["kernels"]["rows"]
    built = {
        k for how in ("tuned", "default", "prescheduled") for k in manifest["notes"]["kernels"][how]
    }
    assert {r["name"] for r in kernels} - {DISPATCH_ROW} <= built
    assert math.isclose(sum(r["percent"] for r in kernels), 100.0)
    for r in kernels:
        assert float(rows[("kernel", r["name"], "seconds")]) == r["seconds"]
        assert r["name"] == DISPATCH_ROW or r["schedule"] in ("tuned", "default", "prescheduled")


@pytest.mark.parametrize("in_sequence", [None, False])
def test_profile_kernels_times_each_kernel_of_a_real_call(int8_build, rng, in_sequence):
    """By default (the build has a static plan) each kernel call is timed in the model's
    sequence; ``in_sequence=False`` times each alone in a loop. Either way one row a kernel."""
    model = tvmq.load(int8_build)
    assert model._plan is not None
    x = rng.standard_normal((2, 32)).astype("float32")
    before = model(x)
    rows = profile_kernels(model, [x], repeat=3, in_sequence=in_sequence)
    assert rows == sorted(rows, key=lambda r: -r.seconds)
    names = [r.name for r in rows]
    assert DISPATCH_ROW in names and len(names) == len(set(names))
    manifest = model.manifest.notes["kernels"]
    dense = [n for n in names if n.startswith("tvmq_int8_dense_vnni_2x32x16")]
    assert len(dense) == 1 or manifest["prescheduled"] == []
    for name, calls, seconds, percent in rows:
        assert seconds >= 0 and 0 <= percent <= 100
        assert name == DISPATCH_ROW or (calls >= 1 and seconds > 0)
    # the rows add up to one call: within reach of the whole call timed on its own
    total = sum(r.seconds for r in rows)
    whole = model.benchmark([x], warmup=3, repeat=20).median_ms / 1e3
    assert 0.2 * whole < total < 5 * whole
    np.testing.assert_array_equal(model(x), before)  # profiling changed nothing
    with pytest.raises(TvmqError, match="repeat"):
        profile_kernels(model, repeat=0)


def test_profile_in_sequence_times_every_call_of_the_plan(int8_build, rng):
    """Each row holds as many calls as the plan makes of its kernel (a kernel called twice
    is one row of two calls), and the model's result is the same after the timed runs."""
    model = tvmq.load(int8_build)
    x = rng.standard_normal((2, 32)).astype("float32")
    before = model(x)
    rows = profile_kernels(model, [x], repeat=5)
    plan = model.manifest.library["plan"]
    want = collections.Counter(plan["kernels"][k] for k, _ in plan["steps"])
    got = {r.name: r.calls for r in rows if r.name != DISPATCH_ROW}
    assert got == dict(want)
    assert all(r.seconds > 0 for r in rows if r.name != DISPATCH_ROW)
    np.testing.assert_array_equal(model(x), before)


def test_profile_in_sequence_needs_a_plan(int8_build, tmp_path, rng):
    """A model that runs on the VM (here: a plan edited after the build, which the runtime
    refuses) is timed kernel by kernel alone by default, and refuses ``in_sequence=True``."""
    out = tmp_path / "m"
    shutil.copytree(int8_build, out)
    manifest = json.loads((out / "model.json").read_text())
    manifest["library"]["plan"]["steps"].reverse()
    (out / "model.json").write_text(json.dumps(manifest))
    model = tvmq.load(out)
    assert model._plan is None
    x = rng.standard_normal((2, 32)).astype("float32")
    names = {r.name for r in profile_kernels(model, [x], repeat=2)}
    assert DISPATCH_ROW in names and len(names) >= 2
    with pytest.raises(TvmqError, match="in_sequence needs the model's static call plan"):
        profile_kernels(model, [x], repeat=2, in_sequence=True)


def test_eval_accuracy_against_labels_and_float_outputs(int8_build, small_mlp, tmp_path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((10, 32)).astype("float32")  # 5 calls of the batch-2 model
    with torch.no_grad():
        ref = small_mlp(torch.from_numpy(x)).numpy()
    labels = rng.integers(0, 10, size=10)
    labels[:6] = ref[:6].argmax(1)  # the float model right on 6 of 10
    np.savez(tmp_path / "eval.npz", x=x, labels=labels, ref_output0=ref)
    out = tmp_path / "r" / "acc.html"
    out.parent.mkdir()
    write_report(int8_build, out, eval_data=tmp_path / "eval.npz", profile=False)
    acc = json.loads(out.with_suffix(".json").read_text())["accuracy"]

    model = tvmq.load(int8_build)
    got = np.concatenate([model(x[i : i + 2]) for i in range(0, 10, 2)])
    assert acc["samples"] == 10
    assert acc["accuracy"] == float(np.mean(got.argmax(1) == labels))
    assert acc["float_accuracy"] == float(np.mean(ref.argmax(1) == labels))
    (o,) = acc["outputs"]
    noise = np.linalg.norm(ref - got)
    assert math.isclose(o["sqnr_db"], 20 * math.log10(np.linalg.norm(ref) / noise), rel_tol=1e-6)
    assert o["sqnr_db"] > 20
    assert o["top1_agreement"] == float(np.mean(got.argmax(1) == ref.argmax(1)))
    assert math.isclose(o["max_abs_error"], float(np.abs(ref - got).max()), rel_tol=1e-6)
    page = out.read_text()
    assert f"{100 * acc['accuracy']:.2f}%" in page
    # written outside a build folder: model.json is untouched
    assert "acc.html" not in (int8_build / "model.json").read_text()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 32), "float32")}, "give 'labels'"),
        ({"x": np.zeros((4, 32), "float32"), "label": np.zeros(4, int)}, "unknown key"),
        ({"x": np.zeros((3, 32), "float32"), "labels": np.zeros(3, int)}, "multiple of 2"),
        ({"x": np.zeros((4, 32), "float64"), "labels": np.zeros(4, int)}, "float64"),
        ({"x": np.zeros((4, 32), "float32"), "labels": np.zeros(5, int)}, "'labels' must"),
    ],
)
def test_bad_eval_data_is_one_clear_error(int8_build, tmp_path, capsys, arrays, message):
    np.savez(tmp_path / "e.npz", **arrays)
    out = tmp_path / "r.html"
    code = main(["report", str(int8_build), "-o", str(out), "--eval", str(tmp_path / "e.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tvmq: error: ") and message in err, err
    assert err.count("\n") == 1 and not out.exists()  # nothing half-written


def test_report_never_overwrites_a_users_file(int8_build, tmp_path, capsys):
    mine = tmp_path / "notes.html"
    mine.write_text("<p>my notes</p>")
    (tmp_path / "notes.csv").write_text("a,b\n")
    for argv, message in [
        (["-o", str(mine)], "notes.html: exists and is not a tvmq report"),
        (["-o", str(tmp_path / "r.txt")], "ending in .html"),
        (["-o", str(tmp_path)], "is a directory"),
    ]:
        code = main(["report", str(int8_build), "--no-profile", *argv])
        assert code == 2 and message in capsys.readouterr().err
    assert mine.read_text() == "<p>my notes</p>" and (tmp_path / "notes.csv").read_text() == "a,b\n"
    code = main(["report", str(tmp_path / "nowhere"), "--no-profile"])
    assert code == 2 and "no such directory" in capsys.readouterr().err
    # a report tvmq wrote is replaced
    assert main(["report", str(int8_build), "--no-profile", "-o", str(tmp_path / "r.html")]) == 0
    assert main(["report", str(int8_build), "--no-profile", "-o", str(tmp_path / "r.html")]) == 0


def test_compile_report_is_owned_by_the_build(capsys, tmp_path, small_mlp):
    ep = torch.export.export(small_mlp, (torch.zeros(2, 32),))
    torch.export.save(ep, tmp_path / "m.pt2")
    out = tmp_path / "build"
    code = main(["-q", "compile", str(tmp_path / "m.pt2"), "-o", str(out), "--report"])
    assert code == 0 and "report.html" in capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    assert data["quantization"] is None and data["kernels"]["rows"]
    assert data["size"]["library"]["weights float32"] == (32 * 16 + 16 + 16 * 10 + 10) * 4
    assert "Not quantized" in (out / "report.html").read_text()
    # a rebuild without --report takes its old report away with the old build
    assert main(["-q", "compile", str(tmp_path / "m.pt2"), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.so"]


def test_elf_sections_match_binutils(compiled_mlp_dir):
    from tvmq.sizes import elf_sections

    size = shutil.which("size")
    if size is None:
        pytest.skip("binutils' size is not installed")
    text = subprocess.run(
        [size, "-A", str(compiled_mlp_dir / "model.so")], capture_output=True, text=True
    ).stdout
    ref = {m[1]: int(m[2]) for m in re.finditer(r"^(\.\S+)\s+(\d+)\s+\d+$", text, re.M)}
    ours = {name: n for name, n, _ in elf_sections(compiled_mlp_dir / "model.so")}
    assert ref and {k: ours[k] for k in ref if k in ours} == {k: ref[k] for k in ref if k in ours}
    assert ".text" in ours and ".rodata" in ours


def test_report_renders_in_chromium(int8_build, tmp_path):
    """Looked at as a person would: headless Chromium renders the page to a non-blank PNG."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (Debian package chromium, see .ci/apt-packages.txt)")
    from PIL import Image

    page = write_report(int8_build, tmp_path / "page.html", repeat=2)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1100,2400", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (2400, 1100)
    background = (img == img[0, 0]).all(axis=2).mean()
    assert background < 0.9  # not a blank page
    # the plots were decoded and drawn: the bar colours of the SQNR and kernel charts
    for rgb in ((0x4C, 0x72, 0xB0), (0xDD, 0x84, 0x52), (0x99, 0x99, 0x99)):
        assert (np.abs(img - rgb).sum(axis=2) < 12).sum() > 500, rgb
