"""The fine-tune stage: LoRA (or DoRA / QLoRA) on the build's task, merged into the model the exports read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeforge.build.stage import BuildContext, BuildState

#: The parts of the fine-tuning record that the build keeps (the ship folder's records/finetune.json).
KEPT_RECORD_FIELDS = ("before", "after", "forgetting", "accuracy_by_step", "loss_curve", "train_tokens",
                      "train_seconds", "merge", "config", "data")


@dataclass
class FinetuneStage:
    """``base``: "teacher" (the build's teacher) or "student" (the distill stage's output, named in ``upstream``)."""

    ctx: BuildContext
    upstream: dict[str, Any]
    base: str
    teacher_first: bool = False  # fine-tune-then-distill: the teacher, before the student is distilled from it

    @property
    def name(self) -> str:
        return "finetune-teacher" if self.teacher_first else "finetune"

    @property
    def note(self) -> str:
        f = self.ctx.cfg.finetune
        return f"{f.method} rank {f.rank} on {self.ctx.cfg.task}, {f.steps} steps, merged"

    def settings(self) -> dict[str, Any]:
        ctx = self.ctx
        # gradient_checkpointing changes memory and time, not the trained weights (the same gradients, recomputed
        # with the RNG state preserved): a cached fine-tune stays valid either way, so it is not in the key.
        return {**ctx.cfg.finetune.model_dump(exclude={"enabled", "gradient_checkpointing"}), "task": ctx.task_identity,
                "seed": ctx.cfg.seed,
                "base": self.base, "eval_examples": ctx.finetune_config().eval_examples}

    def inputs(self) -> dict[str, Any]:
        return self.upstream

    def run(self, stage_dir: Path, state: BuildState) -> dict[str, Any]:
        from edgeforge.finetune.run import run_finetune

        ctx = self.ctx
        out = stage_dir / "model"
        model = str(ctx.teacher_hf_dir() if self.base == "teacher" else state.model_dir)
        resume = (out / "checkpoint").is_dir()
        if resume:
            ctx.log("finetune: resuming the interrupted run from its last checkpoint")
        task = None if ctx.task_path else ctx.cfg.task
        record = run_finetune(model, out, ctx.finetune_config(), task=task, data=ctx.task_path, merge=True,
                              resume=resume, log=ctx.log)
        keep = {k: record.get(k) for k in KEPT_RECORD_FIELDS}
        return {"model_dir": str(out), "record": keep, "record_file": str(out / "finetune.json")}

    def absorb(self, record: dict[str, Any], state: BuildState) -> None:
        state.model_dir = Path(record["model_dir"])
        state.lineage_stages.append(self.name)
        # The fine-tuned teacher is not what the exports come from (the student distilled from it is): its record
        # is the reference shown beside the student, never the exports' source scores (build.task_set).
        if self.teacher_first:
            state.teacher_finetune = record["record"]
        else:
            state.finetune = record["record"]
            merge = state.finetune.get("merge") or {}
            state.source_scores = {"model": "merged model (fine-tuning record)", **merge} if merge else None
