"""Distillation throughput and quality: online KD, offline KD from the cache, and a plain Hugging Face Trainer.

    .venv/bin/python benchmarks/distill_throughput.py [--steps 30] [--batch-size 4] [--seq-len 128]

On the bundled teacher, with the same data (built-in prose + the teacher's answers), the same student initialisation
(depth-pruned to --student-layers by block influence) and the same token budget, each run in its own process:

- online KD: edgeforge distill, the teacher in the loop;
- offline KD: edgeforge distill --offline-teacher, after a separate run filled the top-k cache (so this one is a
  cache hit: 0 teacher forward passes);
- CE baseline: transformers.Trainer fine-tuning the same student with cross-entropy on the same sequences.

tokens/s counts training tokens over the time of the steps after the first ``--warmup`` steps (benchmarks warm up
before timing); peak RSS is sampled during those training steps only. Then held-out perplexity and KL(teacher ||
student) of each student, against the fp32 teacher. Prints one Markdown table (and --json for a script).

Fairness on a shared machine: the three runs are started together but take turns, one optimizer step at a time
(a child blocks between steps until the parent hands it the turn; the wait is outside the timed step). So every run
sees the same background load, and the ratios hold even when other jobs come and go.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class RssSampler:
    """Peak resident memory while ``active`` is set, sampled every 50 ms."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.active = threading.Event()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            if self.active.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def take_turn() -> None:
    """Block until the parent gives this child the turn (only when run in turns by the parent)."""
    if os.environ.get("EDGEFORGE_BENCH_TURNS") == "1":
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("the benchmark's parent process went away")


def _steady(step_times: list[float], step_tokens: list[int], warmup: int) -> float:
    t, n = sum(step_times[warmup:]), sum(step_tokens[warmup:])
    return n / t if t > 0 else 0.0


def _config(args: argparse.Namespace, out: Path, **kw: Any) -> Any:
    from edgeforge.distill.config import DistillConfig

    return DistillConfig(out=out, teacher=args.teacher, student_layers=args.student_layers, steps=args.steps,
                         batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=0, checkpoint_every=0,
                         eval_sequences=args.eval_sequences, cache_dir=Path(args.workdir) / "kd-cache", **kw)


def child_kd(args: argparse.Namespace, offline: bool) -> dict[str, Any]:
    take_turn()  # the set-up (loading, pruning, the "before" evaluation) runs in one turn of its own
    from edgeforge.distill.run import run_distill

    rss = RssSampler()
    times: list[float] = []
    tokens: list[int] = []

    def on_log(entry: dict[str, float]) -> None:
        step_tokens = args.batch_size * args.seq_len
        times.append(step_tokens / entry["tokens_per_s"])
        tokens.append(step_tokens)
        if len(times) == args.warmup:
            rss.active.set()
        take_turn()

    name = "offline" if offline else "online"
    cfg = _config(args, Path(args.workdir) / name, offline_teacher=offline, top_k=args.top_k if offline else None)
    rec = run_distill(cfg, on_log=on_log)
    rss.active.clear()
    return {"tokens_per_s": _steady(times, tokens, args.warmup), "peak_rss_bytes": rss.stop(),
            "perplexity": rec["after"]["perplexity"], "kl_to_teacher": rec["after"]["kl_to_teacher"],
            "teacher_forward_passes": rec["teacher_forward_passes"], "before": rec["before"], "teacher": rec["teacher"],
            "cache_hit": rec["teacher_signal"].get("cache_hit"), "bytes_per_token":
                rec["teacher_signal"].get("bytes_per_token")}


