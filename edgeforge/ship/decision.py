"""What distillation cost and what it bought: the fine-tuned teacher beside the shipped student and its artifacts,
each with its task exact match on the build's fixed set (95% Wilson interval), its size, the planner's decode
estimate on the build's profile and whether it fits there. Shown by the model card and the report."""

from __future__ import annotations

from typing import Any

HEADER = ["model", "task exact match (95% CI)", "size MB", "est. decode tok/s on the profile", "fits the profile"]


def accuracy_text(scores: Any, with_n: bool = False) -> str:
    """``58.0% (52.3%-63.5%)``: an accuracy with its 95% interval (and ``, n=300`` with ``with_n``), or n/a."""
    if not isinstance(scores, dict) or scores.get("task_accuracy") is None:
        return "n/a"
    ci = scores.get("task_accuracy_ci95")
    tail = f" ({ci[0]:.1%}-{ci[1]:.1%})" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
    n = f", n={scores['n_examples']}" if with_n and scores.get("n_examples") else ""
    return f"{scores['task_accuracy']:.1%}{tail}{n}"


def _mb(n: Any) -> str:
    return f"{n / 1e6:.1f}" if isinstance(n, (int, float)) else "n/a"


def _speed(x: Any) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "n/a"


def decision_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Rows of HEADER: the fine-tuned teacher (at the plan's type for it), the distilled student (the plan's size
    and estimate for its shape) and every shipped artifact (its own size and estimate). Empty when the build
    fine-tuned no teacher: there is nothing to compare the student with."""
    t = summary.get("finetuned_teacher")
    if not isinstance(t, dict):
        return []
    plan = summary.get("plan") or {}
    student = plan.get("student") or {}
    budget_fits = {True: "yes", False: "no", None: "n/a"}
    rows = [[f"fine-tuned teacher ({t.get('name')}, {t.get('quant')})", accuracy_text(t.get("task"), with_n=True),
             _mb(t.get("weights_bytes")), _speed(t.get("estimated_decode_tokens_per_s")),
             budget_fits[t.get("fits")] + ("" if t.get("meets_latency_goal") in (None, True)
                                           else ", misses the latency goals")]]
    if summary.get("source_scores"):
        rows.append([f"distilled student ({student.get('layers', '?')} layers, torch)",
                     accuracy_text(summary["source_scores"], with_n=True),
                     _mb(student.get("weights_bytes")), _speed(student.get("estimated_decode_tokens_per_s")), "yes"])
    speeds = {r.get("artifact"): r.get("estimated_decode_tokens_per_s") for r in summary.get("speed") or []
              if r.get("profile") == (summary.get("profile") or {}).get("name")}
    for a in summary.get("artifacts") or []:
        name = str(a.get("path", "?")).rsplit("/", 1)[-1]
        rows.append([f"shipped {a.get('format')} {a.get('quant') or ''} ({name})".replace("  ", " "),
                     accuracy_text(a.get("task"), with_n=True), _mb(a.get("size_bytes")), _speed(speeds.get(name)),
                     "yes"])
    return rows


def kept_share(summary: dict[str, Any]) -> str | None:
    """"the shipped X keeps 81% of the fine-tuned teacher's exact match" for the first shipped GGUF (else the first
    artifact), or None without a fine-tuned teacher or scores."""
    t = summary.get("finetuned_teacher") or {}
    teacher_acc = (t.get("task") or {}).get("task_accuracy")
    arts = summary.get("artifacts") or []
    art = next((a for a in arts if a.get("format") == "gguf"), arts[0] if arts else None)
    acc = ((art or {}).get("task") or {}).get("task_accuracy")
    if not teacher_acc or acc is None:
        return None
    return (f"The shipped {art.get('format')} {art.get('quant')} keeps {acc / teacher_acc:.0%} of the fine-tuned "
            f"teacher's exact match ({acc:.1%} vs {teacher_acc:.1%} on the same examples).")
