"""The HTML page of ``tvmq report``: one file, plots embedded as PNG, no external resource.

Plots are drawn with matplotlib's object API (``matplotlib.figure.Figure``, no pyplot:
nothing global, no GUI backend).
"""

from __future__ import annotations

import base64
import html
import io
import json

from tvmq.profiling import DISPATCH_ROW

__all__ = ["render_html"]

_COLORS = {"weight": "#4c72b0", "activation": "#dd8452", "output": "#55a868"}
_LOW_SQNR_DB = 20.0  # below this a layer (or output) has visibly lost signal
_MAX_KERNEL_BARS = 25

_CSS = """
body{font-family:"DejaVu Sans",Arial,Helvetica,sans-serif;margin:0;background:#f4f5f7;color:#222}
main{max-width:1040px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:24px;margin:8px 0 2px}h2{font-size:18px;margin:0 0 10px}
.sub{color:#666;font-size:13px;margin-bottom:16px;word-break:break-all}
section{background:#fff;border:1px solid #dde;border-radius:8px;padding:16px 20px;margin:14px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{background:#fff;border:1px solid #dde;border-radius:8px;padding:10px 14px;min-width:110px;flex:1 1 0}
.card b{display:block;font-size:20px;margin:2px 0}.card span{color:#666;font-size:12px;white-space:nowrap}
table{border-collapse:collapse;font-size:13px;margin-top:8px;width:100%}
th,td{border-bottom:1px solid #eee;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#fafafa}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.float td{color:#b03030}
img{max-width:100%;height:auto;display:block;margin:6px 0}
#applied td:first-child{white-space:nowrap}.note{color:#666;font-size:12px;margin:6px 0}.bad{color:#b03030;font-weight:bold}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px;font-size:12px}
"""


def render_html(data: dict, generator: str) -> str:
    """The whole page for :func:`tvmq.report.collect`'s data."""
    build = data["build"]
    title = f"tvmq report: {build['path'].rstrip('/').rsplit('/', 1)[-1]}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        generator,
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="sub">{_e(build["path"])} · {_e(build["source"])} model compiled '
        f"{_e(build.get('created', ''))} for <b>{_e(build['target'])}</b> "
        f"({_e(json.dumps(build.get('tvm_target')))}) with tvmq "
        f"{_e(build['versions'].get('tvmq', '?'))}, TVM {_e(build['versions'].get('tvm', '?'))}"
        "</div>",
        _cards(data),
        _quantization_section(data),
        _kernel_section(data),
        _size_section(data),
        _applied_section(data),
        _accuracy_section(data),
        f'<p class="note">Written by tvmq report {_e(data["created"])}; the same data is in '
        "the .json and .csv files beside this page.</p>",
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _e(text) -> str:
    return html.escape(str(text))


