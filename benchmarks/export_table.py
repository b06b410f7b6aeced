"""Size vs quality vs speed of every export of the bundled teacher, measured side by side in one run.

For each GGUF type (llama.cpp) and ONNX variant (onnxruntime): export time, file size, mean KL and top-1 agreement
against the fp32 torch model over 1,000 tokens of held-out prose, and prefill / decode tokens/s measured by
device_bench on this machine (the same agent that benchmarks targets). Also: Q4_K_M with an importance matrix
against plain Q4_K_M. Prints one Markdown table.

Run: .venv/bin/python benchmarks/export_table.py [--threads 2] [--out-dir /tmp/edgeforge-export-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GGUF_TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_M+imatrix", "Q4_0", "IQ4_XS+imatrix"]
ONNX_VARIANTS = ["none", "int8", "int4"]


def bench(artifact: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "device_bench")}
    cmd = [sys.executable, "-m", "device_bench", str(artifact), "--threads", str(threads), "--prompt-tokens", "128",
           "--gen-tokens", "64", "--repeats", "3", "--warmup", "1", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-200:]}
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/edgeforge-export-bench"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgeforge.data.builtin import write_calibration_text
    from edgeforge.export.gguf import compute_imatrix, export_gguf
    from edgeforge.export.onnx.export import export_onnx
    from edgeforge.models.gguf_hf import hf_dir_for, materialize_hf
    from edgeforge.models.refs import resolve_model
    from edgeforge.paths import edgeforge_home
    from edgeforge.verify.artifact import Reference, verify_artifact

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    teacher = resolve_model(None)
    reference = Reference(teacher)
    rows = []
    t0 = time.perf_counter()
    imatrix = compute_imatrix(teacher.path, write_calibration_text(out / "calibration.txt"), out / "imatrix.gguf",
                              args.threads)
    imatrix_s = time.perf_counter() - t0
    for name in GGUF_TYPES:
        quant, _, extra = name.partition("+")
        path = out / f"teacher-{name.replace('+', '-')}.gguf"
        rec = export_gguf(teacher, quant, path, imatrix_file=imatrix if extra else None, threads=args.threads)
        v = verify_artifact(path, reference, quant, enforce=False)
        b = bench(path, args.threads)
        rows.append(("gguf", name, rec["seconds"]["total"] + (imatrix_s if extra else 0), path.stat().st_size,
                     v["mean_kl"], v["top1_agreement"], b.get("prefill_tokens_per_s"), b.get("decode_tokens_per_s")))
        print(f"done {name}", file=sys.stderr)
    hf_dir = materialize_hf(teacher.path, hf_dir_for(teacher.path, edgeforge_home()))
    for variant in ONNX_VARIANTS:
        path = out / f"teacher-onnx-{variant}"
        t = time.perf_counter()
        rec = export_onnx(hf_dir, path, quantize=variant)  # type: ignore[arg-type]
        seconds = time.perf_counter() - t
        v = verify_artifact(path, reference, variant, enforce=False)
        b = bench(path, args.threads)
        rows.append(("onnx", "fp32" if variant == "none" else variant, seconds, rec["total_bytes"], v["mean_kl"],
                     v["top1_agreement"], b.get("prefill_tokens_per_s"), b.get("decode_tokens_per_s")))
        print(f"done onnx {variant}", file=sys.stderr)

    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    print(f"SmolLM2-135M-Instruct (bundled teacher), {args.threads} threads, KL/top-1 vs fp32 torch over "
          f"{v['n_tokens']} tokens of held-out prose; speeds by device_bench (128-token prompt, 64 generated).\n")
    print("| format | type | export s | size MB | mean KL | top-1 | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt, name, secs, size, kl, top1, pp, tg in rows:
        print(f"| {fmt} | {name} | {secs:.1f} | {size / 1e6:.1f} | {kl:.4f} | {top1:.1%} | {num(pp, '.0f')} | "
              f"{num(tg, '.1f')} |")
    plain = next(r for r in rows if r[1] == "Q4_K_M")
    imat = next(r for r in rows if r[1] == "Q4_K_M+imatrix")
    print(f"\nQ4_K_M with an importance matrix: mean KL {imat[4]:.4f} vs {plain[4]:.4f} plain "
          f"({100 * (1 - imat[4] / plain[4]):.0f}% lower); importance matrix computed in {imatrix_s:.0f} s.")


if __name__ == "__main__":
    main()