def child_ce(args: argparse.Namespace) -> dict[str, Any]:
    """The same student, data and budget through a plain transformers.Trainer with cross-entropy."""
    take_turn()
    import torch
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from edgeforge.distill.data import prepare_data
    from edgeforge.distill.evaluate import evaluate
    from edgeforge.distill.prune import StudentShape, init_student
    from edgeforge.distill.teacher import resolve_teacher

    cfg = _config(args, Path(args.workdir) / "ce")
    teacher = resolve_teacher(cfg.teacher, True)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher.hf_dir))
    data = prepare_data(cfg, tokenizer, teacher, cfg.cache_dir, True, lambda _m: None)
    t_model = teacher.load(torch.float32, torch.device("cpu"))
    student, _ = init_student(t_model, StudentShape(args.student_layers), "auto", data.train[: cfg.calib_sequences],
                              seed=0)
    student.requires_grad_(True)
    del t_model
    train_rows = [{"input_ids": r, "labels": r} for r in data.train]
    rss = RssSampler()
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.t0)
            if len(times) == args.warmup:
                rss.active.set()
            take_turn()

    targs = TrainingArguments(
        output_dir=str(Path(args.workdir) / "ce-trainer"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, weight_decay=0.0,
        warmup_steps=min(10, max(1, args.steps // 10)), lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to=[], seed=0, disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
    Trainer(model=student, args=targs, train_dataset=train_rows, callbacks=[Timer()]).train()
    rss.active.clear()
    peak = rss.stop()
    student.eval()
    t_eval = teacher.load(torch.float32, torch.device("cpu"))
    m = evaluate({"student": student}, t_eval, data.heldout)["student"]
    step_tokens = args.batch_size * args.seq_len
    return {"tokens_per_s": _steady(times, [step_tokens] * len(times), args.warmup), "peak_rss_bytes": peak,
            "perplexity": m["perplexity"], "kl_to_teacher": m["kl_to_teacher"], "teacher_forward_passes": 0}


def _run_child(mode: str, argv: list[str]) -> dict[str, Any]:
    """One child alone (used for the untimed cache fill)."""
    cmd = [sys.executable, __file__, "--child", mode, *argv]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    print(f"  {mode}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def _run_in_turns(modes: dict[str, str], argv: list[str], workdir: Path) -> dict[str, dict[str, Any]]:
    """Start one child per mode; exactly one runs at a time, round-robin, one step (or set-up phase) per turn."""
    env = {**os.environ, "EDGEFORGE_BENCH_TURNS": "1"}
    procs, logs, results = {}, {}, {}
    for name, mode in modes.items():
        logs[name] = open(workdir / f"{mode}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed below
        procs[name] = subprocess.Popen([sys.executable, __file__, "--child", mode, *argv], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=logs[name], text=True, env=env)
    t0 = time.perf_counter()

    def await_ready(name: str) -> bool:
        """True when the child waits for its next turn; False when it has finished."""
        p = procs[name]
        for line in iter(p.stdout.readline, ""):  # type: ignore[union-attr]
            if line.startswith("RESULT "):
                results[name] = json.loads(line.removeprefix("RESULT "))
            elif line.strip() == "ready":
                return True
        p.wait()
        if p.returncode != 0 or name not in results:
            raise SystemExit(f"{name} failed; see {workdir / (modes[name] + '.log')}")
        print(f"  {name}: done ({time.perf_counter() - t0:.0f} s into the turns)", file=sys.stderr)
        return False

    active = [n for n in procs if await_ready(n)]
    while active:
        for name in list(active):
            procs[name].stdin.write("go\n")  # type: ignore[union-attr]
            procs[name].stdin.flush()  # type: ignore[union-attr]
            if not await_ready(name):
                active.remove(name)
    for f in logs.values():
        f.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--student-layers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    ap.add_argument("--eval-sequences", type=int, default=8)
    ap.add_argument("--workdir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "edgeforge-distill-bench"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["online", "offline", "ce"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child_ce(args) if args.child == "ce" else child_kd(args, args.child == "offline")
        print("RESULT " + json.dumps(res), flush=True)
        return
    argv = [a for a in sys.argv[1:] if a != "--json"]
    import shutil

    work = Path(args.workdir)
    stale = [work / d for d in ("online", "offline", "ce", "ce-trainer")] + list(work.glob("kd-cache/topk-*"))
    for d in stale:  # a fresh top-k cache each time; the teacher's generated answers stay cached
        shutil.rmtree(d, ignore_errors=True)
    print(f"distill benchmark: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens per run", file=sys.stderr)
    fill = _run_child("offline", argv)  # fills the top-k cache (not timed as the offline result)
    assert not fill["cache_hit"]
    shutil.rmtree(work / "offline", ignore_errors=True)
    results = _run_in_turns({"online KD": "online", "offline KD (cache hit)": "offline",
                             "CE baseline (HF Trainer)": "ce"}, argv, work)
    assert results["offline KD (cache hit)"]["teacher_forward_passes"] == 0
    base = results["CE baseline (HF Trainer)"]["tokens_per_s"]
    online = results["online KD"]
    if args.json:
        print(json.dumps({"config": vars(args), "results": results, "offline_cache_fill": fill}, indent=1))
        return
    print(f"| run ({args.steps} steps x {args.batch_size} x {args.seq_len} tokens, {args.student_layers}-layer "
          "student) | tokens/s | vs CE | peak RSS (training) | held-out perplexity | KL(teacher‖student) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| teacher | | | | {online['teacher']['perplexity']:.2f} | 0 |")
    print(f"| initial student (pruned, untrained) | | | | {online['before']['perplexity']:.2f} | "
          f"{online['before']['kl_to_teacher']:.3f} |")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['perplexity']:.2f} | {r['kl_to_teacher']:.3f} |")
    print(f"\noffline cache: {fill['bytes_per_token']} bytes/token (top-{args.top_k}: fp16 values + int32 ids); "
          "targets: offline >= 0.9x CE, online >= 0.6x CE, KD student better than the CE student")


if __name__ == "__main__":
    main()
