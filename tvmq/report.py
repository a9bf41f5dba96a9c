"""``tvmq report``: one self-contained HTML page about a compiled model, plus its data as JSON/CSV.

:func:`collect` gathers, from a compiled folder, what a person wants to see before shipping it:

- per-layer SQNR (weight / activation / output) of the quantization, float layers marked
  (``model.json``'s ``compression["quantize"]``);
- per-kernel time of one call on this machine (:func:`tvmq.profiling.profile_kernels`);
- the size: weights by dtype (``notes["weights"]``), machine code and the rest of the
  library, and the TVM runtime a board needs besides (:mod:`tvmq.sizes`);
- the compression and tuning applied (``compression``, ``notes["kernels"]``);
- with evaluation data, accuracy against labels and the float model
  (:mod:`tvmq.report_eval`).

:func:`write_report` writes ``report.html`` (:mod:`tvmq.report_html`; plots embedded as PNG)
with ``report.json`` and ``report.csv`` beside it, by default into the build folder,
where ``model.json`` then lists them so the next build there replaces them.
"""

from __future__ import annotations

import csv
import io
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from tvmq.errors import TvmqError
from tvmq.manifest import Manifest, add_files
from tvmq.output import build_files

__all__ = ["FORMAT", "collect", "csv_rows", "write_report"]

FORMAT = "tvmq-report/1"
CSV_HEADER = ["section", "item", "metric", "value"]
GENERATOR = '<meta name="generator" content="tvmq report">'
DEFAULT_NAME = "report.html"
_LAYER_FIELDS = (
    "name", "op", "quantized", "reason", "weight_dtype", "activation_dtype",
    "weight_sqnr_db", "activation_sqnr_db", "output_sqnr_db",
)  # fmt: skip


def collect(
    build_dir: os.PathLike,
    *,
    eval_data=None,
    profile: bool = True,
    repeat: int = 10,
) -> dict:
    """The report's data for a compiled folder, JSON-ready (see the module docstring).

    ``profile=False`` (or a build for another machine) leaves out the kernel times;
    ``eval_data`` (a .npz path or a dict, see :mod:`tvmq.report_eval`) adds accuracy.
    """
    from tvmq.runtime import verified_library
    from tvmq.sizes import library_breakdown, runtime_files

    build_dir = Path(build_dir)
    manifest = Manifest.read(build_dir)
    lib_path = verified_library(build_dir, manifest)
    target = manifest.target
    weights = manifest.notes.get("weights")
    data = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "build": {
            "path": str(build_dir.resolve()),
            "source": manifest.source,
            "target": target.get("name"),
            "target_description": target.get("description", ""),
            "tvm_target": target.get("tvm_target"),
            "created": manifest.created,
            "versions": manifest.versions,
            "inputs": [s.to_json() for s in manifest.inputs],
            "outputs": [s.to_json() for s in manifest.outputs],
        },
        "quantization": _quantization(manifest.compression.get("quantize")),
        "kernels": None,
        "size": {
            "library_bytes": lib_path.stat().st_size,
            "library": library_breakdown(lib_path, weights),
            "weights_recorded": weights is not None,
            "runtime": runtime_files(target.get("kind", "llvm")),
        },
        "compression": {k: v for k, v in manifest.compression.items() if k != "quantize"},
        "compression_notes": manifest.notes.get("compression"),
        "tuning": manifest.notes.get("kernels"),
        "accuracy": None,
    }
    runnable = not target.get("cross_compiled")
    if eval_data is not None and not runnable:
        raise TvmqError(
            f"{build_dir} is compiled for {target.get('name')!r}, not this machine: "
            "--eval runs the model here"
        )
    if (profile or eval_data is not None) and runnable:
        from tvmq.runtime import CompiledModel

        model = CompiledModel(build_dir)
        if eval_data is not None:
            from tvmq.report_eval import evaluate

            data["accuracy"] = evaluate(model, eval_data)
        if profile:
            data["kernels"] = _kernels(model, manifest, repeat)
    if data["kernels"] is None:
        why = "not asked for" if runnable else f"compiled for {target.get('name')!r}"
        data["kernels"] = {"skipped": why}
    return data


def _quantization(q: dict | None) -> dict | None:
    if not q:
        return None
    scheme = q.get("scheme")
    name = scheme.get("scheme", "") if isinstance(scheme, dict) else str(scheme)
    return {
        "scheme": name,
        "scheme_params": scheme if isinstance(scheme, dict) else {},
        "layers": [{k: layer.get(k) for k in _LAYER_FIELDS} for layer in q.get("layers", [])],
        "output_sqnr_db": q.get("output_sqnr_db"),
        "float_ops": q.get("float_ops", []),
        "calibration_batches": q.get("num_calibration_batches"),
    }


