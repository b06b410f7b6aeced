"""Print the README's build table from a finished build folder (``make demo`` writes ``edgeforge-build``).

    .venv/bin/python benchmarks/build_table.py [edgeforge-build]

One row per stage with what it measured and how long it took; task scores with their 95% Wilson intervals on the
build's fixed task set, and each artifact's paired difference to its source model on the same examples. Reads
``build.json`` and ``ship/manifest.json``; computes nothing new.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def pct(x: Any) -> str:
    return "-" if x is None else f"{x:.1%}"


def acc(scores: dict[str, Any] | None) -> str:
    if not scores or scores.get("task_accuracy") is None:
        return "-"
    lo, hi = scores.get("task_accuracy_ci95") or (None, None)
    ci = f" ({lo:.1%}-{hi:.1%})" if lo is not None else ""
    return f"{scores['task_accuracy']:.1%}{ci}"


def finetune_result(f: dict[str, Any], adapter: bool) -> str:
    """A fine-tuning record's row: exact match (base, adapter, merged), valid JSON and general perplexity."""
    n = (f.get("after") or {}).get("n_examples")
    return (f"exact match on the {n} fixed held-out examples: base {acc(f.get('before'))}, "
            + (f"adapter {acc(f.get('after'))}, " if adapter else "") + f"merged {acc(f.get('merge'))}; valid JSON "
            f"{pct(f['before'].get('valid_json_rate'))} -> {pct(f['after'].get('valid_json_rate'))}; general "
            f"perplexity {f['before']['general_perplexity']:.2f} -> {f['after']['general_perplexity']:.2f}")


def main(folder: Path) -> None:
    build = json.loads((folder / "build.json").read_text(encoding="utf-8"))
    ship = folder / "ship"
    manifest = json.loads((ship / "manifest.json").read_text(encoding="utf-8"))
    records = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in (ship / "records").glob("*.json")}
    seconds = {s["name"]: s.get("seconds") for s in build["stages"]}
    plan = manifest["plan"]
    rows: list[tuple[str, str, float | None]] = [("plan", f"{plan['decision']}: {plan['reason']}", None)]
    t = records.get("finetune-teacher")
    if t:
        rows.append(("fine-tune the teacher", finetune_result(t, adapter=False), seconds.get("finetune-teacher")))
    d = records.get("distill")
    if d:
        ret = d.get("retention") or {}
        shape = plan.get("student") or {}
        rows.append(("distill", f"{shape.get('layers', '?')} layers, MLP {shape.get('intermediate_size', '?')}, "
                     f"{(shape.get('params') or 0) / 1e6:.0f}M params; KL to the "
                     f"teacher {d['before']['kl_to_teacher']:.3f} -> {d['after']['kl_to_teacher']:.3f}, "
                     f"held-out perplexity {d['before']['perplexity']:.2f} -> {d['after']['perplexity']:.2f} (teacher "
                     f"{d['teacher']['perplexity']:.2f}), top-1 {pct(d['before']['top1_agreement'])} -> "
                     f"{pct(d['after']['top1_agreement'])}, retention {ret.get('after', 0):.3f}"
                     + (f"; exact match {acc(manifest['quality'].get('student'))}" if t else ""),
                     seconds.get("distill")))
    f = records.get("finetune")
    if f:
        rows.append(("fine-tune", finetune_result(f, adapter=True), seconds.get("finetune")))
    arts = {a["file"]: a for a in build["artifacts"]}
    for path, v in manifest["quality"]["artifacts"].items():
        a = next((x for f, x in arts.items() if Path(f).name == path), {})
        task = v.get("task") or {}
        vs = task.get("versus_source") or {}
        prose = v.get("general_prose") or {}
        lo, hi = vs.get("difference_ci95") or (0.0, 0.0)
        rows.append((f"export {a.get('format')}", f"{a.get('quant')}, {a.get('size_bytes', 0) / 1e6:.1f} MB: on task "
                     f"text mean KL "
                     f"{v.get('mean_kl', 0):.4f}, top-1 {pct(v.get('top1_agreement'))} (general prose "
                     f"{prose.get('mean_kl', 0):.4f} / {pct(prose.get('top1_agreement'))}); exact match {acc(task)}, "
                     f"{vs.get('difference', 0):+.1%} ({lo:+.1%} to {hi:+.1%}) vs its source "
                     f"({vs.get('source', 'the merged model')}), McNemar p "
                     f"{vs.get('mcnemar_exact_p', 1):.2g}", seconds.get(f"export-{a.get('format')}")))
    speeds = [f"{a['format']} {a.get('measured_prefill_tokens_per_s') or 0:,.0f} prefill / "
              f"{a.get('measured_decode_tokens_per_s') or 0:,.0f} decode tokens/s" for a in build["artifacts"]
              if a.get("measured_decode_tokens_per_s")]
    if speeds:
        rows.append(("bench (this machine, 2 cores)", "; ".join(speeds), seconds.get("bench")))
    stage_s = sum(float(s.get("seconds") or 0) for s in build["stages"])
    print(f"Build of {manifest['name']}: {stage_s:.0f} s in its stages as they ran (this invocation "
          f"{build['seconds']:.0f} s end to end; cached stages report the run that made them).\n")
    print("| stage | result | seconds |\n|---|---|---:|")
    for stage, result, secs in rows:
        print(f"| {stage} | {result} | {'' if secs is None else f'{secs:.0f}'} |")
    kept = (build.get("teacher_or_student") or {}).get("kept")
    if kept:
        print(f"\n{kept}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "edgeforge-build"))
