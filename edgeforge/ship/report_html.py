"""report.html: one self-contained page about a build (no network: inline CSS, plots as inline SVG).

Plots are drawn with matplotlib ``Figure`` objects, not pyplot: they never open a window or touch the process-wide
backend (so importing this does not switch a user's notebook to Agg), and no global state leaks between builds. They
are saved as SVG with glyphs as paths, so the page looks the same without any font installed. The ``summary`` dict is
described in ``edgeforge.ship.folder``.
"""

from __future__ import annotations

import html
import io
import json
import re
from typing import Any

import matplotlib
from matplotlib.figure import Figure

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1b1b1b;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#555;margin-top:0}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1rem 0 2rem} figure svg{max-width:100%;height:auto} figcaption{color:#444;font-size:.9rem}
.note{color:#777;font-style:italic}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _num(x: Any, spec: str = "{:,.2f}", missing: str = "n/a") -> str:
    return missing if x is None else spec.format(x)


def _rows(xs: Any) -> list[dict]:
    return [r for r in xs or [] if isinstance(r, dict)]


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) for the rows that have ``key``; a loss curve may log a metric only on some steps."""
    pts = [(r["step"], r[key]) for r in rows if r.get("step") is not None and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


# ---------------------------------------------------------------- SVG embedding
def _svg(fig: Figure, prefix: str) -> str:
    """The figure as an inline <svg> element whose ids are unique on the page.

    matplotlib names defs (glyphs, markers, clip paths) by content hash, and several SVGs in one HTML document share
    one id namespace, so each figure's ids get ``prefix``; the XML prolog, DOCTYPE and RDF metadata are dropped (they
    are for standalone files and carry URLs).
    """
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": prefix}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    s = buf.getvalue()
    s = s[s.index("<svg"):]
    s = re.sub(r"<metadata>.*?</metadata>\s*", "", s, flags=re.S)
    s = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', s)
    s = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', s)
    s = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", s)
    return s


def _figure(fig_id: str, caption: str, fig: Figure | None, missing: str) -> str:
    if fig is None:
        return f'<p class="note" id="{fig_id}-missing">{_e(missing)}</p>'
    return f'<figure id="{fig_id}">{_svg(fig, fig_id)}<figcaption>{_e(caption)}</figcaption></figure>'


# ---------------------------------------------------------------- plots
def _training_fig(summary: dict) -> Figure | None:
    d = summary.get("distill") or {}
    f = summary.get("finetune") or {}
    panels = []
    dcurve = _rows(d.get("loss_curve"))
    if any(_series(dcurve, k)[0] for k in ("loss", "kl")):
        panels.append(("distillation", dcurve, [("loss", "loss"), ("kl", "KL to teacher")], "loss"))
    fcurve = _rows(f.get("loss_curve"))
    if any(_series(fcurve, k)[0] for k in ("loss", "ce")):
        panels.append(("fine-tuning", fcurve, [("loss", "loss"), ("ce", "answer cross-entropy")], "loss"))
    acc = _rows(f.get("accuracy_by_step"))
    if _series(acc, "task_accuracy")[0]:
        panels.append(("task accuracy", acc, [("task_accuracy", "held-out task accuracy")], "accuracy"))
    if not panels:
        return None
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    for ax, (title, rows, keys, ylabel) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for key, label in keys:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if ylabel == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _decode_measured(a: dict) -> float | None:
    """The best measured decode speed of an artifact over its targets (None when never measured)."""
    v = [b["decode_tokens_per_s"] for b in _rows(a.get("bench")) if b.get("decode_tokens_per_s") is not None]
    return max(v) if v else None


def _tradeoff_fig(summary: dict) -> Figure | None:
    arts = [a for a in _rows(summary.get("artifacts")) if a.get("size_bytes")]
    # Task accuracy is what the user cares about when it exists for every artifact; otherwise the mean KL to the
    # artifact's source, which every verified artifact has.
    use_acc = bool(arts) and all(a.get("task_accuracy") is not None for a in arts)
    pts = []
    for a in arts:
        y = a.get("task_accuracy") if use_acc else (a.get("verify") or {}).get("mean_kl")
        if y is not None:
            pts.append((str(a.get("path")), a["size_bytes"] / 1e6, y, _decode_measured(a), "C0"))
    if not pts:
        return None
    t = summary.get("teacher") or {}
    # The teacher is its own reference (KL 0 by definition); its accuracy is shown only when it was measured.
    t_y = t.get("task_accuracy") if use_acc else 0.0
    if t.get("size_bytes") and t_y is not None:
        pts.append((f"teacher {t.get('name') or ''}".strip(), t["size_bytes"] / 1e6, t_y, None, "C3"))
    speeds = [p[3] for p in pts if p[3]]
    top = max(speeds) if speeds else 1.0
    fig = Figure(figsize=(8, 4.6))
    ax = fig.subplots()
    for label, x, y, tps, color in pts:
        # Area grows with measured speed; unmeasured points keep a small fixed marker.
        size = 40 + 400 * (tps / top) if tps else 40
        ax.scatter([x], [y], s=size, color=color, alpha=0.7, edgecolors="black", linewidths=0.6)
        speed = f"{tps:,.1f} tok/s" if tps else "speed not measured"
        ax.annotate(f"{label}\n{speed}", (x, y), textcoords="offset points", xytext=(8, 6), fontsize=7.5)
    xs = [p[1] for p in pts]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("task accuracy" if use_acc else "mean KL to source (lower is better)")
    ax.set_title("size, quality and speed of each artifact (marker area: measured decode tokens/s)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.2)
    fig.tight_layout()
    return fig


def _short(artifact: str, keep: int = 22) -> str:
    """A tick label that does not run into its neighbours: the end of a long file name (where the type is)."""
    return artifact if len(artifact) <= keep else "..." + artifact[-keep:]


def _speed_fig(summary: dict) -> Figure | None:
    rows = [r for r in _rows(summary.get("speed"))
            if r.get("estimated_decode_tokens_per_s") is not None or r.get("measured_decode_tokens_per_s") is not None]
    if not rows:
        return None
    labels = [f"{r.get('profile', '?')}\n{_short(str(r.get('artifact', '?')))}" for r in rows]
    est = [r.get("estimated_decode_tokens_per_s") for r in rows]
    meas = [r.get("measured_decode_tokens_per_s") for r in rows]
    w = 0.38
    fig = Figure(figsize=(max(6.0, 1.6 * len(rows)), 4.2))
    ax = fig.subplots()
    xs = list(range(len(rows)))
    ax.bar([x - w / 2 for x in xs], [v or 0 for v in est], w, label="estimated", color="#8fb8de")
    ax.bar([x + w / 2 for x in xs], [v or 0 for v in meas], w, label="measured", color="#e07b39")
    for x, v in zip(xs, meas, strict=True):
        if v is None:  # an absent bar must not read as "0 tokens/s"
            ax.text(x + w / 2, 0, "not\nmeasured", ha="center", va="bottom", fontsize=7, color="#555")
    ax.set_xticks(xs, labels, fontsize=7.5)
    ax.set_ylabel("decode tokens/s")
    ax.set_title("decode speed: estimated vs measured")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _sustained_fig(summary: dict) -> Figure | None:
    """Decode tokens/s in each window of every sustained run (bench.sustained_s), one line per artifact and target."""
    runs = [(a, b) for a in _rows(summary.get("artifacts")) for b in _rows(a.get("bench"))
            if isinstance(b.get("sustained"), dict) and b["sustained"].get("windows")]
    if not runs:
        return None
    fig = Figure(figsize=(7.5, 3.8))
    ax = fig.subplots()
    for a, b in runs:
        windows = _rows(b["sustained"]["windows"])
        ax.plot([w.get("end_s") for w in windows], [w.get("tokens_per_s") for w in windows], marker="o",
                label=f"{_short(str(a.get('path', '?')))} on {b.get('target', '?')} "
                      f"(drop {_num(b['sustained'].get('drop_percent'), '{:.1f}')}%)")
    ax.set_xlabel("seconds of continuous decoding (end of each window)")
    ax.set_ylabel("decode tokens/s in the window")
    ax.set_title("sustained decode")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- tables
def _table(head: list[str] | None, rows: list[list[str]], numeric: tuple[int, ...] = ()) -> str:
    """Cells are escaped here; ``numeric`` column indexes are right-aligned; no header row when ``head`` is None."""
    h = "<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in head) + "</tr></thead>" if head else ""
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{_e(c)}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{h}<tbody>{body}</tbody></table>"


def _stages_table(summary: dict) -> str:
    rows = [[s.get("name", "?"), "cached" if s.get("cached") else "ran", _num(s.get("seconds"), "{:,.1f}"),
             s.get("cache_key") or "n/a"] for s in _rows(summary.get("stages"))]
    if not rows:
        return '<p class="note">No stages were recorded.</p>'
    return _table(["stage", "cached or ran", "seconds", "cache key"], rows, (2,))


def _per_target(a: dict, key: str) -> str:
    vals = [f"{_num(b.get(key), '{:,.1f}', 'not measured')} ({b.get('target', '?')})" for b in _rows(a.get("bench"))]
    return "; ".join(vals) or "not measured"


def _artifacts_table(summary: dict) -> str:
    rows = []
    for a in _rows(summary.get("artifacts")):
        v = a.get("verify") or {}
        passed = v.get("passed")
        rows.append([a.get("path", "?"), a.get("format", "?"), a.get("quant") or "n/a",
                     _num(None if a.get("size_bytes") is None else a["size_bytes"] / 1e6, "{:,.1f}"),
                     _num(v.get("mean_kl"), "{:.4f}"), _num(v.get("top1_agreement"), "{:.1%}"),
                     "not verified" if passed is None else ("passed" if passed else "FAILED"),
                     _task_cell(a.get("task")),
                     _per_target(a, "prefill_tokens_per_s"), _per_target(a, "decode_tokens_per_s")])
    if not rows:
        return '<p class="note">No artifacts were recorded.</p>'
    return _table(["file", "format", "quant", "size MB", "mean KL", "top-1", "verify",
                   "task exact match (95% CI; vs source, paired)",
                   "prefill tok/s (target)", "decode tok/s (target)"], rows, (3, 4, 5, 7))


def _task_cell(task: Any) -> str:
    """Exact match with its Wilson interval, and the paired difference to the source model on the same examples."""
    if not isinstance(task, dict) or task.get("task_accuracy") is None:
        return "n/a"
    lo, hi = task.get("task_accuracy_ci95") or (None, None)
    cell = f"{task['task_accuracy']:.1%}" + (f" ({lo:.1%}-{hi:.1%})" if lo is not None else "")
    vs = task.get("versus_source")
    if isinstance(vs, dict) and vs.get("difference") is not None:
        dlo, dhi = vs.get("difference_ci95") or (0.0, 0.0)
        cell += f"; {vs['difference']:+.1%} ({dlo:+.1%} to {dhi:+.1%}) vs source on {vs.get('n_examples')} examples"
    return cell


def _decision_html(summary: dict) -> list[str]:
    """The fine-tuned teacher beside the shipped student (edgeforge.ship.decision), when the build made one."""
    from edgeforge.ship.decision import HEADER, decision_rows, kept_share

    rows = decision_rows(summary)
    if not rows:
        return []
    share = kept_share(summary)
    return ["<h2>Fine-tuned teacher or distilled student</h2>", _table(HEADER, rows),
            *([f'<p class="note">{_e(share)}</p>'] if share else [])]


def _plan_html(summary: dict) -> str:
    p = summary.get("plan") or {}
    if not p:
        return '<p class="note">No plan was recorded.</p>'
    rows = [["decision", p.get("decision") or "n/a"], ["reason", p.get("reason") or "n/a"]]
    for key, label, spec in (("quant", "quant", "{}"), ("format", "format", "{}"), ("backend", "backend", "{}"),
                             ("fits", "fits", "{}"), ("estimated_decode_tokens_per_s", "estimated decode tok/s",
                                                      "{:,.1f}"), ("context_tokens", "context tokens", "{:,}")):
        if p.get(key) is not None:
            rows.append([label, spec.format(p[key])])
    return _table(None, rows)


def render_report(summary: dict) -> str:
    """One self-contained HTML page: header, plan, stages, artifacts, the three plots, lineage. All text escaped."""
    name = summary.get("name") or "edgeforge build"
    profile = (summary.get("profile") or {}).get("name") or "unknown profile"
    teacher = (summary.get("teacher") or {}).get("name") or "unknown teacher"
    figs = [
        ("plot-training", "Training curves: distillation loss and KL to the teacher, fine-tuning loss, and held-out "
         "task accuracy, by optimizer step.", _training_fig(summary), "No training curves: nothing was trained."),
        ("plot-tradeoff", "Every artifact (and the teacher) by size and quality; the marker area and the label give "
         "the measured decode speed.", _tradeoff_fig(summary), "No size/quality data for the trade-off plot."),
        ("plot-speed", "Decode speed on each profile or target: the planner's estimate beside the measurement.",
         _speed_fig(summary), "No speed estimates or measurements."),
    ]
    sustained = _sustained_fig(summary)
    if sustained is not None:  # only when asked for (bench.sustained_s): most builds do not run one
        figs.append(("plot-sustained", "Decode speed in each window of a sustained run, from the cold first window "
                     "on; the device's temperatures and clocks are in records/bench.json.", sustained, ""))
    lineage = summary.get("lineage")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(name)}: edgeforge report</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(name)}</h1>", f'<p class="sub">{_e(teacher)} for {_e(profile)}</p>',
        "<h2>Plan</h2>", _plan_html(summary),
        "<h2>Stages</h2>", _stages_table(summary),
        *_decision_html(summary),
        "<h2>Artifacts</h2>", _artifacts_table(summary),
        "<h2>Plots</h2>", *[_figure(i, c, f, m) for i, c, f, m in figs],
    ]
    if lineage:
        parts += ["<h2>Lineage</h2>", "<details><summary>teacher, data hashes, stage configs, library versions, seed"
                  "</summary>", f"<pre>{_e(json.dumps(lineage, indent=1, default=str))}</pre></details>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
