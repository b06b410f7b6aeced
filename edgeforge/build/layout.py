"""Which stages a build runs, in order, each laid out once what it reads is known.

The plan decides the model stages: fine-tune when the teacher fits and is fast enough on the device, distill (then
fine-tune the student) when it is not; a pipeline file may choose fine-tune-then-distill instead. The model stages'
keys chain (each names the key of the stage it reads), so all of them are laid out up front. The exports read the
model stages' outputs (the model's config sizes the GGUF fallback types) and the bench stage reads the verified
artifacts, so those are laid out only after the stages before them have been absorbed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edgeforge.build.stage import BuildContext, BuildState, Stage, key_of
from edgeforge.build.stages.bench import bench_stage
from edgeforge.build.stages.distill import DistillStage
from edgeforge.build.stages.export import export_formats, export_with_fallback
from edgeforge.build.stages.finetune import FinetuneStage
from edgeforge.errors import BadInputError


def decide(ctx: BuildContext) -> tuple[bool, bool, str]:
    """(distill?, fine-tune?, order) from the plan and the pipeline settings."""
    cfg = ctx.cfg
    distill = cfg.distill.enabled if cfg.distill.enabled is not None else ctx.plan.decision.startswith("distill")
    finetune = cfg.finetune.enabled if cfg.finetune.enabled is not None else cfg.task is not None
    if finetune and cfg.task is None:
        raise BadInputError("finetune.enabled is true but no task is given: pass --task NAME|PATH")
    if distill and ctx.plan.student is None and cfg.distill.student_layers is None:
        raise BadInputError(f"the plan found no student for {ctx.profile.name}: {ctx.plan.reason}")
    order = cfg.order
    if order == "auto":
        # Measured by benchmarks/pipelines.py (README, Build): with a task, fine-tuning the teacher first and
        # distilling the fine-tuned teacher into the student on task data keeps the most of the task skill.
        order = "finetune-then-distill" if distill and finetune else "distill-then-finetune"
    if order == "finetune-then-distill" and not (distill and finetune):
        raise BadInputError("order: finetune-then-distill needs both stages; this build runs "
                            f"{'distillation' if distill else 'no distillation'} and "
                            f"{'fine-tuning' if finetune else 'no fine-tuning'}")
    return distill, finetune, order


def model_stages(ctx: BuildContext) -> list[Stage]:
    """The model stages in order; each one's inputs name the key of the stage it reads."""
    distill, finetune, order = decide(ctx)
    upstream: dict[str, Any] = {"teacher": ctx.teacher_identity}
    if order == "finetune-then-distill":
        teacher = FinetuneStage(ctx, upstream, base="teacher", teacher_first=True)
        return [teacher, DistillStage(ctx, {"teacher": key_of(teacher)}, teacher_from="finetune-teacher")]
    stages: list[Stage] = []
    if distill:
        student = DistillStage(ctx, upstream)
        stages.append(student)
        upstream = {"model": key_of(student)}
    if finetune:
        stages.append(FinetuneStage(ctx, upstream, base="student" if distill else "teacher"))
    return stages


def layout(ctx: BuildContext, state: BuildState) -> Iterator[Stage]:
    """Every stage of the build, each yielded after the ones before it were absorbed into ``state``.

    Under ``--dry-run`` a stage that has not run leaves ``state.pending`` set, and what reads its outputs is not
    laid out."""
    models = model_stages(ctx)
    yield from models
    if state.pending:
        return
    if not models:
        state.model_dir = ctx.teacher_hf_dir()
    upstream_key = key_of(models[-1]) if models else str(ctx.teacher_identity)
    for fmt in export_formats(ctx):
        yield from export_with_fallback(ctx, state, fmt, upstream_key)
    if state.pending:
        return
    bench = bench_stage(ctx, state)
    if bench is not None:
        yield bench