def _db(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def _bytes(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def _time(s: float) -> str:
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def _cards(data: dict) -> str:
    q, k, acc = data.get("quantization"), data.get("kernels") or {}, data.get("accuracy")
    size = data["size"]
    cards = [("library", _bytes(size["library_bytes"]), "model.so")]
    weights = {p: n for p, n in size["library"].items() if p.startswith("weights")}
    if weights:
        dtypes = sorted(weights, key=weights.get, reverse=True)
        cards.append(("weights", _bytes(sum(weights.values())), dtypes[0].split()[-1] + " mostly"))
    if "total_seconds" in k:
        cards.append(("one call", _time(k["total_seconds"]), f"on {k['device']}"))
    scheme = q["scheme"] if q else "none"
    layers = q["layers"] if q else []
    n_q = sum(bool(r["quantized"]) for r in layers)
    cards.append(("quantization", scheme, f"{n_q} of {len(layers)} layers" if q else "float"))
    if q and q.get("output_sqnr_db"):
        sqnr = " / ".join(f"{_db(v)} dB" for v in q["output_sqnr_db"])
        cards.append(("output SQNR", sqnr, "vs the float model"))
    if acc and "accuracy" in acc:
        sub = f"float {100 * acc['float_accuracy']:.2f}%" if "float_accuracy" in acc else ""
        cards.append(("accuracy", f"{100 * acc['accuracy']:.2f}%", sub))
    items = "".join(
        f'<div class="card"><span>{_e(a)}</span><b>{_e(b)}</b><span>{_e(c)}</span></div>'
        for a, b, c in cards
    )
    return f'<div class="cards">{items}</div>'


# --------------------------------------------------------------------------------------
# Sections


def _quantization_section(data: dict) -> str:
    q = data.get("quantization")
    if not q:
        return '<section id="sqnr"><h2>Quantization</h2><p>Not quantized: every layer computes in float.</p></section>'
    layers = q["layers"]
    rows = "".join(
        f'<tr class="{"" if r["quantized"] else "float"}"><td>{_e(r["name"])}</td>'
        f"<td>{_e(r['op'])}</td><td>{'int8' if r['quantized'] and not r.get('weight_dtype') else _e(r.get('weight_dtype') or 'float')}</td>"
        f'<td class="n">{_db(r["weight_sqnr_db"])}</td><td class="n">{_db(r["activation_sqnr_db"])}</td>'
        f'<td class="n">{_db(r["output_sqnr_db"])}</td><td>{_e(r["reason"] or "")}</td></tr>'
        for r in layers
    )
    outs = q.get("output_sqnr_db")
    out_line = ""
    if outs:
        low = any(v is not None and v < _LOW_SQNR_DB for v in outs)
        out_line = (
            f"<p{' class=bad' if low else ''}>Model output SQNR against the float model on the "
            f"first calibration batch: {', '.join(_db(v) + ' dB' for v in outs)}</p>"
        )
    n_float = sum(not r["quantized"] for r in layers)
    return (
        '<section id="sqnr"><h2>Quantization: per-layer SQNR</h2>'
        f"<p>Scheme <code>{_e(q['scheme'])}</code>: {len(layers) - n_float} of {len(layers)} layers "
        f"quantized, {n_float} in float; calibrated on {_e(q.get('calibration_batches'))} batch(es). "
        "Higher is better (each 6 dB is one bit of precision kept).</p>"
        + (_img(_sqnr_figure(layers)) if layers else "")
        + out_line
        + "<table><tr><th>layer</th><th>op</th><th>weights</th><th class=n>weight SQNR (dB)</th>"
        "<th class=n>activation SQNR (dB)</th><th class=n>output SQNR (dB)</th><th>why float</th></tr>"
        + rows
        + "</table></section>"
    )


def _kernel_section(data: dict) -> str:
    k = data.get("kernels") or {}
    if "rows" not in k:
        return (
            '<section id="kernels"><h2>Kernel time</h2>'
            f"<p>Not profiled ({_e(k.get('skipped', 'no data'))}).</p></section>"
        )
    rows = "".join(
        f"<tr><td>{_e(r['name'])}</td><td>{_e(r['schedule'])}</td><td class=n>{r['calls'] or ''}</td>"
        f"<td class=n>{_time(r['seconds'])}</td><td class=n>{r['percent']:.1f}%</td></tr>"
        for r in k["rows"]
    )
    return (
        '<section id="kernels"><h2>Kernel time</h2>'
        f"<p>One call takes {_time(k['total_seconds'])} on {_e(k['device'])} (median of "
        f"{k['repeat']}). "
        + (
            "Each kernel call is timed where it runs, in the model's sequence; "
            if k.get("in_sequence")
            else "Each kernel is timed alone on the tensors of a real call; "
        )
        + f"<i>{_e(DISPATCH_ROW)}</i> is the rest of the call.</p>"
        + _img(_kernel_figure(k["rows"]))
        + "<table><tr><th>kernel</th><th>schedule</th><th class=n>calls</th>"
        "<th class=n>time in one model call</th><th class=n>share</th></tr>"
        + rows
        + "</table></section>"
    )


def _size_section(data: dict) -> str:
    size = data["size"]
    rows = "".join(
        f"<tr><td>{_e(p)}</td><td class=n>{_bytes(n)}</td><td class=n>{n:,}</td></tr>"
        for p, n in size["library"].items()
    )
    runtime = "".join(
        f"<tr><td>{_e(name)}</td><td class=n>{_bytes(n)}</td><td class=n>{n:,}</td></tr>"
        for name, n in size["runtime"].items()
    )
    note = (
        ""
        if size["weights_recorded"]
        else '<p class="note">This build predates the record of its weights: they are counted in "other".</p>'
    )
    return (
        '<section id="size"><h2>Size</h2>'
        f"<p>The library is {_bytes(size['library_bytes'])}: weights (the constants the "
        "executable embeds, by dtype), machine code, and the rest (VM program, symbol "
        "tables, headers).</p>" + _img(_size_figure(size["library"])) + note
        + "<table><tr><th>library part</th><th class=n>size</th><th class=n>bytes</th></tr>" + rows
        + "</table><p>The TVM runtime a board needs besides (shared by all models; this "
        "machine's copies):</p><table><tr><th>file</th><th class=n>size</th><th class=n>bytes</th></tr>"
        + runtime + "</table></section>"
    )  # fmt: skip


def _applied_section(data: dict) -> str:
    items = []
    for name, value in (data.get("compression") or {}).items():
        items.append(f"<tr><td>{_e(name)}</td><td><code>{_e(json.dumps(value))}</code></td></tr>")
    q = data.get("quantization")
    if q:
        params = {k: v for k, v in q["scheme_params"].items() if k != "scheme"}
        items.append(
            f"<tr><td>quantize ({_e(q['scheme'])})</td><td><code>{_e(json.dumps(params))}</code></td></tr>"
        )
    notes = data.get("compression_notes")
    if notes and "before" in notes and "after" in notes:
        b, a = notes["before"], notes["after"]
        items.append(
            f"<tr><td>effect</td><td>parameters {b.get('params')} → {a.get('params')}, constant bytes "
            f"{b.get('constant_bytes')} → {a.get('constant_bytes')}</td></tr>"
        )
    tuning = data.get("tuning") or {}
    for how in ("tuned", "prescheduled", "default"):
        names = tuning.get(how) or []
        items.append(
            f"<tr><td>kernels {how} ({len(names)})</td><td>{_e(', '.join(names) or '–')}</td></tr>"
        )
    logs = tuning.get("tuning_logs") or []
    items.append(f"<tr><td>tuning records read</td><td>{_e(', '.join(logs) or 'none')}</td></tr>")
    return (
        '<section id="applied"><h2>Compression and tuning applied</h2>'
        f"<table>{''.join(items)}</table></section>"
    )


def _accuracy_section(data: dict) -> str:
    acc = data.get("accuracy")
    if not acc:
        return (
            '<section id="accuracy"><h2>Accuracy</h2><p>Not measured: run '
            "<code>tvmq report BUILD --eval data.npz</code> with the inputs, "
            "<code>labels</code> and/or the float model's outputs "
            "<code>ref_&lt;output name&gt;</code>.</p></section>"
        )
    rows = []
    if "accuracy" in acc:
        line = f"top-1 accuracy {100 * acc['accuracy']:.2f}%"
        if "float_accuracy" in acc:
            delta = 100 * (acc["accuracy"] - acc["float_accuracy"])
            line += f", float model {100 * acc['float_accuracy']:.2f}% ({delta:+.2f} points)"
        rows.append(f"<p>{line} on {acc['samples']} samples.</p>")
    if acc["outputs"]:
        rows.append(
            "<table><tr><th>output</th><th class=n>SQNR vs float (dB)</th><th class=n>max abs error</th>"
            "<th class=n>top-1 agreement</th></tr>"
        )
        for o in acc["outputs"]:
            agree = f"{100 * o['top1_agreement']:.2f}%" if "top1_agreement" in o else "–"
            rows.append(
                f"<tr><td>{_e(o['name'])}</td><td class=n>{_db(o['sqnr_db'])}</td>"
                f"<td class=n>{o['max_abs_error']:.4g}</td><td class=n>{agree}</td></tr>"
            )
        rows.append("</table>")
    return f'<section id="accuracy"><h2>Accuracy</h2>{"".join(rows)}</section>'


# --------------------------------------------------------------------------------------
# Figures


def _img(png: bytes) -> str:
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _figure(height_in: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, height_in), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _sqnr_figure(layers: list[dict]) -> bytes:
    import numpy as np

    n = len(layers)
    fig, ax = _figure(1.5 + 0.42 * n)
    y = np.arange(n)
    h = 0.26
    for i, kind in enumerate(("weight", "activation", "output")):
        vals = [r[f"{kind}_sqnr_db"] for r in layers]
        ys = [yy + (i - 1) * h for yy, v in zip(y, vals, strict=True) if v is not None]
        xs = [v for v in vals if v is not None]
        ax.barh(ys, xs, height=h, color=_COLORS[kind], label=f"{kind} SQNR")
    top = max([v for r in layers for k in _COLORS if (v := r[f"{k}_sqnr_db"]) is not None] + [40])
    for yy, r in zip(y, layers, strict=True):
        if not r["quantized"]:
            ax.axhspan(yy - 0.45, yy + 0.45, color="#f2d0d0", zorder=0)
            ax.text(top * 0.02, yy, f"float: {r['reason'] or 'kept in float'}", va="center",
                    fontsize=8, color="#8a1f1f")  # fmt: skip
    ax.axvline(_LOW_SQNR_DB, color="#b03030", linestyle="--", linewidth=1)
    ax.text(
        _LOW_SQNR_DB, -0.75, f" {_LOW_SQNR_DB:.0f} dB", color="#b03030", fontsize=8, va="center"
    )
    ax.set_yticks(y, [r["name"] + ("  (float)" if not r["quantized"] else "") for r in layers])
    for tick, r in zip(ax.get_yticklabels(), layers, strict=True):
        if not r["quantized"]:
            tick.set_color("#b03030")
    ax.set_ylim(n - 0.5, -1.0)
    ax.set_xlim(0, top * 1.12)
    ax.set_xlabel("SQNR (dB), higher is better")
    fig.legend(loc="outside upper center", fontsize=8, ncols=3, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _kernel_figure(rows: list[dict]) -> bytes:
    shown = rows[:_MAX_KERNEL_BARS]
    if len(rows) > len(shown):
        rest = rows[len(shown) :]
        shown = shown + [{
            "name": f"{len(rest)} other kernels", "seconds": sum(r["seconds"] for r in rest),
            "percent": sum(r["percent"] for r in rest), "schedule": "",
        }]  # fmt: skip
    n = len(shown)
    fig, ax = _figure(0.9 + 0.34 * n)
    us = [r["seconds"] * 1e6 for r in shown]
    colors = ["#999999" if r["name"] == DISPATCH_ROW else "#4c72b0" for r in shown]
    ax.barh(range(n), us, color=colors, height=0.7)
    peak = max(us) if us and max(us) > 0 else 1.0
    for i, r in enumerate(shown):
        ax.text(us[i] + peak * 0.01, i, f"{_time(r['seconds'])}  {r['percent']:.1f}%",
                va="center", fontsize=8)  # fmt: skip
    ax.set_yticks(range(n), [_short(r["name"]) for r in shown], fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, peak * 1.28)
    ax.set_xlabel("µs per call of the model")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _size_figure(parts: dict[str, int]) -> bytes:
    fig, ax = _figure(1.8)
    palette = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#dd8452"]
    left = 0
    total = sum(parts.values()) or 1
    for i, (name, n) in enumerate(parts.items()):
        color = "#bbbbbb" if name == "other" else palette[i % len(palette)]
        ax.barh([0], [n], left=left, color=color, label=f"{name}: {_bytes(n)}", height=0.6)
        if n / total > 0.08:
            ax.text(left + n / 2, 0, f"{100 * n / total:.0f}%", ha="center", va="center",
                    color="white", fontsize=9, fontweight="bold")  # fmt: skip
        left += n
    ax.set_xlim(0, total)
    ax.set_yticks([])
    ax.set_xlabel("bytes of the library")
    fig.legend(loc="outside lower center", ncols=min(5, len(parts)), fontsize=8, frameon=False)
    return _png(fig)


def _short(name: str, width: int = 44) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"
