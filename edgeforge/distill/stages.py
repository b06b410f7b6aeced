"""The training of a distillation run, stage by stage: one stage normally; with --progressive several, each student
pruned from the previous stage's one and distilled from the teacher or from that previous student
(techniques.progressive). Each stage runs edgeforge.train.loop with the step of edgeforge.distill.step."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from edgeforge.distill.config import DistillConfig
from edgeforge.distill.context import RunContext
from edgeforge.distill.data import micro_batch_stream
from edgeforge.distill.evaluate import student_against_teacher
from edgeforge.distill.inputs import RunInputs
from edgeforge.distill.parallel import wrap_parallel
from edgeforge.distill.record import stage_flops
from edgeforge.distill.resume import write_state
from edgeforge.distill.step import StepCounters, make_step
from edgeforge.distill.student import (
    HiddenAlignment,
    StudentForKD,
    StudentStart,
    load_student,
    save_student,
)
from edgeforge.distill.teacher_signal import TrainingSignal


@dataclass
class StageProgress:
    """What the stages did so far; finished progressive stages carry over a resume through the state file."""

    records: list[dict[str, Any]]  # one per finished progressive stage (none for a one-stage run)
    curve: list[dict[str, Any]]  # the loss curve of all stages
    totals: dict[str, float]  # steps, tokens (all processes), seconds, flops
    counters: StepCounters = field(default_factory=StepCounters)
    # each finished stage's own loss curve, written back with its record whenever the state file is rewritten
    stage_curves: list[list[dict[str, Any]]] = field(default_factory=list)

    @classmethod
    def resumed(cls, state: dict[str, Any] | None) -> StageProgress:
        saved: list[dict[str, Any]] = list((state or {}).get("stages", []))
        # Copies without the curve: the state's own dicts keep theirs, so a second resume still has every stage's.
        records = [{k: v for k, v in r.items() if k != "loss_curve"} for r in saved]
        stage_curves = [list(r.get("loss_curve", [])) for r in saved]
        curve = [e for c in stage_curves for e in c]
        totals = {"steps": 0, "tokens": 0, "seconds": 0.0, "flops": 0.0}
        for r in records:
            for k in ("steps", "tokens", "seconds"):
                totals[k] += r["training"][k]
            totals["flops"] += r["training_flops"]
        return cls(records, curve, totals, stage_curves=stage_curves)

    def saved_stages(self) -> list[dict[str, Any]]:
        """The finished stages as the state file keeps them: each record with its own loss curve."""
        return [{**r, "loss_curve": c} for r, c in zip(self.records, self.stage_curves, strict=True)]


@dataclass
class Stage:
    """One stage about to train: its student, its signal teacher and where the student came from."""

    student: nn.Module
    teacher: nn.Module | None  # the stage's online teacher (None: the offline cache)
    teacher_params: int
    init: dict[str, Any]  # how the student was initialised (the InitReport, or "given")
    before: dict[str, Any] | None  # the student's held-out metrics before the stage


@dataclass
class TrainedStudent:
    student: nn.Module  # the last stage's student, unwrapped
    kd_module: nn.Module  # the module the loop trained (DDP- or FSDP-wrapped under torchrun)
    train_state: Any  # edgeforge.train.loop.TrainState of the last stage
    train_config: Any  # edgeforge.train.loop.TrainConfig of the last stage
    progress: StageProgress
    training_peak_rss_bytes: int = 0  # set by run_distill, which samples the resident memory around training


def train_stages(ctx: RunContext, inputs: RunInputs, stages: list[tuple[Any, int]], start: StudentStart,
                 signal: TrainingSignal, state: dict[str, Any] | None, order: Tensor | None,
                 align: HiddenAlignment) -> TrainedStudent:
    """Train every (student shape, optimizer steps) stage of ``stages`` not finished before an interruption."""
    progress = StageProgress.resumed(state)
    progressive = len(stages) > 1
    student = start.take_student()
    kd_module: nn.Module = student
    st = tcfg = None
    for i, (shape, steps) in enumerate(stages):
        if i < len(progress.records):  # finished before an interruption: its distilled student is on disk
            student = load_student(ctx.checkpoint_dir / f"stage-{i}-student", ctx.device)
            continue
        if i == 0:
            before = state["before"] if state else None
            stage = Stage(student, signal.teacher, signal.teacher_params, start.init, before)
        else:
            stage = _pruned_stage(ctx, inputs, student, shape, signal)
            student = stage.student
            stage.before = _stage_before(ctx, inputs, stage, shape, i, len(stages))
        label = f"stage {i + 1}/{len(stages)}: " if progressive else ""
        before_forwards, before_gen = progress.counters.teacher_forwards, progress.counters.generated_tokens
        stage_ckpt = ctx.checkpoint_dir / f"stage-{i}" if progressive else ctx.checkpoint_dir
        st, tcfg, kd_module = train_stage(ctx, inputs, stage, signal, order, steps, stage_ckpt, align,
                                          progress.counters, label, step_offset=sum(n for _, n in stages[:i]))
        ctx.passes["training"] += progress.counters.teacher_forwards - before_forwards
        flops = _count_stage(ctx, progress, stage, signal, st, progress.counters.generated_tokens - before_gen,
                             i + 1 if progressive else None)
        if progressive:
            rec = _stage_record(ctx, stage, shape, i, st, flops)
            if i + 1 < len(stages):  # the last stage's "after" is the run's (measured by the caller)
                _finish_intermediate_stage(ctx, inputs, stage, rec, st, state, progress, i, len(stages))
            progress.records.append(rec)
            progress.stage_curves.append(labeled_curve(st.loss_curve, i + 1))
        del stage  # a previous student serving as this stage's teacher is not needed by the next one
    assert st is not None and tcfg is not None
    return TrainedStudent(student, kd_module, st, tcfg, progress)


def labeled_curve(curve: list[dict[str, Any]], stage_number: int | None) -> list[dict[str, Any]]:
    """A stage's loss curve entries with their 1-based ``stage`` (progressive runs; unchanged for one stage)."""
    return [{**e, "stage": stage_number} if stage_number else e for e in curve]


