"""Every distillation and fine-tuning technique against plain KD and plain LoRA, on the bundled teacher.

    .venv/bin/python benchmarks/techniques.py [--quick] [--all] [--rows NAME,...] [--distill-steps 40]
        [--finetune-steps 60] [--eval-examples 50] [--student-layers 10] [--out DIR]

Distillation side: the bundled teacher (smollm2-135m-instruct) into the same student (``--student-layers``,
depth-pruned by block influence), the same data and the same budget (``--distill-steps`` x 4 x 128 tokens; a
progressive run splits the same steps over its stages). Columns: held-out perplexity and KL(teacher || student) on the
built-in held-out prose (8 x 256 tokens), wall time of the whole run (evaluations included). The rows that involve
the task (the task baselines, rationale, multi-teacher with a LoRA-tuned teacher) also report home-commands
exact-match accuracy on ``--eval-examples`` held-out commands; their baseline is "KD + task examples" (the same
examples as distillation data, one teacher) and, for the rationale row, "answer-only".

Fine-tuning side: LoRA on the bundled teacher for home-commands, ``--finetune-steps`` x batch 4; columns: exact-match
accuracy, general-text perplexity after (the same held-out prose: forgetting; the base model's is the teacher row's),
wall time. The rank sweep's short runs are included in its wall time and FLOPs; its full run has the same budget.

Runs one after the other in this process; the LoRA baseline runs first because its merged model is the second teacher
of the multi-teacher rows. Prints ONE Markdown table and a line of settings; every record goes to OUT/techniques.json.
``--quick`` is a smoke run (2 steps, tiny evaluations): it checks the wiring end to end, its numbers mean nothing.
Time: the ``--quick`` smoke run measured 5.3 minutes with the 2 cores shared with other jobs. The default rows with
``--eval-examples 30 --finetune-steps 40`` measured 19 minutes on 2 otherwise idle cores (the README's table);
``--all`` adds three variants (about 6 minutes). To trim: ``--eval-examples 30``,
``--finetune-steps 40``, or run the table in parts with ``--rows`` (each part prints its own rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEACHER = "smollm2-135m-instruct"
TASK = "home-commands"
TEACHER_LAYERS = 30


def distill_rows(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any], bool]]:
    """(row name, technique label, DistillConfig overrides, in the default set)."""
    task = dict(task=TASK, task_examples=args.task_examples, task_eval_examples=args.eval_examples)
    half = (TEACHER_LAYERS + args.student_layers) // 2  # progressive: via the midpoint (30 -> 20 -> 10)
    return [
        ("kd", "plain KD (baseline)", {}, True),
        ("progressive", f"progressive {half}->{args.student_layers} from the previous student",
         dict(progressive=(half, args.student_layers), progressive_from="previous"), True),
        ("progressive-teacher", f"progressive {half}->{args.student_layers} from the teacher",
         dict(progressive=(half, args.student_layers), progressive_from="teacher"), False),
        ("curriculum", "curriculum: teacher-loss, root pacing", dict(curriculum="teacher-loss"), True),
        ("curriculum-student", "curriculum: student-loss, root pacing", dict(curriculum="student-loss"), False),
        ("self-distill", "self-distillation: pruned copy, teacher's own outputs only", dict(self_distill="pruned"),
         True),
        ("on-policy", f"on-policy λ=0.5 ({args.on_policy_tokens} sampled tokens)",
         dict(on_policy_ratio=0.5, on_policy_tokens=args.on_policy_tokens), True),
        ("kd-task", "KD + task examples (task baseline, 1 teacher)", dict(task), True),
        ("task-answer", "KD + task, answer-only term", dict(task, task_loss="answer"), True),
        ("task-rationale", "KD + task, answer + rationale term (λ=1)",
         dict(task, task_loss="rationale", rationale_weight=1.0, rationale_tokens=args.rationale_tokens), True),
        ("multi-teacher", "multi-teacher: + LoRA-tuned teacher, lowest-loss routing",
         dict(task, teacher_routing="lowest-loss"), True),
        ("multi-teacher-weights", "multi-teacher: + LoRA-tuned teacher, weights 0.5/0.5",
         dict(task, teacher_routing="weights", teacher_weights=(0.5, 0.5)), False),
    ]


def finetune_rows(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any], bool]]:
    return [
        ("lora", f"plain LoRA r{args.rank} (baseline)", {}, True),
        ("rank-sweep", "LoRA rank sweep 4,8,16, then the full run", dict(rank_sweep=(4, 8, 16),
                                                                         rank_sweep_steps=args.sweep_steps), True),
        ("layerwise-lr", f"LoRA, layer-wise lr decay {args.layerwise_decay}",
         dict(layerwise_lr_decay=args.layerwise_decay), True),
        ("ewc", f"LoRA + EWC λ={args.ewc:g}", dict(ewc=args.ewc, ewc_batches=args.ewc_batches), True),
    ]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~2-minute smoke run (tiny budgets; numbers mean nothing)")
    ap.add_argument("--all", action="store_true", help="also the extra variants (progressive from the teacher, "
                    "student-loss curriculum, weighted multi-teacher)")
    ap.add_argument("--rows", default=None, help="comma-separated row names to run (default: the default set)")
    ap.add_argument("--student-layers", type=int, default=10)
    ap.add_argument("--distill-steps", type=int, default=40)
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--eval-examples", type=int, default=50, help="held-out home-commands examples")
    ap.add_argument("--task-examples", type=int, default=64, help="task examples inside distillation runs")
    ap.add_argument("--rationale-tokens", type=int, default=48)
    ap.add_argument("--on-policy-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16, help="the LoRA baseline's rank")
    ap.add_argument("--sweep-steps", type=int, default=12, help="steps per rank of the rank sweep")
    ap.add_argument("--layerwise-decay", type=float, default=0.9)
    ap.add_argument("--ewc", type=float, default=0.1, help="EWC λ (untuned; F is normalised to mean 1)")
    ap.add_argument("--ewc-batches", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgeforge-techniques"))
    args = ap.parse_args()
    args.batch_size, args.seq_len, args.ft_batch, args.eval_sequences, args.eval_seq_len = 4, 128, 4, 8, 256
    args.calib_sequences = 8
    if args.quick:
        args.distill_steps, args.finetune_steps, args.eval_examples, args.task_examples = 2, 2, 4, 8
        args.rationale_tokens, args.on_policy_tokens, args.sweep_steps, args.ewc_batches = 16, 8, 1, 2
        args.batch_size, args.seq_len, args.ft_batch, args.eval_sequences, args.eval_seq_len = 2, 64, 2, 2, 64
        args.calib_sequences = 2
    return args


def run_distill_row(args: argparse.Namespace, name: str, overrides: dict[str, Any],
                    extra_teacher: Path | None) -> dict[str, Any]:
    from edgeforge.distill.config import DistillConfig
    from edgeforge.distill.run import run_distill

    out = args.out / name
    shutil.rmtree(out, ignore_errors=True)
    if name.startswith("multi-teacher"):
        overrides = {**overrides, "extra_teachers": (str(extra_teacher),)}
    cfg = DistillConfig(out=out, teacher=TEACHER, student_layers=args.student_layers, steps=args.distill_steps,
                        batch_size=args.batch_size, seq_len=args.seq_len, eval_sequences=args.eval_sequences,
                        eval_seq_len=args.eval_seq_len, calib_sequences=args.calib_sequences, checkpoint_every=0,
                        **overrides)
    return run_distill(cfg, log=lambda m: print(f"  {time.strftime('%H:%M:%S')} [{name}] {m}", flush=True))


def run_finetune_row(args: argparse.Namespace, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    from edgeforge.finetune.config import FinetuneConfig
    from edgeforge.finetune.run import run_finetune

    out = args.out / f"ft-{name}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = FinetuneConfig(method="lora", rank=args.rank, steps=args.finetune_steps, batch_size=args.ft_batch,
                         eval_examples=args.eval_examples, checkpoint_every=0, **overrides)
    return run_finetune(TEACHER, out, cfg, task=TASK,
                        log=lambda m: print(f"  {time.strftime('%H:%M:%S')} [ft-{name}] {m}", flush=True))


def merged_copy(adapter_dir: Path, out: Path) -> Path:
    """The LoRA baseline merged into a full-precision copy of the teacher: the second teacher of multi-teacher."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeforge.finetune.adapter import base_model_dir

    base_dir, _ = base_model_dir(TEACHER)
    shutil.rmtree(out, ignore_errors=True)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir))
    merged.merge_and_unload().save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(out)
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def main() -> None:
    args = parse_args()
    from edgeforge.models.refs import read_arch, resolve_model
    from edgeforge.plan.training_cost import training_flops

    args.out.mkdir(parents=True, exist_ok=True)
    d_rows, f_rows = distill_rows(args), finetune_rows(args)
    chosen = set(args.rows.split(",")) if args.rows else {n for n, _, _, default in d_rows + f_rows
                                                         if default or args.all}
    needs_lora = "lora" in chosen or any(n.startswith("multi-teacher") for n in chosen)
    results: dict[str, dict[str, Any]] = {}
    timed: dict[str, float] = {}

    def timed_run(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        print(f"{time.strftime('%H:%M:%S')} running {name} ...", flush=True)
        t0 = time.perf_counter()
        results[name] = fn()
        timed[name] = time.perf_counter() - t0

    extra_teacher = None
    for name, _, overrides, _ in f_rows:  # the LoRA baseline first: its merged model is a multi-teacher teacher
        if name in chosen or (name == "lora" and needs_lora):
            timed_run(f"ft-{name}", lambda n=name, o=overrides: run_finetune_row(args, n, o))
    if any(n.startswith("multi-teacher") for n in chosen):
        extra_teacher = merged_copy(args.out / "ft-lora", args.out / "lora-merged-teacher")
    for name, _, overrides, _ in d_rows:
        if name in chosen:
            timed_run(name, lambda n=name, o=overrides: run_distill_row(args, n, o, extra_teacher))

    n_params = read_arch(resolve_model(TEACHER)).n_params
    lines = ["| side | technique | held-out perplexity | KL(teacher‖student) | home-commands exact match | "
             "training FLOPs | train s | wall s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    any_distill = next((r for n, r in results.items() if not n.startswith("ft-")), None)
    lora = results.get("ft-lora")
    lines.append(f"| | teacher (smollm2-135m-instruct, {n_params / 1e6:.0f}M) | "
                 f"{_fmt(any_distill['teacher']['perplexity'] if any_distill else None, '.2f')} | 0 | "
                 f"{_fmt(lora['before']['task_accuracy'] if lora else None, '.1%')} | | | |")
    for name, label, _, _ in d_rows:
        r = results.get(name)
        if r is None:
            continue
        acc = r["task"]["after"]["task_accuracy"] if "task" in r else None
        if "progressive" in r:  # quality and cost of every stage but the last (the row's own numbers)
            label += "".join(f" (stage {s['stage']}, {s['layers']} layers: KL {s['after']['kl_to_teacher']:.3f}, "
                             f"{s['training_flops']:.2e} FLOPs)" for s in r["progressive"]["stages"][:-1])
        lines.append(f"| distill | {label} | {r['after']['perplexity']:.2f} | {r['after']['kl_to_teacher']:.3f} | "
                     f"{_fmt(acc, '.1%')} | {r['training_flops']['total']:.2e} | {r['training']['seconds']:.0f} | "
                     f"{timed[name]:.0f} |")
    for name, label, _, _ in f_rows:
        r = results.get(f"ft-{name}")
        if r is None:
            continue
        tokens = r["train_tokens"] + r.get("rank_sweep", {}).get("tokens", 0)
        if "rank_sweep" in r:
            label += f" (chose r{r['rank_sweep']['chosen_rank']})"
        lines.append(f"| fine-tune | {label} | {r['after']['general_perplexity']:.2f} | | "
                     f"{r['after']['task_accuracy']:.1%} | {training_flops('lora', tokens, n_params):.2e} | "
                     f"{r['train_seconds']:.0f} | {timed[f'ft-{name}']:.0f} |")
    print()
    print(f"Settings: {'QUICK SMOKE RUN (numbers mean nothing); ' if args.quick else ''}teacher {TEACHER}; student "
          f"{args.student_layers} layers depth-pruned by block influence; distill {args.distill_steps} steps x "
          f"{args.batch_size} x {args.seq_len} tokens, lr 1e-3, forward KL, built-in data; held-out "
          f"{args.eval_sequences} x {args.eval_seq_len} tokens of prose; fine-tune LoRA r{args.rank} "
          f"{args.finetune_steps} steps x batch {args.ft_batch}, lr 1e-3; {args.eval_examples} held-out "
          f"home-commands examples (greedy exact match); task rows use {args.task_examples} task examples; "
          f"FLOPs: 6N student + 2N per teacher per token (distill), 4N per token (LoRA); "
          f"{os.cpu_count()} CPU threads.")
    print()
    print("\n".join(lines))
    (args.out / "techniques.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                          "wall_seconds": timed, "records": results},
                                                         indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
