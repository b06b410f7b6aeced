"""Knowledge distillation: a smaller student learns the teacher's next-token distributions.

``run_distill(DistillConfig)`` does the whole stage and returns the record written as ``OUT/distill.json``:

1. the teacher (HF dir, GGUF or alias; a GGUF is dequantized once into an HF directory) and the data (``--data``
   files, or the built-in prose plus the teacher's own answers to built-in prompts), packed into sequences with a
   held-out split (edgeforge.distill.inputs, .teacher, .data);
2. the student: pruned from the teacher (edgeforge.distill.prune), a random one, or the user's, checked to share the
   teacher's vocabulary before anything expensive runs (edgeforge.distill.student);
3. the teacher's held-out metrics and the initial student's (``before``, edgeforge.distill.evaluate);
4. training with edgeforge.train.loop (edgeforge.distill.stages): the teacher runs inside the loop (online) or its
   top-k log-probabilities come from a cache computed once (offline; edgeforge.distill.teacher_signal);
5. the distilled student's metrics (``after``), the student saved as an HF directory with the teacher's tokenizer,
   and the record (edgeforge.distill.record).

Under ``torchrun`` every process runs this; ``parallel`` chooses how the student is spread over them: ``ddp`` (a full
replica per process, gradients all-reduced) or ``fsdp`` (FSDP2: parameters, gradients and optimizer state sharded
over the processes, each decoder layer gathered only while it computes). One process: no wrapping either way
(edgeforge.distill.parallel).

Metrics, on held-out text, all against the teacher in fp32: ``kl_to_teacher`` = mean over positions of
KL(teacher || model); ``perplexity`` = exp(mean next-token NLL); ``top1_agreement`` = share of positions whose most
likely token is the teacher's. ``retention`` = teacher perplexity / model perplexity (1.0: predicts the held-out
text as well as the teacher); ``kl_gap_closed`` = 1 - KL_after / KL_before.

Techniques on top of plain KD (docs/techniques.md), each off by default: progressive stages (the stage loop of
edgeforge.distill.stages, techniques.progressive), a curriculum (techniques.curriculum, in
``data.micro_batch_stream``), self-distillation (``data.prepare_data``), a task with answer / rationale terms
(edgeforge.distill.techniques.rationale), several teachers (techniques.multi_teacher) and on-policy micro-batches
(techniques.on_policy); the per-micro-batch loss is edgeforge.distill.step.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

import torch
from torch import Tensor, nn

from edgeforge.distill.config import DistillConfig
from edgeforge.distill.context import Log, OnLog, RunContext
from edgeforge.distill.data import DistillData, rows_for_run
from edgeforge.distill.evaluate import evaluate, student_against_teacher, task_accuracy
from edgeforge.distill.inputs import RunInputs, load_inputs
from edgeforge.distill.memory import RssSampler, peak_rss_bytes, release_freed_memory
from edgeforge.distill.parallel import barrier, check_world, trained_student
from edgeforge.distill.record import core_record, stopped_by, technique_records
from edgeforge.distill.resume import check_out_dir, read_state, write_state
from edgeforge.distill.stages import TrainedStudent, train_stages
from edgeforge.distill.student import hidden_alignment_setup, initial_student, save_student
from edgeforge.distill.teacher import config_param_count, has_tokenizer
from edgeforge.distill.teacher_signal import TrainingSignal, training_signal


def run_distill(cfg: DistillConfig, log: Log | None = None, on_log: OnLog | None = None) -> dict[str, Any]:
    """Distill and write ``cfg.out`` (student + distill.json); returns the record. Under torchrun every process
    calls this; the main process alone writes, evaluates and builds caches.

    The techniques of docs/techniques.md plug in here: --progressive runs several stages one after the other, each
    pruned from the previous stage's student; the curriculum orders the batches; extra teachers, on-policy batches
    and the task term live in the step (edgeforge.distill.step)."""
    from edgeforge.distill.prune import count_params
    from edgeforge.distill.techniques.progressive import stage_plan

    t_run = time.perf_counter()
    ctx = start_run(cfg, log, on_log)
    inputs = load_inputs(ctx)
    t_model = inputs.teacher.load(torch.float32, ctx.device)
    teacher_params = count_params(t_model)
    stages = stage_plan(cfg, inputs.shape, int(t_model.config.num_hidden_layers))
    start = initial_student(ctx, t_model, stages[0][0], inputs.data.train)
    state = measure_before(ctx, inputs, start.student, t_model)
    if cfg.steps == 0:
        return prune_only(ctx, inputs, start.student, start.init, state, t_run)
    order, curriculum = curriculum_for(ctx, inputs.data, t_model, start.student)
    signal = training_signal(ctx, inputs.teacher, inputs.extras, t_model, teacher_params, inputs.data)
    del t_model  # online, the signal holds the teacher now; offline, nothing needs it any more
    release_freed_memory()
    align = hidden_alignment_setup(cfg, start, inputs.teacher.hf_dir, ctx.device)
    with RssSampler() as training_rss:
        trained = train_stages(ctx, inputs, stages, start, signal, state, order, align)
    trained.training_peak_rss_bytes = training_rss.peak_bytes
    signal.release()
    student = trained_student(cfg, trained.kd_module, trained.student, ctx.world, ctx.main)
    if not ctx.main:
        barrier()
        return {"rank": ctx.rank, "loss_curve": trained.progress.curve,
                "teacher_forward_passes": ctx.passes["training"]}
    assert student is not None and state is not None
    record = final_record(ctx, inputs, student, start.init, signal, trained, state, curriculum)
    record["seconds_total"] = round(time.perf_counter() - t_run, 1)
    (ctx.out / "distill.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)  # done: the student is saved; the checkpoint was for resuming
    ctx.state_path.unlink(missing_ok=True)
    after = record["after"]
    ctx.say(f"after: student KL {after['kl_to_teacher']:.3f}, perplexity {after['perplexity']:.2f}, top-1 "
            f"{after['top1_agreement']:.1%}; {record['training']['tokens_per_s']:.0f} tokens/s")
    barrier()
    return record


def start_run(cfg: DistillConfig, log: Log | None, on_log: OnLog | None) -> RunContext:
    """This process's place in the run (torchrun or alone), its device and seed; the checks that need no model."""
    from edgeforge.paths import edgeforge_home
    from edgeforge.train.loop import dist_init, is_main_process, pick_device

    rank, world = dist_init()
    main = is_main_process()
    say: Log = (log or (lambda _m: None)) if main else (lambda _m: None)
    device = pick_device()
    torch.manual_seed(cfg.seed)
    ctx = RunContext(cfg, rank, world, main, device, say, on_log, cfg.cache_dir or (edgeforge_home() / "kd-cache"))
    check_world(cfg, world)
    if main:
        check_out_dir(cfg, ctx.checkpoint_dir, ctx.state_path)
    return ctx


