"""Fine-tune, distill, or both, and in which order? Each pipeline variant through the real `edgeforge build`, for the
Pi Zero 2 W plan of the bundled teacher and the home-commands task, scored on the same fixed held-out examples.

    flock /tmp/edgeforge-cpu.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/pipelines.py \\
        [--out /tmp/edgeforge-pipelines] [--variants a,b,c,d,e] [--scale 1.0]

Variants (pipeline settings in VARIANTS; each one a build of its own under OUT/<variant>, GGUF only, no bench):
  a  distill on general text (built-in prose + teacher answers), then LoRA on the student (the pre-#14 default)
  b  LoRA on the teacher first, merged; then distill that fine-tuned teacher into the student on the task's
     training examples plus 6,000 more generated from its training distribution (logit KD over whole sequences; the
     student pruned from the fine-tuned teacher): the build's default with a task since #14
  c  the pruned student (general-prose importance) LoRA-tuned on the task directly, no distillation
  d  as c, full fine-tuning instead of LoRA
  e  as the better of c / d, with the layers and channels chosen by importance on task data
  b2 as b with 150 LoRA and 75 distillation steps: about variant a's measured training seconds
  b3 as b, with the built-in general training prose added to the distillation data (``--data``): what general text
     buys back of b's general perplexity, and what it costs of the task
The teacher fine-tuned alone (variant b's first stage, the same LoRA settings) is the reference: "kept" is the
shipped GGUF's exact match over the fine-tuned teacher's, on the same examples. Budgets: step counts chosen so each
variant trains for about as long as variant a (their measured training seconds are in the table); --scale multiplies
every step count (0.5: a quicker, cheaper run). Each variant's build is cached under OUT/<variant>/.stages: running
the script again over the same --out reuses every finished stage and prints the same table.

What is measured, per variant, all on the build's fixed set (every held-out example, 300 for home-commands):
exact match of the exported source model (torch, greedy) and of the GGUF the build ships (llama.cpp; the build's own
KL + task gate and fallback chose its type), each with its 95% Wilson interval; the paired difference of the shipped
file to the fine-tuned teacher (Newcombe interval, McNemar p); general-text perplexity of the source model on the
built-in held-out prose (held out by content from every training text); training seconds (the training loops only)
and the build's wall seconds (evaluation and export included). One run of this script prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

PROFILE = "raspberry-pi-zero-2w"

# Step counts at --scale 1. Variant a is the pre-#14 default (distill 150 x 4 x 128 tokens, LoRA 200 x 8); the
# others are sized to about the same training seconds on 2 cores (a KD step with the teacher online costs about
# two LoRA steps of the student; a LoRA step of the teacher about 1.5).
VARIANTS: dict[str, dict[str, Any]] = {
    "a": {"order": "distill-then-finetune", "distill": {"steps": 150}, "finetune": {"steps": 200}},
    "b": {"order": "finetune-then-distill", "distill": {"steps": 150, "generated_task_examples": 6000},
          "finetune": {"steps": 200}},
    # b with fewer steps, to about a's measured training seconds (b trains ~40% longer: the teacher's LoRA steps
    # cost 1.8x the student's)
    "b2": {"order": "finetune-then-distill", "distill": {"steps": 75, "generated_task_examples": 6000},
           "finetune": {"steps": 150}},
    # b with general text beside the task data: the remedy the README offers for b's forgetting, measured
    "b3": {"order": "finetune-then-distill", "distill": {"steps": 150, "generated_task_examples": 6000},
           "finetune": {"steps": 200}, "general_data": True},
    "c": {"order": "distill-then-finetune", "distill": {"steps": 0}, "finetune": {"steps": 450}},
    "d": {"order": "distill-then-finetune", "distill": {"steps": 0},
          "finetune": {"steps": 400, "method": "full", "lr": 1e-4}},
    "e": {"order": "distill-then-finetune", "distill": {"steps": 0}, "task_importance": True},
}
DESCRIPTION = {
    "a": "distill (general text), then LoRA on the student",
    "b": "LoRA on the teacher, then distill it on task data",
    "b2": "as b, 150 LoRA + 75 distillation steps (a's training time)",
    "b3": "as b, general prose added to the distillation data",
    "c": "pruned student, LoRA on the task (no distillation)",
    "d": "pruned student, full fine-tuning on the task",
    "e": "as the better of c/d, pruned by task-data importance",
}


def scaled(section: dict[str, Any], scale: float) -> dict[str, Any]:
    out = dict(section)
    if out.get("steps"):
        out["steps"] = max(1, round(out["steps"] * scale))
    return out


def task_training_file(path: Path, seed: int) -> Path:
    """The task's training examples as chat JSONL (what variant e's pruning importance pass reads)."""
    from edgeforge.tasks import build_task

    rows, _ = build_task("home-commands", seed)
    path.write_text("".join(json.dumps({"messages": e["messages"]}) + "\n" for e in rows), encoding="utf-8")
    return path


def pipeline_for(name: str, out: Path, scale: float, chosen_method: dict[str, Any] | None) -> dict[str, Any]:
    v = VARIANTS[name]
    cfg: dict[str, Any] = {"order": v["order"], "task": "home-commands", "export": {"formats": ["gguf"]},
                           "bench": {"enabled": False}}
    cfg["distill"] = scaled({"enabled": True, **v.get("distill", {})}, scale)
    ft = v.get("finetune") or chosen_method or VARIANTS["c"]["finetune"]
    cfg["finetune"] = scaled({"enabled": True, **ft}, scale)
    if v.get("general_data"):  # the built-in training prose (held out by content from the evaluation prose)
        from edgeforge.data.builtin import training_prose

        general = out / f"{name}-general.txt"
        general.write_text(training_prose(), encoding="utf-8")
        cfg["data"] = [str(general)]
    if v.get("task_importance"):
        # the pruning importance pass reads the first distillation sequences: here, the task's training examples
        cfg["data"] = [str(task_training_file(out / f"{name}-task-data.jsonl", 0))]
    return cfg


def run_build(name: str, cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    cfg_path = out / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    build_dir = out / name
    cmd = [str(Path(sys.executable).with_name("edgeforge")), "build", "--config", str(cfg_path), "--profile", PROFILE,
           "--out", str(build_dir), "--no-bench"]
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w", encoding="utf-8") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {"name": name, "rc": rc, "wall_s": wall, "dir": build_dir}
    if rc != 0:
        tail = (out / f"{name}.log").read_text(encoding="utf-8").strip().splitlines()[-1:]
        result["error"] = tail[0] if tail else f"exit {rc}"
    return result


def training_seconds(build_dir: Path) -> float:
    total = 0.0
    for f in build_dir.glob(".stages/distill-*/student/distill.json"):
        total += float(json.loads(f.read_text())["training"]["seconds"])
    for f in build_dir.glob(".stages/finetune*/model/finetune.json"):
        total += float(json.loads(f.read_text())["train_seconds"])
    return total


def source_model_dir(build_dir: Path, order: str) -> Path | None:
    pattern = ".stages/distill-*/student" if order == "finetune-then-distill" else ".stages/finetune-*/model"
    found = [p for p in build_dir.glob(pattern) if "finetune-teacher" not in str(p)]
    return found[0] if len(found) == 1 else None


def general_perplexity_of(model_dir: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeforge.finetune.loss import general_perplexity

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return float(general_perplexity(model, tok))


def collect(res: dict[str, Any], order: str) -> dict[str, Any]:
    """The variant's scores: from the finished stage records in its build folder."""
    d = Path(res["dir"])
    row: dict[str, Any] = {**res, "train_s": training_seconds(d)}
    build_json = d / "build.json"
    if build_json.is_file():
        # each stage's own seconds as it ran (a stage served from the cache reports the run that made it), so a
        # rerun of this script over the same --out prints the same table in seconds
        row["wall_s"] = sum(float(s.get("seconds") or 0) for s in json.loads(build_json.read_text())["stages"])
    for f in sorted(d.glob(".stages/finetune-teacher-*/model/finetune.json")):
        rec = json.loads(f.read_text())
        row["teacher"] = {**rec["merge"], "general_perplexity": rec["after"]["general_perplexity"],
                          "train_s": rec["train_seconds"]}
    markers = sorted(d.glob(".stages/export-gguf-*/stage.json"), key=lambda p: p.stat().st_mtime)
    tried = [e for e in (json.loads(p.read_text())["result"] for p in markers) if e.get("task")]
    if tried:
        first = tried[0]["task"]["versus_source"]
        row["source_accuracy"], row["n"] = first["accuracy_b"], first["n_examples"]
    passed = [e for e in tried if e["verify"]["passed"]]
    row["tried"] = [(e["quant"], e["task"]["task_accuracy"], e["verify"]["passed"]) for e in tried]
    if passed:
        row["shipped"] = {"quant": passed[0]["quant"], "size_bytes": passed[0]["size_bytes"], **passed[0]["task"]}
    src = source_model_dir(d, order)
    if src is not None and (src / "config.json").is_file():
        row["general_perplexity"] = general_perplexity_of(src)
    return row


