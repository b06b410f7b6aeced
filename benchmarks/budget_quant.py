"""Quantize to a byte budget: edgeforge's fitted mix against llama.cpp's preset types, side by side in one run.

For the bundled teacher and a distilled student: every preset type between Q3_K_M and Q6_K (all with the same
importance matrix), and at three budgets (90% of the Q4_K_M, Q5_K_M and Q6_K files) edgeforge's fitted mix
(``export gguf --quant fit --max-bytes B``). Every file is scored against the fp32 torch model on the same 1,000
tokens of the built-in held-out prose (no overlap with the calibration text, which is training prose): mean KL and
top-1 agreement. Prints one Markdown table; per budget: the best preset that fits (lowest KL), the preset the
budget is 90% of, and the fitted mix.

Goal (issue #17): at every budget the fit has lower mean KL than the best preset that fits, and a fit at 90% of a
preset's size has KL no higher than that preset (the same quality in at least 10% fewer bytes).

Run: .venv/bin/python benchmarks/budget_quant.py [--student DIR] [--threads 2] [--out-dir /tmp/edgeforge-budget]
(without --student, a 10-layer student is distilled first: 40 steps, about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

PRESETS = ["Q3_K_M", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
BUDGET_OF = ["Q4_K_M", "Q5_K_M", "Q6_K"]
BUDGET_FRACTION = 0.9


def distill_student(out: Path) -> Path:
    if (out / "config.json").is_file():
        return out
    cmd = [sys.executable, "-m", "edgeforge", "distill", "--teacher", "smollm2-135m-instruct", "--student-layers",
           "10", "--steps", "40", "--out", str(out)]
    subprocess.run(cmd, check=True)
    return out


def measure(name: str, ref, out: Path, calibration: Path, threads: int) -> list[dict]:
    from edgeforge.data.builtin import heldout_prose
    from edgeforge.export.gguf import compute_imatrix, export_gguf, quantize
    from edgeforge.verify.artifact import Reference, verify_artifact

    reference = Reference(ref)
    text = heldout_prose()
    base = ref.path if ref.format == "gguf" else out / f"{name}-F16.gguf"
    if ref.format != "gguf" and not base.is_file():
        export_gguf(ref, "F16", base, threads=threads)
    imatrix = out / f"{name}-imatrix.gguf"
    if not imatrix.is_file():
        compute_imatrix(base, calibration, imatrix, threads)

    def score(path: Path, label: str, seconds: float, extra: dict | None = None) -> dict:
        v = verify_artifact(path, reference, "Q4_K_M", text=text, enforce=False)
        row = {"model": name, "file": label, "bytes": path.stat().st_size, "mean_kl": v["mean_kl"],
               "top1": v["top1_agreement"], "n_tokens": v["n_tokens"], "seconds": seconds, **(extra or {})}
        print(f"{name} {label}: {row['bytes'] / 1e6:.1f} MB KL {row['mean_kl']:.4f} top-1 {row['top1']:.1%}",
              file=sys.stderr)
        return row

    rows = []
    for p in PRESETS:
        path = out / f"{name}-{p}.gguf"
        t = time.perf_counter()
        quantize(base, path, p, threads, imatrix)
        rows.append(score(path, p, time.perf_counter() - t))
    size = {r["file"]: r["bytes"] for r in rows}
    for p in BUDGET_OF:
        budget = int(size[p] * BUDGET_FRACTION)
        path = out / f"{name}-fit-{p}.gguf"
        path.unlink(missing_ok=True)
        rec = export_gguf(ref, "fit", path, imatrix_data=calibration, imatrix_file=imatrix, max_bytes=budget,
                          threads=threads, force=True)
        rows.append(score(path, f"fit {BUDGET_FRACTION:.0%} of {p}", rec["seconds"]["total"],
                          {"budget": budget, "of": p, "predicted_kl": rec["fit"]["predicted_mean_kl"],
                           "sensitivity_s": rec["fit"]["sensitivity"]["seconds"],
                           "files_measured": rec["fit"]["sensitivity"]["files_measured"]}))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | budget | best preset that fits: MB / KL / top-1 | preset at 100%: MB / KL | fitted mix: MB / "
             "KL (predicted) / top-1 | fit KL < best preset | fit KL <= preset at 100% |",
             "|---|---|---|---|---|---|---|"]
    for fit in (r for r in rows if "budget" in r):
        presets = [r for r in rows if r["model"] == fit["model"] and "budget" not in r]
        fitting = [r for r in presets if r["bytes"] <= fit["budget"]]
        best = min(fitting, key=lambda r: r["mean_kl"]) if fitting else None
        full = next(r for r in presets if r["file"] == fit["of"])
        best_s = f"{best['file']} {best['bytes'] / 1e6:.1f} / {best['mean_kl']:.4f} / {best['top1']:.1%}" if best \
            else "none"
        lines.append(
            f"| {fit['model']} | {fit['budget'] / 1e6:.1f} MB ({BUDGET_FRACTION:.0%} of {fit['of']}) | {best_s} | "
            f"{full['bytes'] / 1e6:.1f} / {full['mean_kl']:.4f} | {fit['bytes'] / 1e6:.1f} / {fit['mean_kl']:.4f} "
            f"({fit['predicted_kl']:.4f}) / {fit['top1']:.1%} | "
            f"{'yes' if best is None or fit['mean_kl'] < best['mean_kl'] else 'NO'} | "
            f"{'yes' if fit['mean_kl'] <= full['mean_kl'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", type=Path, default=None, help="an HF student dir [default: distil one]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/edgeforge-budget"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgeforge.data.builtin import write_calibration_text
    from edgeforge.models.refs import ModelRef, resolve_model

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    calibration = write_calibration_text(out / "calibration.txt")
    student = args.student or distill_student(out / "student-10l")
    rows = measure("teacher", resolve_model(None), out, calibration, args.threads)
    rows += measure("student", ModelRef(student.name, student, "hf"), out, calibration, args.threads)
    print(f"held-out prose, {rows[0]['n_tokens']} tokens, KL to the fp32 torch model; sensitivity: "
          + ", ".join(f"{r['model']} {r['files_measured']} files in {r['sensitivity_s']:.0f} s"
                      for r in rows if r.get("of") == BUDGET_OF[0]))
    print(table(rows))


if __name__ == "__main__":
    main()
