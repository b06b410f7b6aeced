"""The speed estimate against device_bench's measurement on this machine, for the bundled teacher and a student.

Detects this machine's profile (``profiles detect``: cores, int8 rate, measured read bandwidth), makes two GGUF files
with the CLI, benchmarks both with device_bench (what ``edgeforge bench --target local`` runs) and prints one
Markdown table of estimated vs measured decode and prefill tokens/s, with the profile as ``profiles detect``
makes it and as ``profiles detect --calibrate`` does (decode constants measured by llama.cpp on synthetic models of
other shapes, one per GGML type, edgeforge.bench.calibrate; decode only; each file read by the types it holds).
Goal: the calibrated estimate within +-25%.

* the teacher: ``edgeforge export gguf smollm2-135m-instruct --quant Q4_K_M``;
* a depth-pruned student: ``edgeforge distill --teacher smollm2-135m-instruct --student-layers 10 --steps 1``
  (block-influence pruning and one optimizer step: its quality is irrelevant here, its shape is what is timed), then
  exported to Q4_K_M the same way.

Heavy (export, a distillation step, two benchmarks): run it alone, under the machine's lock:
    flock /tmp/edgeforge-cpu.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/estimate_vs_measured.py [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgeforge.bench.calibrate import calibrate_profile
from edgeforge.bench.run import BenchOptions, TargetJob, run_benchmarks
from edgeforge.bench.targets import resolve_target
from edgeforge.export.calibration_model import CALIBRATION_TYPES, calibration_ggufs, describe
from edgeforge.models.refs import ModelRef, gguf_streamed_bytes_by_type, read_arch
from edgeforge.plan.detect import detect_profile
from edgeforge.plan.estimator import estimate_speed

TEACHER = "smollm2-135m-instruct"
STUDENT_LAYERS = 10
GOAL = 0.25


def edgeforge(*args: str) -> None:
    """Run the edgeforge CLI of this interpreter; stop with its output when it fails."""
    cmd = [sys.executable, "-m", "edgeforge", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        output = done.stdout[-2000:] + done.stderr[-2000:]
        raise SystemExit(f"{' '.join(args[:2])} failed ({done.returncode}):\n{output}")


def make_artifacts(work: Path) -> dict[str, Path]:
    """The teacher and the student at Q4_K_M (made once; reused when ``work`` already holds them)."""
    teacher, student_dir, student = work / "teacher-Q4_K_M.gguf", work / "student", work / "student-Q4_K_M.gguf"
    if not teacher.is_file():
        edgeforge("export", "gguf", TEACHER, "--quant", "Q4_K_M", "--no-verify", "--out", str(teacher))
    if not student.is_file():
        if not (student_dir / "config.json").is_file():
            edgeforge("distill", "--teacher", TEACHER, "--student-layers", str(STUDENT_LAYERS), "--steps", "1",
                      "--out", str(student_dir))
        edgeforge("export", "gguf", str(student_dir), "--quant", "Q4_K_M", "--no-verify", "--out", str(student))
    return {f"teacher ({TEACHER}, 30 layers)": teacher, f"student ({STUDENT_LAYERS} layers)": student}


def _ratio(estimated: Any, measured: Any) -> str:
    if not isinstance(estimated, (int, float)) or not isinstance(measured, (int, float)) or not measured:
        return "n/a"
    return f"{estimated / measured - 1:+.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="folder for the artifacts (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeforge-estimate-"))
    work.mkdir(parents=True, exist_ok=True)
    artifacts = make_artifacts(work)
    profile = detect_profile("this-machine")  # measured before the benchmarks, never during one
    calibrated = calibrate_profile(profile, calibration_ggufs(work, profile.cpu.cores))  # other shapes than both
    results = run_benchmarks(list(artifacts.values()), [TargetJob(resolve_target("local"), calibrated)],
                             BenchOptions(), save=False)
    print(f"This machine: {profile.description}; int8 {profile.cpu.int8_ops_per_s / 1e9:,.0f} GOPS "
          f"({profile.cpu.cores} cores). Calibrated (profiles detect --calibrate: {'; '.join(describe())}): "
          f"at {', '.join(CALIBRATION_TYPES)}): layer_overhead_s {calibrated.layer_overhead_s}, decode_efficiency "
          f"{calibrated.decode_efficiency}, decode read rate by type (GB/s) "
          + ", ".join(f"{q} {r / 1e9:.1f}" for q, r in calibrated.decode_rate_bytes_per_s["cpu"].items()) + ".\n")
    print("| model | file MB | threads | decode meas. | est. calibrated | error | est. detected | error | "
          "prefill meas. | est. calibrated | error | est. detected | error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (label, path), r in zip(artifacts.items(), results, strict=True):
        plain = estimate_speed(profile, read_arch(ModelRef(label, path, "gguf")), path.stat().st_size,
                               BenchOptions().prompt_tokens, "cpu", BenchOptions().gen_tokens,
                               streamed_bytes_by_type=gguf_streamed_bytes_by_type(path))
        d_est, d_meas = r.get("estimated_decode_tokens_per_s"), r.get("decode_tokens_per_s")
        p_est, p_meas = r.get("estimated_prefill_tokens_per_s"), r.get("prefill_tokens_per_s")
        d_plain, p_plain = plain.decode_tokens_per_s, plain.prefill_tokens_per_s
        print(f"| {label} | {path.stat().st_size / 1e6:.1f} | {r.get('threads')} | {d_meas:,.0f} | {d_est:,.0f} "
              f"| {_ratio(d_est, d_meas)} | {d_plain:,.0f} | {_ratio(d_plain, d_meas)} | {p_meas:,.0f} | "
              f"{p_est:,.0f} | {_ratio(p_est, p_meas)} | {p_plain:,.0f} | {_ratio(p_plain, p_meas)} |")
    print(f"\nGoal: every calibrated error within +-{GOAL:.0%}. Decode is device_bench's mean over "
          f"{BenchOptions().gen_tokens} tokens from an empty cache; prefill one batch of "
          f"{BenchOptions().prompt_tokens} tokens. The calibration models are measured in the same run, before both.")


if __name__ == "__main__":
    main()