def measure_before(ctx: RunContext, inputs: RunInputs, student: nn.Module, t_model: nn.Module) -> dict[str, Any] | None:
    """The run's state: the teacher's and the initial student's held-out metrics (and task accuracy), measured by
    the main process against the fp32 ``t_model`` and written to the state file; kept as they were across a resume.
    None on the other processes of a fresh run."""
    state = read_state(ctx.cfg, ctx.state_path)
    if not ctx.main or state is not None:
        return state
    t0 = time.perf_counter()
    student.eval()
    m = evaluate({"student": student}, t_model, inputs.data.heldout)
    ctx.passes["evaluation"] += len(inputs.data.heldout)
    state = {"fingerprint": ctx.cfg.fingerprint(), "teacher": m["teacher"], "before": m["student"]}
    if inputs.task is not None:
        state["task_before"] = task_accuracy(student, inputs.tokenizer, inputs.task)
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_state(ctx.state_path, state)
    ctx.say(f"before: teacher perplexity {m['teacher']['perplexity']:.2f}; student KL "
            f"{m['student']['kl_to_teacher']:.3f}, perplexity {m['student']['perplexity']:.2f}, top-1 "
            f"{m['student']['top1_agreement']:.1%}"
            + (f", task accuracy {state['task_before']['task_accuracy']:.1%}" if inputs.task is not None else "")
            + f" ({time.perf_counter() - t0:.0f} s)")
    return state


def curriculum_for(ctx: RunContext, data: DistillData, t_model: nn.Module,
                   student: nn.Module) -> tuple[Tensor | None, dict[str, Any] | None]:
    """(the training sequences easy -> hard [N], what the record says) under --curriculum; (None, None) without.
    The pool: exactly the sequences a plain run with this budget would visit."""
    from edgeforge.distill.techniques.curriculum import curriculum_order

    cfg = ctx.cfg
    if cfg.curriculum == "none":
        return None, None
    pool = torch.tensor(sorted(rows_for_run(len(data.train), cfg, ctx.world)), dtype=torch.long)
    order, curriculum = curriculum_order(cfg, t_model, student, data.train, pool)
    ctx.say(f"curriculum: {len(pool)} sequences ordered by {cfg.curriculum} ({curriculum['scoring_seconds']:.0f} s)"
            f", {cfg.curriculum_pacing} pacing from {cfg.curriculum_start:.0%}")
    return order, curriculum