def _kernels(model, manifest: Manifest, repeat: int) -> dict:
    from tvmq.profiling import DISPATCH_ROW, profile_kernels, times_in_sequence

    schedules = {}
    for how, names in (manifest.notes.get("kernels") or {}).items():
        if how != "tuning_logs":
            schedules.update(dict.fromkeys(names, how))
    in_sequence = times_in_sequence(model)  # else each kernel alone (the VM's calls)
    rows = profile_kernels(model, repeat=repeat, in_sequence=in_sequence)
    return {
        "device": str(model.device),
        "repeat": repeat,
        "in_sequence": in_sequence,
        "total_seconds": sum(r.seconds for r in rows),
        "rows": [
            {
                **r._asdict(),
                "schedule": "" if r.name == DISPATCH_ROW else schedules.get(r.name, "unknown"),
            }
            for r in rows
        ],
    }


def csv_rows(data: dict) -> list[list]:
    """The report as (section, item, metric, value) rows, header first; None is empty."""
    rows: list[list] = [CSV_HEADER]
    build = data["build"]
    for key in ("source", "target", "created"):
        rows.append(["build", key, "value", build.get(key)])
    q = data.get("quantization")
    if q:
        rows.append(["quantization", "scheme", "value", q["scheme"]])
        for layer in q["layers"]:
            for metric in _LAYER_FIELDS[2:]:
                rows.append(["layer", layer["name"], metric, layer.get(metric)])
        for spec, v in zip(build["outputs"], q.get("output_sqnr_db") or [], strict=False):
            rows.append(["model", spec["name"], "output_sqnr_db", v])
    kernels = data.get("kernels") or {}
    for r in kernels.get("rows", []):
        for metric in ("calls", "seconds", "percent", "schedule"):
            rows.append(["kernel", r["name"], metric, r[metric]])
    size = data["size"]
    rows.append(["size", "library", "bytes", size["library_bytes"]])
    for part, n in size["library"].items():
        rows.append(["size", part, "bytes", n])
    for name, n in size["runtime"].items():
        rows.append(["runtime", name, "bytes", n])
    for key, value in _flatten(data.get("compression") or {}):
        rows.append(["compression", key, "value", value])
    acc = data.get("accuracy")
    if acc:
        for metric in ("samples", "accuracy", "float_accuracy"):
            if metric in acc:
                rows.append(["accuracy", "labels", metric, acc[metric]])
        for out in acc["outputs"]:
            for metric in ("sqnr_db", "max_abs_error", "top1_agreement"):
                if metric in out:
                    rows.append(["accuracy", out["name"], metric, out[metric]])
    return [["" if v is None else v for v in row] for row in rows]


def _flatten(value, prefix: str = ""):
    """(dotted key, scalar) pairs of nested dicts and lists."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, json.dumps(value) if isinstance(value, list) else value


# --------------------------------------------------------------------------------------
# Writing


def _report_paths(build_dir: Path, output) -> list[Path]:
    html = Path(output) if output is not None else build_dir / DEFAULT_NAME
    if html.is_dir():
        raise TvmqError(f"{html}: is a directory; give a file name, e.g. {html / DEFAULT_NAME}")
    if html.suffix.lower() not in (".html", ".htm"):
        raise TvmqError(f"{html}: the report is HTML; give a name ending in .html")
    return [html, html.with_suffix(".json"), html.with_suffix(".csv")]


def _is_ours(path: Path) -> bool:
    """Whether an existing file is one tvmq report wrote (or listed in its folder's build)."""
    listed = build_files(path.parent) or []
    if path.name in listed:
        return True
    try:
        head = path.read_bytes()[:4096].decode("utf-8", "replace")
    except OSError:
        return False
    if path.suffix == ".csv":
        return head.splitlines()[:1] == [",".join(CSV_HEADER)]
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    return GENERATOR in head


def write_report(
    build_dir: os.PathLike,
    output: os.PathLike | None = None,
    *,
    eval_data=None,
    profile: bool = True,
    repeat: int = 10,
) -> Path:
    """Write ``report.html``, ``report.json`` and ``report.csv`` for a compiled folder.

    Parameters
    ----------
    build_dir : path
        The folder ``tvmq compile`` wrote.
    output : path, optional
        The HTML file (``.html``); the JSON and CSV go beside it under the same name.
        Default: ``build_dir/report.html``. In a build folder the files are listed in its
        ``model.json``. Only missing files and earlier reports are replaced.
    eval_data, profile, repeat
        As for :func:`collect`.

    Returns
    -------
    Path
        The HTML file.
    """
    from tvmq.output_file import check_output_file, write_file_atomically
    from tvmq.report_html import render_html

    build_dir = Path(build_dir)
    Manifest.read(build_dir)  # a folder that is no build fails before any check of -o
    paths = _report_paths(build_dir, output)
    for p in paths:  # before the long part: a file that is not ours fails fast
        check_output_file(p, replaceable=_is_ours, kind="tvmq report")
    data = collect(build_dir, eval_data=eval_data, profile=profile, repeat=repeat)
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(csv_rows(data))
    contents = [
        render_html(data, GENERATOR).encode(),
        (json.dumps(data, indent=2) + "\n").encode(),
        text.getvalue().encode(),
    ]
    for p, content in zip(paths, contents, strict=True):
        write_file_atomically(
            p, lambda f, c=content: f.write(c), replaceable=_is_ours, kind="tvmq report"
        )
    folder = paths[0].parent
    if build_files(folder) is not None:
        add_files(folder, [p.name for p in paths])
    return paths[0]
