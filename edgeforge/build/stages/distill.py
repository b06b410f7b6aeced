"""The distill stage: the plan's student trained from the teacher (or from the fine-tuned teacher, on the task's
examples, when the pipeline orders fine-tune-then-distill)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeforge.build.config import BUILD_ONLY_DISTILL_SETTINGS
from edgeforge.build.stage import BuildContext, BuildState
from edgeforge.build.task_set import held_out_task_examples, score_model_dir


@dataclass
class DistillStage:
    """``upstream``: the teacher's identity, or ``{"teacher": key}`` of the fine-tuned teacher it reads."""

    ctx: BuildContext
    upstream: dict[str, Any]
    teacher_from: str | None = None  # the model stage whose output is the teacher; None: the build's teacher

    name = "distill"

    @property
    def note(self) -> str:
        d = self.ctx.cfg.distill
        return (f"{self.ctx.student_shape()['layers']}-layer student, {d.steps} steps, {d.loss}"
                + (", teacher = the fine-tuned teacher, task data" if self.teacher_from else ""))

    def settings(self) -> dict[str, Any]:
        """Every setting, and the content of every input the run reads: the data, the task (as training data after
        a fine-tuned teacher, or for a task loss), each extra teacher (by content, not by path)."""
        ctx, d = self.ctx, self.ctx.cfg.distill
        reads_task = self.teacher_from is not None or d.task_loss != "none"
        settings = {**d.model_dump(exclude=BUILD_ONLY_DISTILL_SETTINGS), "student": ctx.student_shape(),
                    "seed": ctx.cfg.seed, "data": ctx.data_identity,
                    "task_data": ctx.task_identity if reads_task else None}
        if self.teacher_from is not None:  # the stage scores its student on the fixed set (run)
            settings["fixed_set_examples"] = len(held_out_task_examples(ctx))
            settings["generated_task_examples"] = generated_count(ctx)
        if d.extra_teachers:
            settings["extra_teacher_identities"] = [extra_teacher_identity(t) for t in d.extra_teachers]
        return settings

    def inputs(self) -> dict[str, Any]:
        return self.upstream

    def run(self, stage_dir: Path, state: BuildState) -> dict[str, Any]:
        from edgeforge.distill.record import record_summary
        from edgeforge.distill.run import run_distill

        ctx = self.ctx
        out = stage_dir / "student"
        teacher = str(ctx.teacher_ref.path)
        data = tuple(ctx.data_files)
        if self.teacher_from is not None:
            teacher = str(state.model_dir)
            data = (*data, task_chat_jsonl(ctx, stage_dir / "task-train.jsonl"))
        resume = (out / ".checkpoint").is_dir()
        if resume:
            ctx.log("distill: resuming the interrupted run from its last checkpoint")
        record = run_distill(ctx.distill_config(out, teacher, data, resume), log=ctx.log)
        result = {"model_dir": str(out), "record": record_summary(record),
                  "loss_curve": record.get("loss_curve", []), "record_file": str(out / "distill.json")}
        examples = held_out_task_examples(ctx) if self.teacher_from is not None else []
        if examples:
            # The last model stage: its student is what the exports come from, so it is scored here, once, on the
            # fixed set every artifact is scored on (cached with the stage, not re-measured by every export).
            result["fixed_set_scores"] = score_model_dir(out, examples, ctx.log)
        return result

    def absorb(self, record: dict[str, Any], state: BuildState) -> None:
        state.model_dir = Path(record["model_dir"])
        state.lineage_stages.append(self.name)
        state.distill = {**record["record"], "loss_curve": record["loss_curve"]}
        if record.get("fixed_set_scores"):
            state.source_scores = {"model": "distilled student", **record["fixed_set_scores"]}


def extra_teacher_identity(name: str) -> dict[str, Any]:
    """An extra teacher by content (the files of its directory, or its GGUF), as the build's teacher is."""
    from edgeforge.fileio import content_identity
    from edgeforge.models.refs import resolve_model

    return content_identity(resolve_model(name).path)


def generated_count(ctx: BuildContext) -> int:
    """How many generated task examples join the distillation data: ``distill.generated_task_examples`` for a
    built-in task, none for a task file (there is no generator to draw from)."""
    return 0 if ctx.task_path is not None or ctx.cfg.task is None else ctx.cfg.distill.generated_task_examples


def task_chat_jsonl(ctx: BuildContext, path: Path) -> Path:
    """The task's training examples as chat JSONL, plus ``generated_count`` more drawn from a built-in task's
    training distribution: distillation data for fine-tune-then-distill (the fine-tuned teacher's logits on them
    are the signal)."""
    from edgeforge.tasks import generated_training_examples
    from edgeforge.tasks.examples import load_task_examples

    train, _, _ = load_task_examples(None if ctx.task_path else ctx.cfg.task, ctx.task_path, ctx.cfg.seed)
    n = generated_count(ctx)
    if n:
        assert ctx.cfg.task is not None
        train = train + generated_training_examples(ctx.cfg.task, n, ctx.cfg.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": ex["messages"]}) + "\n" for ex in train), encoding="utf-8")
    return path