def final_record(ctx: RunContext, inputs: RunInputs, student: nn.Module, init: dict[str, Any],
                 signal: TrainingSignal, trained: TrainedStudent, state: dict[str, Any],
                 curriculum: dict[str, Any] | None) -> dict[str, Any]:
    """Measure the distilled student against the fp32 teacher (``after``), save it, and build the record."""
    from edgeforge.distill.prune import count_params

    cfg, teacher, progress = ctx.cfg, inputs.teacher, trained.progress
    student = student.to(ctx.device)
    after = student_against_teacher(student, teacher, inputs.data.heldout, ctx.device)
    ctx.passes["evaluation"] += len(inputs.data.heldout)
    save_student(student, ctx.out, teacher.hf_dir if cfg.student_dir is None or not has_tokenizer(cfg.student_dir)
                 else cfg.student_dir)
    totals = progress.totals
    tokens_all = int(totals["tokens"])
    training = {"steps": int(totals["steps"]), "tokens": tokens_all, "seconds": round(totals["seconds"], 2),
                "tokens_per_s": round(tokens_all / max(totals["seconds"], 1e-9), 1), "world_size": ctx.world,
                "parallel": cfg.parallel if ctx.world > 1 else "none",
                "device": ctx.device.type,
                # sampled over the training steps alone, and the process's high-water mark (data and evaluation too)
                "training_peak_rss_bytes": trained.training_peak_rss_bytes,
                "process_peak_rss_bytes": max(peak_rss_bytes(), trained.training_peak_rss_bytes),
                "stopped_by": stopped_by(trained.train_state, trained.train_config)}
    record = core_record(cfg, teacher, state, init, inputs.data.info, signal.info, ctx.passes, training,
                         progress.curve, after, totals["flops"] + (curriculum or {}).get("scoring_flops", 0.0))
    record.update(technique_records(cfg, progress.records, curriculum, progress.counters, inputs.extras, teacher,
                                    signal.weights, init, after))
    task = inputs.task
    if task is not None:
        record["task"] = {**task.info, "before": state["task_before"],
                          "after": task_accuracy(student, inputs.tokenizer, task)}
        ctx.say(f"task accuracy {record['task']['before']['task_accuracy']:.1%} -> "
                f"{record['task']['after']['task_accuracy']:.1%}")
    record["teacher"]["params"] = config_param_count(teacher.hf_dir)
    record["student"]["params"] = count_params(student)
    return record


def prune_only(ctx: RunContext, inputs: RunInputs, student: nn.Module, init: dict[str, Any],
               state: dict[str, Any] | None, t_run: float) -> dict[str, Any]:
    """``--steps 0``: the initial (pruned) student is the output, saved with a record whose ``after`` is its
    ``before`` (nothing was trained, so nothing is measured twice)."""
    from edgeforge.distill.prune import count_params

    if not ctx.main:
        barrier()
        return {"rank": ctx.rank, "loss_curve": [], "teacher_forward_passes": 0}
    assert state is not None
    cfg, teacher = ctx.cfg, inputs.teacher
    save_student(student, ctx.out, teacher.hf_dir if cfg.student_dir is None or not has_tokenizer(cfg.student_dir)
                 else cfg.student_dir)
    training = {"steps": 0, "tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0, "world_size": ctx.world,
                "parallel": "none", "device": ctx.device.type, "training_peak_rss_bytes": 0,
                "process_peak_rss_bytes": peak_rss_bytes(), "stopped_by": "steps"}
    signal_info = {"mode": "none", "note": "--steps 0: pruned only, no teacher signal"}
    record = core_record(cfg, teacher, state, init, inputs.data.info, signal_info, ctx.passes, training, [],
                         state["before"], 0.0)
    if inputs.task is not None:
        record["task"] = {**inputs.task.info, "before": state["task_before"], "after": state["task_before"]}
    record["teacher"]["params"] = config_param_count(teacher.hf_dir)
    record["student"]["params"] = count_params(student)
    record["seconds_total"] = round(time.perf_counter() - t_run, 1)
    (ctx.out / "distill.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    ctx.state_path.unlink(missing_ok=True)
    ctx.say(f"--steps 0: the pruned student ({record['student']['params'] / 1e6:.0f}M parameters) saved untrained")
    barrier()
    return record
