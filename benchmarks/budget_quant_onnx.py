"""ONNX to a byte budget: edgeforge's fitted 4/8-bit mix against the fixed int4 recipe and int8, in one run.

For the bundled teacher (dequantized to fp32 and exported once with optimum) and a distilled 10-layer student (40
steps of ``edgeforge distill``, about 2 minutes on 2 cores, unless ``--student DIR``): the int4 recipe (v/down and the
first and last layer at 8 bits), int8, and edgeforge's fitted mix (``export onnx --quantize fit --max-bytes B``) at
five budgets: 90% of the int4 recipe's size, its own size (the same bytes, the mix chosen by measurement instead of by
rule) and 25%, 50% and 75% of the way from int4 to int8. Every graph is scored in onnxruntime against its own fp32
torch model on the same 1,000 tokens of the built-in held-out prose (no overlap with the calibration text, training
prose): mean KL and top-1 agreement. Prints one Markdown table.

Goal (issue #17): at every budget the fit has lower mean KL than the best fixed mode that fits, and at 90% of the
int4 recipe's bytes its KL is no higher than the recipe's (the same quality in 10% fewer bytes).

Run: .venv/bin/python benchmarks/budget_quant_onnx.py [--student DIR] [--out-dir /tmp/edgeforge-budget-onnx]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from budget_quant import distill_student  # the same 10-layer student the GGUF table measures (this script's folder)

FRACTIONS = [0.0, 0.25, 0.5, 0.75]  # of the way from the int4 recipe's bytes to int8's
SMALLER = 0.9  # and a budget of 90% of the int4 recipe: the same KL in at least 10% fewer bytes?


def _variant_dir(fp32_dir: Path, out: Path) -> Path:
    """A directory holding the fp32 export's side files (config, tokenizer), for a quantized model.onnx."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for p in fp32_dir.iterdir():
        if p.is_file() and not p.name.startswith("model.onnx"):
            shutil.copy2(p, out / p.name)
    return out


def measure(name: str, ref, hf_dir: Path, out: Path) -> tuple[list[dict], int, float]:
    """The fixed modes and the fits of one model: its rows, the calibration tokens and the sensitivity seconds."""
    from edgeforge.data.builtin import heldout_prose, training_prose
    from edgeforge.export.onnx.export import MODEL_FILE, export_onnx
    from edgeforge.export.onnx.fit import calibration_ids, fit_onnx, weights_file_bytes
    from edgeforge.export.onnx.quantize import quantize_onnx
    from edgeforge.models.files import read_model_config
    from edgeforge.verify.artifact import Reference, verify_artifact

    out.mkdir(parents=True, exist_ok=True)
    fp32_dir = out / "fp32"
    if not (fp32_dir / MODEL_FILE).is_file():
        export_onnx(hf_dir, fp32_dir, quantize="none", force=True)
    src = fp32_dir / MODEL_FILE
    reference, text = Reference(ref), heldout_prose()

    def score(path: Path, label: str, judged_as: str, seconds: float, extra: dict | None = None) -> dict:
        v = verify_artifact(path, reference, judged_as, text=text, enforce=False)
        row = {"model": name, "file": label, "bytes": weights_file_bytes(path / MODEL_FILE), "mean_kl": v["mean_kl"],
               "top1": v["top1_agreement"], "n_tokens": v["n_tokens"], "seconds": seconds, **(extra or {})}
        print(f"{name} {label}: {row['bytes'] / 1e6:.1f} MB KL {row['mean_kl']:.4f} top-1 {row['top1']:.1%} "
              f"({seconds:.0f} s)", file=sys.stderr)
        return row

    rows = []
    for mode in ("int4", "int8"):
        d = _variant_dir(fp32_dir, out / mode)
        t = time.perf_counter()
        quantize_onnx(src, d / MODEL_FILE, mode)
        rows.append(score(d, f"{mode} recipe", mode, time.perf_counter() - t))
    int4, int8 = rows[0]["bytes"], rows[1]["bytes"]
    ids = calibration_ids(hf_dir, training_prose())
    config = read_model_config(fp32_dir)
    cache = out / "sensitivity"
    shutil.rmtree(cache, ignore_errors=True)  # the first fit measures, for the cost in the table
    budgets = [(f"{f:.0%} int4->int8", int(int4 + f * (int8 - int4))) for f in FRACTIONS]
    budgets.insert(0, (f"{SMALLER:.0%} of int4", int(SMALLER * int4)))
    for i, (label, budget) in enumerate(budgets):
        d = _variant_dir(fp32_dir, out / f"fit-{i}")
        t = time.perf_counter()
        rec = fit_onnx(src, d / MODEL_FILE, budget, ids, config, cache)["fit"]
        n4 = sum(b == 4 for b in rec["node_bits"].values())
        rows.append(score(d, f"fit {label}", rec["judged_as"], time.perf_counter() - t,
                          {"budget": budget, "predicted_kl": rec["predicted_mean_kl"], "n4": n4,
                           "n_linear": len(rec["node_bits"]), "sensitivity_s": rec["sensitivity"]["seconds"],
                           "from_cache": rec["sensitivity"]["from_cache"]}))
    return rows, len(ids), rows[2]["sensitivity_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/edgeforge-budget-onnx"))
    ap.add_argument("--student", type=Path, default=None, help="an HF student dir [default: distil one]")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgeforge.models.gguf_hf import hf_dir_for, materialize_hf
    from edgeforge.models.refs import ModelRef, resolve_model
    from edgeforge.paths import edgeforge_home

    out = args.out_dir
    ref = resolve_model(None)
    hf_dir = materialize_hf(ref.path, hf_dir_for(ref.path, edgeforge_home()))
    student = args.student or distill_student(out / "student-10l")
    measured = [("teacher", *measure("teacher", ref, hf_dir, out)),
                ("student", *measure("student", ModelRef(student.name, student, "hf"), student, out / "student"))]
    tokens = measured[0][1][0]["n_tokens"]
    print(f"SmolLM2-135M-Instruct (bundled teacher, fp32 from its Q4_1 GGUF) and a 10-layer student distilled from "
          f"it; held-out prose, {tokens} tokens, KL to each model's fp32 torch model; sensitivity measured once per "
          "model on " + " and ".join(f"{n} calibration tokens in {s:.0f} s ({name})" for name, _, n, s in measured))
    print("| model | budget | best fixed mode that fits: MB / KL / top-1 | fitted mix: MB / KL (predicted) / top-1 | "
          "linear layers at 4 bits | fit KL < best fixed |")
    print("|---|---|---|---|---|---|")
    for name, rows, _, _ in measured:
        fixed = rows[:2]
        for r in rows[2:]:
            fitting = [x for x in fixed if x["bytes"] <= r["budget"]]
            best = min(fitting, key=lambda x: x["mean_kl"]) if fitting else None
            best_s = f"{best['file']} {best['bytes'] / 1e6:.1f} / {best['mean_kl']:.4f} / {best['top1']:.1%}" \
                if best else "none"
            better = best is None or r["mean_kl"] < best["mean_kl"]
            print(f"| {name} | {r['budget'] / 1e6:.1f} MB ({r['file'][4:]}) | {best_s} | {r['bytes'] / 1e6:.1f} / "
                  f"{r['mean_kl']:.4f} ({r['predicted_kl']:.4f}) / {r['top1']:.1%} | {r['n4']} of {r['n_linear']} | "
                  f"{'yes' if better else 'NO'} |")


if __name__ == "__main__":
    main()
