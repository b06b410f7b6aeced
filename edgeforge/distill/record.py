"""The record of a distillation run (``OUT/distill.json``): what went in, what each technique measured, the metrics
before and after, the training FLOPs; and its headline (``record_summary``)."""

from __future__ import annotations

from typing import Any

from edgeforge.distill.config import DistillConfig
from edgeforge.distill.evaluate import KL_GAP_DEFINITION, RETENTION_DEFINITION
from edgeforge.distill.teacher import Teacher

FLOPS_ACCOUNTING = ("6 N_student per training token + 2 N per teacher forward token (each teacher) + 2 N_student per "
                    "token the student samples (on-policy) + 6 N_student per supervised task token + 2 N per token "
                    "scored for the curriculum; N = all parameters")


def stage_flops(tokens: int, student_params: int, teacher_params: list[int], generated_tokens: int,
                task_tokens: int) -> float:
    """Training FLOPs of a stage (FLOPS_ACCOUNTING): training_cost.training_flops for the distillation tokens, plus
    the student's sampling and the supervised task tokens."""
    from edgeforge.plan.training_cost import training_flops

    return (training_flops("distill", tokens, student_params, sum(teacher_params))
            + 2.0 * student_params * generated_tokens + 6.0 * student_params * task_tokens)


def stopped_by(train_state: Any, train_config: Any) -> str:
    """Which budget ended the training loop (edgeforge.train.loop TrainState / TrainConfig)."""
    if train_state.step >= train_config.steps:
        return "steps"
    if train_config.max_tokens is not None and train_state.tokens >= train_config.max_tokens:
        return "max_tokens"
    return "max_seconds"


def core_record(cfg: DistillConfig, teacher: Teacher, state: dict[str, Any], init: dict[str, Any],
                data_info: dict[str, Any], signal_info: dict[str, Any], passes: dict[str, int],
                training: dict[str, Any], curve: list[dict[str, Any]], after: dict[str, Any],
                flops_total: float) -> dict[str, Any]:
    """The keys of distill.json every run writes. ``state``: the run's state (teacher and initial-student metrics);
    ``training``: steps, tokens, seconds and where it ran."""
    before = state["before"]
    return {
        "edgeforge_distill_version": 1,
        "config": cfg.to_dict(),
        "teacher": {"name": teacher.name, "path": str(teacher.path), "format": teacher.format,
                    "hf_dir": str(teacher.hf_dir), "params": None, **state["teacher"]},
        "student": {**init, "dir": str(cfg.out)},
        "data": data_info,
        "teacher_signal": signal_info,
        "teacher_forward_passes": passes["training"],
        "teacher_forward_passes_other": {"calibration": passes["calibration"], "evaluation": passes["evaluation"]},
        "training": training,
        "loss_curve": curve,
        "before": before,
        "after": after,
        "retention": {"definition": RETENTION_DEFINITION, "teacher": 1.0, "before": before["retention"],
                      "after": after["retention"]},
        "kl_gap_closed": {"definition": KL_GAP_DEFINITION,
                          "value": 1.0 - after["kl_to_teacher"] / before["kl_to_teacher"]
                          if before["kl_to_teacher"] > 0 else 0.0},
        "training_flops": {"total": flops_total, "accounting": FLOPS_ACCOUNTING},
    }


def technique_records(cfg: DistillConfig, stage_records: list[dict[str, Any]], curriculum: dict[str, Any] | None,
                      counters: Any, extras: list[Teacher], teacher: Teacher, weights: tuple[float, ...],
                      init: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What each technique measured, under its own key of distill.json (absent when the technique is off)."""
    rec: dict[str, Any] = {}
    if stage_records:
        stage_records[-1]["after"] = after
        rec["progressive"] = {"from": cfg.progressive_from, "stages": stage_records}
    if curriculum is not None:
        rec["curriculum"] = curriculum
    if cfg.self_distill != "none":
        rec["self_distill"] = {"mode": cfg.self_distill,
                               "student_init": "random" if cfg.init == "random" else "from the teacher",
                               "student_layers": init.get("layers"), "teacher_layers": init.get("teacher_layers"),
                               "data": "the teacher's own greedy answers to the built-in prompts only"}
    if extras:
        rec["multi_teacher"] = {"teachers": [teacher.name, *(x.name for x in extras)], "routing": cfg.teacher_routing,
                                **({"weights": list(weights)} if cfg.teacher_routing == "weights" else
                                   {"samples_routed_to": counters.routed})}
    if cfg.on_policy_ratio > 0:
        rec["on_policy"] = {"ratio": cfg.on_policy_ratio, "tokens_sampled_per_sequence": cfg.on_policy_tokens,
                            "micro_batches": counters.micro_batches,
                            "on_policy_micro_batches": counters.on_policy_micro_batches,
                            "generated_tokens": counters.generated_tokens,
                            "generation_seconds": round(counters.generation_seconds, 2)}
    return rec


def record_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The headline of a distill.json: what a script compares."""
    return {k: record[k] for k in ("teacher", "before", "after", "retention", "kl_gap_closed",
                                   "teacher_forward_passes", "training") if k in record}
