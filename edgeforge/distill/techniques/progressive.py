"""Progressive distillation: shrink in steps (e.g. 30 -> 20 -> 10 layers) instead of in one cut.

``--progressive 20,10`` runs two stages. Stage i's student is depth-pruned (block influence, distill.prune) from
stage i-1's distilled student (stage 0: from the teacher); the last stage applies the full target shape (any
``--student-hidden`` etc. too). Each stage distils from ``--progressive-from``:

- ``previous``: the previous stage's student (stage 0: the teacher), the teacher-assistant chain of Mirzadeh et al.
  2020;
- ``teacher``: always the original teacher (only the initialisation is progressive).

The optimizer-step budget ``--steps`` is split over the stages (``split_steps``), so a progressive run costs the same
student-token budget as a one-cut run; each stage has its own warm-up and cosine schedule. Every stage is measured
against the original fp32 teacher before and after, and records its training FLOPs: ``(6 N_student + 2 N_teacher)``
per training token (training_cost.training_flops).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from edgeforge.errors import BadInputError

PROGRESSIVE_FROM = ("previous", "teacher")


def parse_layers(text: str) -> tuple[int, ...]:
    """``"20,10"`` -> (20, 10). Raises ValueError on anything but positive integers."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        layers = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected comma-separated layer counts such as 20,10, found {text!r}") from None
    if not layers or any(n < 1 for n in layers):
        raise ValueError(f"expected comma-separated positive layer counts such as 20,10, found {text!r}")
    return layers


def check_stages(stages: Sequence[int], teacher_layers: int) -> None:
    """Stages must shrink strictly and start below the teacher's depth."""
    chain = [teacher_layers, *stages]
    if any(b >= a for a, b in zip(chain, chain[1:], strict=False)):
        raise ValueError(f"expected strictly decreasing layer counts below the teacher's {teacher_layers}, found "
                         f"{','.join(str(s) for s in stages)}")


def split_steps(total: int, n_stages: int) -> list[int]:
    """``total`` optimizer steps over ``n_stages``: equal shares, the remainder to the last stages (the final
    student gets the most). Every stage gets at least one step."""
    if n_stages < 1 or total < n_stages:
        raise ValueError(f"cannot split {total} steps over {n_stages} stages (at least one step each)")
    base, extra = divmod(total, n_stages)
    return [base + (1 if i >= n_stages - extra else 0) for i in range(n_stages)]


def stage_plan(cfg: Any, shape: Any, teacher_layers: int) -> list[tuple[Any, int]]:
    """(student shape, optimizer steps) per stage of a run (cfg: edgeforge.distill.config.DistillConfig; shape:
    edgeforge.distill.prune.StudentShape): one stage, or the --progressive stages (depth only, the last with the full
    shape) with the budget split."""
    if not cfg.progressive:
        return [(shape, cfg.steps)]
    from edgeforge.distill.prune import StudentShape

    try:
        check_stages(cfg.progressive, teacher_layers)
    except ValueError as e:
        raise BadInputError(f"--progressive: {e}") from None
    shapes = [StudentShape(n) for n in cfg.progressive[:-1]] + [replace(shape, layers=cfg.progressive[-1])]
    return list(zip(shapes, split_steps(cfg.steps, len(shapes)), strict=True))
