"""``edgeforge distill``: knowledge distillation of a teacher into a smaller student (edgeforge.distill.run).

Also the side-by-side table ``edgeforge eval STUDENT_DIR --reference TEACHER`` prints for a distilled student
(``eval_student``, dispatched from the ``eval`` command for HF directories holding a distill.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


def register(cli: click.Group) -> None:
    """Add the ``distill`` command to ``cli``."""
    if "distill" in cli.commands:
        raise ValueError("a 'distill' command is already registered")

    @cli.command("distill")
    @click.option("--teacher", default=None, help="HF model dir, .gguf file or alias [default: smollm2-135m-instruct].")
    @click.option("--profile", "profile", default=None, help="Take the student shape from the plan for this device "
                  "profile (name or YAML path).")
    @click.option("--profiles-dir", "profiles_dirs", multiple=True, type=click.Path(path_type=Path),
                  help="Extra folder or YAML file of device profiles (repeatable).")
    @click.option("--student-layers", type=click.IntRange(min=1), default=None,
                  help="Student decoder layers (pruned from the teacher by block influence).")
    @click.option("--student-hidden", type=click.IntRange(min=1), default=None,
                  help="Student hidden size (width-pruned by activation importance) [default: the teacher's].")
    @click.option("--student-intermediate", type=click.IntRange(min=1), default=None,
                  help="Student MLP width [default: the teacher's].")
    @click.option("--student-kv-heads", type=click.IntRange(min=1), default=None,
                  help="Student KV groups (whole groups pruned with their query heads) [default: the teacher's].")
    @click.option("--student", "student_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
                  default=None, help="Your own student: an HF directory sharing the teacher's tokenizer.")
    @click.option("--init", "init", type=click.Choice(["auto", "depth", "width", "random"]), default="auto",
                  show_default=True, help="Student initialisation: pruning (depth and/or width, as the shape needs; "
                  "or only depth / only width), or random weights for comparison.")
    @click.option("--data", multiple=True, type=click.Path(path_type=Path),
                  help="Training text: .txt, JSONL with 'text', or chat JSONL (repeatable) [default: built-in prose "
                  "plus the teacher's answers to built-in prompts].")
    @click.option("--no-generate", is_flag=True, help="Built-in data: skip the teacher's generated answers.")
    @click.option("--loss", type=click.Choice(["forward_kl", "reverse_kl", "jsd"]), default="forward_kl",
                  show_default=True, help="Divergence between teacher and student distributions.")
    @click.option("--jsd-beta", type=float, default=0.5, show_default=True, help="Mixture weight of --loss jsd.")
    @click.option("--top-k", type=click.IntRange(min=1), default=None,
                  help="Distill against the teacher's top-k tokens only [offline default: 64].")
    @click.option("--offline-teacher", is_flag=True,
                  help="Compute the teacher's top-k log-probs once into a cache and train from it.")
    @click.option("--temperature", type=float, default=1.0, show_default=True, help="Softmax temperature of KD.")
    @click.option("--alpha", type=float, default=0.0, show_default=True,
                  help="Weight of cross-entropy on the data: (1 - alpha) * KD + alpha * CE.")
    @click.option("--hidden-loss", type=click.Choice(["none", "mse", "cosine"]), default="none", show_default=True,
                  help="Also align each student layer's output with its teacher layer (online teacher only).")
    @click.option("--hidden-weight", type=float, default=1.0, show_default=True)
    @click.option("--teacher-dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto",
                  show_default=True, help="Teacher precision for the training signal (evaluation is always fp32).")
    @click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True, help="Optimizer steps.")
    @click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Stop after this many tokens.")
    @click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Stop after this much training time.")
    @click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
                  help="Sequences per micro-batch (per process).")
    @click.option("--seq-len", type=click.IntRange(min=8), default=128, show_default=True)
    @click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True)
    @click.option("--parallel", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
                  help="Under torchrun (N processes): ddp keeps a full student, gradients and optimizer state on "
                  "every process and averages gradients (fastest when the student fits one device); fsdp shards "
                  "parameters, gradients and AdamW state over the processes (FSDP2), for students whose training "
                  "state does not fit one GPU, at the cost of more communication. One process: no wrapping.")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--checkpoint-every", type=click.IntRange(min=0), default=20, show_default=True,
                  help="Steps between checkpoints (0: none).")
    @click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
    @click.option("--eval-sequences", type=click.IntRange(min=1), default=8, show_default=True,
                  help="Held-out sequences for the before/after metrics.")
    @click.option("--eval-seq-len", type=click.IntRange(min=8), default=256, show_default=True)
    @click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                  help="Teacher cache folder [default: $EDGEFORGE_HOME/kd-cache].")
    @click.option("--progressive", default=None, metavar="L1,L2,...",
                  help="Progressive distillation: shrink in stages of these layer counts (e.g. 20,10; the last is "
                  "the student's), each stage pruned from the previous stage's student; --steps is split over the "
                  "stages. Records FLOPs and quality per stage.")
    @click.option("--progressive-from", type=click.Choice(["previous", "teacher"]), default="previous",
                  show_default=True, help="Each progressive stage distils from the previous stage's student or "
                  "from the teacher.")
    @click.option("--curriculum", type=click.Choice(["none", "teacher-loss", "student-loss"]), default="none",
                  show_default=True, help="Curriculum: order the training sequences easy -> hard by the teacher's "
                  "loss (NLL) or the initial student's loss (KL to the teacher).")
    @click.option("--curriculum-pacing", type=click.Choice(["linear", "root", "step"]), default="root",
                  show_default=True, help="Share of the easiest data available at step t (all of it from 80% of "
                  "the steps on).")
    @click.option("--curriculum-start", type=click.FloatRange(0, 1, min_open=True), default=0.25, show_default=True,
                  help="Share of the easiest data available at the first step.")
    @click.option("--self-distill", type=click.Choice(["none", "pruned", "born-again"]), default="none",
                  show_default=True, help="Self-distillation on the teacher's own generated outputs only: into a "
                  "pruned copy of itself (the --student-* shape), or born-again (the teacher's own shape; "
                  "--init random for a fresh copy).")
    @click.option("--task", default=None, help="A built-in task (home-commands) or task JSONL: its examples join the "
                  "training data and its exact-match accuracy is measured before and after.")
    @click.option("--task-loss", type=click.Choice(["none", "answer", "rationale"]), default="none",
                  show_default=True, help="Supervised task term: answer-only ('[answer]' prefix), or also the "
                  "teacher's step-by-step rationale ('[rationale]' prefix; distilling step-by-step).")
    @click.option("--rationale-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
                  help="λ in KD + L_answer + λ L_rationale.")
    @click.option("--task-examples", type=click.IntRange(min=1), default=128, show_default=True,
                  help="Task training examples used (data, task term, rationales generated by the teacher).")
    @click.option("--task-eval-examples", type=click.IntRange(min=1), default=50, show_default=True,
                  help="Held-out task examples for the accuracy.")
    @click.option("--rationale-tokens", type=click.IntRange(min=1), default=48, show_default=True,
                  help="Longest teacher rationale (tokens).")
    @click.option("--extra-teacher", "extra_teachers", multiple=True,
                  help="Multi-teacher: another teacher sharing the teacher's vocabulary (repeatable; checked).")
    @click.option("--teacher-weights", default=None, metavar="W0,W1,...",
                  help="Multi-teacher weights, --teacher first (normalised) [default: equal].")
    @click.option("--teacher-routing", type=click.Choice(["weights", "lowest-loss"]), default="weights",
                  show_default=True, help="Multi-teacher target: the weighted mixture of the teachers' "
                  "distributions, or per sample the teacher with the lowest loss on it.")
    @click.option("--on-policy-ratio", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                  help="On-policy distillation (GKD): share of micro-batches on which the student samples the "
                  "continuation and the teacher scores the student's own samples.")
    @click.option("--on-policy-tokens", type=click.IntRange(min=1), default=32, show_default=True,
                  help="Tokens the student samples per sequence in an on-policy micro-batch.")
    @click.option("--out", type=click.Path(path_type=Path), required=True, help="The student's HF directory.")
    @click.option("--json", "as_json", is_flag=True, help="Print distill.json's headline as JSON.")
    def distill_cmd(teacher: str | None, profile: str | None, profiles_dirs: tuple[Path, ...],
                    student_layers: int | None, student_hidden: int | None, student_intermediate: int | None,
                    student_kv_heads: int | None, student_dir: Path | None, init: str, data: tuple[Path, ...],
                    no_generate: bool, loss: str, jsd_beta: float, top_k: int | None, offline_teacher: bool,
                    temperature: float, alpha: float, hidden_loss: str, hidden_weight: float, teacher_dtype: str,
                    steps: int, max_tokens: int | None, max_seconds: float | None, lr: float, batch_size: int,
                    seq_len: int, grad_accum: int, parallel: str, seed: int, checkpoint_every: int, resume: bool,
                    eval_sequences: int, eval_seq_len: int, cache_dir: Path | None, progressive: str | None,
                    progressive_from: str, curriculum: str, curriculum_pacing: str, curriculum_start: float,
                    self_distill: str, task: str | None, task_loss: str, rationale_weight: float,
                    task_examples: int, task_eval_examples: int, rationale_tokens: int,
                    extra_teachers: tuple[str, ...], teacher_weights: str | None, teacher_routing: str,
                    on_policy_ratio: float, on_policy_tokens: int, out: Path, as_json: bool) -> None:
        """Distill a teacher into a smaller student and write it as an HF directory (+ distill.json).

        The student comes from --profile (the planner's shape), --student-layers N (pruned from the teacher), or
        --student DIR. Works the same under `torchrun --nproc_per_node N -m edgeforge distill ...` (DDP, or FSDP
        with --parallel fsdp).

        Techniques (docs/techniques.md), each measured against plain KD: --progressive, --curriculum,
        --self-distill, --task-loss rationale (distilling step-by-step), --extra-teacher (multi-teacher),
        --on-policy-ratio (on-policy, GKD-style).
        """
        from edgeforge.distill.config import DistillConfig
        from edgeforge.distill.run import record_summary, run_distill
        from edgeforge.distill.techniques.progressive import parse_layers
        from edgeforge.errors import BadInputError
        from edgeforge.train.loop import is_main_process

        try:
            stages = parse_layers(progressive) if progressive else ()
        except ValueError as e:
            raise BadInputError(f"--progressive: {e}") from None
        try:
            weights = tuple(float(w) for w in teacher_weights.split(",")) if teacher_weights else ()
        except ValueError:
            raise BadInputError(f"--teacher-weights: expected comma-separated numbers such as 0.5,0.5, found "
                                f"{teacher_weights!r}") from None

        cfg = DistillConfig(
            out=out, teacher=teacher, student_layers=student_layers, student_hidden=student_hidden,
            student_intermediate=student_intermediate, student_kv_heads=student_kv_heads, student_dir=student_dir,
            profile=profile, profiles_dirs=profiles_dirs, init=init, data=data, generate_answers=not no_generate,
            loss=loss, jsd_beta=jsd_beta, temperature=temperature, alpha=alpha, top_k=top_k,
            offline_teacher=offline_teacher, hidden_loss=hidden_loss, hidden_weight=hidden_weight,
            teacher_dtype=teacher_dtype, steps=steps, max_tokens=max_tokens, max_seconds=max_seconds, lr=lr,
            batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, parallel=parallel, seed=seed,
            checkpoint_every=checkpoint_every, resume=resume, eval_sequences=eval_sequences,
            eval_seq_len=eval_seq_len, cache_dir=cache_dir, progressive=stages, progressive_from=progressive_from,
            curriculum=curriculum, curriculum_pacing=curriculum_pacing, curriculum_start=curriculum_start,
            self_distill=self_distill, task=task, task_loss=task_loss, rationale_weight=rationale_weight,
            task_examples=task_examples, task_eval_examples=task_eval_examples, rationale_tokens=rationale_tokens,
            extra_teachers=extra_teachers, teacher_weights=weights, teacher_routing=teacher_routing,
            on_policy_ratio=on_policy_ratio, on_policy_tokens=on_policy_tokens)
        record = run_distill(cfg, log=None if as_json else _echo_err)
        if not is_main_process():
            return
        if as_json:
            click.echo(json.dumps(record_summary(record), indent=2, default=str))
            return
        click.echo(f"wrote {out} (student {record['student']['params'] / 1e6:.1f}M params; distill.json)")
        print_table(_rows_from_record(record))


def _rows_from_record(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model": "teacher", **record["teacher"]}, {"model": "initial student", **record["before"]},
            {"model": "distilled student", **record["after"]}]


def print_table(rows: list[dict[str, Any]]) -> None:
    """Teacher, initial and distilled student side by side."""
    click.echo(f"{'model':<48} {'perplexity':>10} {'KL(teacher||model)':>19} {'top-1':>7} {'retention':>9}")
    for r in rows:
        click.echo(f"{r['model'][:48]:<48} {r['perplexity']:>10.2f} {r['kl_to_teacher']:>19.4f} "
                   f"{r['top1_agreement']:>7.1%} {r['retention']:>9.3f}")
    click.echo("retention = teacher perplexity / model perplexity on the held-out text")


def eval_student(student_dir: Path, reference: str | None, data: Path | None, tokens: int, as_json: bool) -> None:
    """``edgeforge eval`` on a distilled student's HF directory: teacher / initial / distilled student.

    Without --data and --tokens the held-out set is the distill run's own (the built-in held-out prose, same number
    of sequences and length), so the initial student's row, read from distill.json, is measured on the same tokens.
    """
    from click.core import ParameterSource

    from edgeforge.data.builtin import read_text_data
    from edgeforge.distill.run import compare

    text = read_text_data(data) if data else None
    seq_len, n_seq = min(256, tokens), max(1, tokens // min(256, tokens))
    ctx = click.get_current_context(silent=True)
    record_path = student_dir / "distill.json"
    if ctx is not None and ctx.get_parameter_source("tokens") == ParameterSource.DEFAULT and record_path.is_file():
        info = json.loads(record_path.read_text(encoding="utf-8")).get("data", {})
        if info.get("heldout_sequences"):
            n_seq = int(info["heldout_sequences"])
            seq_len = int(info["heldout_tokens"]) // n_seq
    result = compare(student_dir, reference, text, n_seq=n_seq, seq_len=seq_len)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    click.echo(f"{student_dir} vs {result['teacher']} on {result['n_tokens']} held-out tokens")
    print_table(result["rows"])
