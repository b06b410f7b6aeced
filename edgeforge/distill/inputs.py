"""What a distillation run distils from, gathered before any weights load: the teacher and the extra teachers, the
teacher's tokenizer, the student's target shape, the task (--task) and the data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeforge.distill.context import RunContext
from edgeforge.distill.data import DistillData, prepare_data
from edgeforge.distill.student import student_shape
from edgeforge.distill.teacher import Teacher, resolve_teachers


@dataclass
class RunInputs:
    teacher: Teacher
    extras: list[Teacher]  # --extra-teacher, each checked to share the teacher's vocabulary
    tokenizer: Any  # the teacher's
    shape: Any  # the student's target StudentShape; None with a given student (--student-dir)
    task: Any  # the edgeforge.distill.techniques.rationale.DistillTask of --task, or None
    data: DistillData


def load_inputs(ctx: RunContext) -> RunInputs:
    """Resolve the teachers, check the vocabularies and the memory the run needs (a run that cannot fit fails now,
    in one line), then prepare the task and the data."""
    from transformers import AutoTokenizer

    cfg = ctx.cfg
    teacher, extras = resolve_teachers(cfg.teacher, cfg.extra_teachers, cfg.student_dir, ctx.main)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher.hf_dir))
    shape = student_shape(cfg, teacher) if cfg.student_dir is None else None
    if ctx.main:  # before any weights load
        from edgeforge.train.preflight import check_distill_memory

        check_distill_memory(teacher.hf_dir, cfg.student_dir, shape, cfg.batch_size, cfg.seq_len, ctx.device.type)
    task = None
    if cfg.task is not None:
        from edgeforge.distill.techniques.rationale import prepare_task

        task = prepare_task(cfg, tokenizer, teacher, ctx.cache_root, ctx.say)
    data = prepare_data(cfg, tokenizer, teacher, ctx.cache_root, ctx.main, ctx.say, task.kd_docs if task else ())
    ctx.say(f"data: {data.info['train_sequences']} training sequences x {cfg.seq_len} tokens, "
            f"{data.info['heldout_sequences']} held-out x {data.heldout.shape[1]}")
    return RunInputs(teacher, extras, tokenizer, shape, task, data)