def fmt_acc(scores: dict[str, Any] | None) -> str:
    if not scores or scores.get("task_accuracy") is None:
        return "-"
    lo, hi = scores.get("task_accuracy_ci95") or (None, None)
    return f"{scores['task_accuracy']:.1%} ({lo:.1%}-{hi:.1%})" if lo is not None else f"{scores['task_accuracy']:.1%}"


def wilson(acc: float, n: int) -> dict[str, Any]:
    from edgeforge.tasks.metrics import wilson_interval

    k = round(acc * n)
    return {"task_accuracy": acc, "task_accuracy_ci95": list(wilson_interval(k, n))}


def print_table(rows: list[dict[str, Any]], teacher: dict[str, Any] | None, scale: float) -> None:
    from edgeforge.tasks.metrics import paired_comparison

    n = next((r["n"] for r in rows if r.get("n")), None)
    print(f"Pi Zero 2 W plan of the bundled teacher, task home-commands, {n} fixed held-out examples; step scale "
          f"{scale:g}; training seconds on this machine's {os.cpu_count()} cores.")
    print()
    print("| variant | source model exact match (95% CI) | shipped GGUF | shipped exact match (95% CI) | kept vs "
          "fine-tuned teacher | shipped - teacher (paired 95% CI, McNemar p) | general perplexity | training s | "
          "build s |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|")
    if teacher:
        print(f"| fine-tuned teacher (LoRA, merged; variant b's first stage) | {fmt_acc(teacher)} | | | 100% | | "
              f"{teacher['general_perplexity']:.2f} | {teacher['train_s']:.0f} | |")
    for r in rows:
        label = f"{r['name']}: {DESCRIPTION[r['name']]}"
        src = wilson(r["source_accuracy"], r["n"]) if r.get("source_accuracy") is not None else None
        s = r.get("shipped")
        if s:
            kept = f"{s['task_accuracy'] / teacher['task_accuracy']:.0%}" if teacher and teacher["task_accuracy"] \
                else "-"
            paired = "-"
            if teacher and teacher.get("correct") and s.get("correct") and len(s["correct"]) == len(teacher["correct"]):
                c = paired_comparison(s["correct"], teacher["correct"])
                lo, hi = c["difference_ci95"]
                paired = f"{c['difference']:+.1%} ({lo:+.1%} to {hi:+.1%}), p {c['mcnemar_exact_p']:.2g}"
            shipped = f"{s['quant']}, {s['size_bytes'] / 1e6:.1f} MB"
        else:
            kept, paired = "-", "-"
            shipped = "nothing passed: " + ", ".join(f"{q} {a:.1%}" for q, a, _ in r.get("tried", [])) \
                if r.get("tried") else f"failed: {r.get('error', '?')}"
        ppl = f"{r['general_perplexity']:.2f}" if r.get("general_perplexity") else "-"
        print(f"| {label} | {fmt_acc(src)} | {shipped} | {fmt_acc(s)} | {kept} | {paired} | {ppl} | "
              f"{r['train_s']:.0f} | {r['wall_s']:.0f} |")
    print()
    print("Goal (issue #14): the shipped GGUF keeps >= 80% of the fine-tuned teacher's exact match.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgeforge-pipelines"))
    ap.add_argument("--variants", default="a,b,b2,b3,c,d,e")
    ap.add_argument("--scale", type=float, default=1.0, help="Multiply every step count (0.5: a cheaper run).")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: expected some of {','.join(VARIANTS)}, found {','.join(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    for name in names:
        if name == "e":  # the better fine-tuning method of c and d, by the source model's exact match
            cd = [r for r in rows if r["name"] in ("c", "d") and r.get("source_accuracy") is not None]
            best = max(cd, key=lambda r: r["source_accuracy"])["name"] if cd else "c"
            chosen = VARIANTS[best]["finetune"]
            DESCRIPTION["e"] = f"as {best}, pruned by task-data importance"
        cfg = pipeline_for(name, args.out, args.scale, chosen)
        res = run_build(name, cfg, args.out)
        rows.append(collect(res, cfg["order"]))
        print(f"[{name}] done in {res['wall_s']:.0f} s (exit {res['rc']})", file=sys.stderr, flush=True)
        # what has finished so far, kept after every variant (a run stopped part-way still has its rows)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1, default=str), encoding="utf-8")
    teacher = next((r["teacher"] for r in rows if r.get("teacher")), None)
    print_table(rows, teacher, args.scale)


if __name__ == "__main__":
    main()