def _pruned_stage(ctx: RunContext, inputs: RunInputs, previous: nn.Module, shape: Any,
                  signal: TrainingSignal) -> Stage:
    """The next progressive stage: ``previous`` (the last stage's student) pruned to ``shape``; it teaches the new
    student itself with --progressive-from previous."""
    from edgeforge.distill.prune import count_params, init_student

    cfg = ctx.cfg
    student, rep = init_student(previous, shape, "auto", inputs.data.train[: cfg.calib_sequences], seed=cfg.seed)
    student = student.to(ctx.device).requires_grad_(True)
    if cfg.progressive_from == "previous":
        teacher = previous.to(signal.dtype).eval().requires_grad_(False)
        return Stage(student, teacher, count_params(previous), rep.to_dict(), None)
    return Stage(student, signal.teacher, signal.teacher_params, rep.to_dict(), None)


def _stage_before(ctx: RunContext, inputs: RunInputs, stage: Stage, shape: Any, i: int,
                  n_stages: int) -> dict[str, Any]:
    """The pruned student's held-out metrics before its stage trains."""
    t0 = time.perf_counter()
    before = student_against_teacher(stage.student, inputs.teacher, inputs.data.heldout, ctx.device)
    ctx.passes["evaluation"] += len(inputs.data.heldout)
    ctx.say(f"stage {i + 1}/{n_stages}: {shape.layers} layers pruned from the previous student (kept "
            f"{stage.init.get('kept_layers')}), KL {before['kl_to_teacher']:.3f} ({time.perf_counter() - t0:.0f} s)")
    return before


def _train_config(cfg: DistillConfig, steps: int, world: int) -> Any:
    """The loop's TrainConfig for a stage of ``steps``: progressive stages split the token and time budgets like the
    steps."""
    from edgeforge.train.loop import TrainConfig

    share = steps / cfg.steps
    return TrainConfig(steps=steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None
                       else min(10, max(1, steps // 10)), grad_accum=cfg.grad_accum, seed=cfg.seed,
                       checkpoint_every=cfg.checkpoint_every,
                       max_tokens=None if cfg.max_tokens is None else math.ceil(cfg.max_tokens * share / world),
                       max_seconds=None if cfg.max_seconds is None else cfg.max_seconds * share)


def train_stage(ctx: RunContext, inputs: RunInputs, stage: Stage, signal: TrainingSignal, order: Tensor | None,
                steps: int, ckpt_dir: Path, align: HiddenAlignment, counters: StepCounters,
                label: str, step_offset: int = 0) -> tuple[Any, Any, nn.Module]:
    """Train the stage's student for ``steps`` optimizer steps, on the data stream from ``step_offset`` (the steps
    of earlier stages) on; returns (TrainState, TrainConfig, the trained module)."""
    from edgeforge.train.loop import train

    cfg, world, tokenizer = ctx.cfg, ctx.world, inputs.tokenizer
    teachers = [stage.teacher, *signal.extras] if stage.teacher is not None else []
    kd_module = wrap_parallel(StudentForKD(stage.student, [s for s, _ in align.pairs], align.projector),
                              cfg.parallel, world, ctx.device)
    step_fn = make_step(cfg, kd_module, stage.student, teachers, signal.weights, signal.cache, align.pairs, counters)
    tcfg = _train_config(cfg, steps, world)
    mode = "online" if signal.cache is None else "offline"
    ctx.say(f"{label}distilling: {cfg.loss}{f' over the top-{cfg.top_k}' if cfg.top_k else ''}, {mode} teacher"
            f"{f's x {len(teachers)} ({cfg.teacher_routing})' if len(teachers) > 1 else ''}, {steps} steps x "
            f"{cfg.batch_size * cfg.grad_accum * world} sequences x {cfg.seq_len} tokens on {ctx.device.type}"
            + (f" x {world} processes ({cfg.parallel})" if world > 1 else ""))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = micro_batch_stream(inputs.data.train, cfg, ctx.rank, world, steps, order, inputs.task, pad,
                                 step_offset=step_offset)
    st = train(kd_module, step_fn, batches, tcfg, ckpt_dir if cfg.checkpoint_every else None, resume=cfg.resume,
               desc="distill", on_log=ctx.on_log)
    return st, tcfg, kd_module


def _count_stage(ctx: RunContext, progress: StageProgress, stage: Stage, signal: TrainingSignal, st: Any,
                 generated_tokens: int, stage_number: int | None) -> float:
    """Add a trained stage to the totals and the loss curve (its points tagged with ``stage_number`` when the run is
    progressive); returns the stage's training FLOPs."""
    from edgeforge.distill.prune import count_params

    world = ctx.world
    teacher_params = [stage.teacher_params] * (stage.teacher is not None) + [count_params(x) for x in signal.extras]
    flops = stage_flops(st.tokens * world, count_params(stage.student), teacher_params, generated_tokens,
                        progress.counters.task_tokens)
    for k, v in (("steps", st.step), ("tokens", st.tokens * world), ("seconds", st.seconds), ("flops", flops)):
        progress.totals[k] += v
    progress.curve += labeled_curve(st.loss_curve, stage_number)
    return flops


def _stage_record(ctx: RunContext, stage: Stage, shape: Any, i: int, st: Any, flops: float) -> dict[str, Any]:
    """A progressive stage as the record's ``progressive.stages`` lists it."""
    from edgeforge.distill.prune import count_params

    return {"stage": i + 1, "layers": shape.layers, "params": count_params(stage.student),
            "teacher": "teacher" if i == 0 or ctx.cfg.progressive_from == "teacher" else f"stage {i} student",
            "teacher_params": stage.teacher_params, "kept_layers": stage.init.get("kept_layers"),
            "training": {"steps": st.step, "tokens": st.tokens, "seconds": round(st.seconds, 2)},
            "training_flops": flops, "before": stage.before}


def _finish_intermediate_stage(ctx: RunContext, inputs: RunInputs, stage: Stage, rec: dict[str, Any], st: Any,
                               state: dict[str, Any] | None, progress: StageProgress, i: int, n_stages: int) -> None:
    """A stage before the last: measure its student, save it and the state, so that a resume starts the next stage."""
    rec["after"] = student_against_teacher(stage.student, inputs.teacher, inputs.data.heldout, ctx.device)
    ctx.passes["evaluation"] += len(inputs.data.heldout)
    save_student(stage.student, ctx.checkpoint_dir / f"stage-{i}-student", inputs.teacher.hf_dir)
    assert state is not None
    state["stages"] = [*progress.saved_stages(), {**rec, "loss_curve": labeled_curve(st.loss_curve, i + 1)}]
    write_state(ctx.state_path, state)
    ctx.say(f"stage {i + 1}/{n_stages} ({rec['layers']} layers) after: KL "
            f"{rec['after']['kl_to_teacher']:.3f}, perplexity {rec['after']['perplexity']:.2f}")
