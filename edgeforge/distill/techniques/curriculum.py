"""Curriculum distillation: the training sequences ordered from easy to hard and revealed by a pacing schedule.

``--curriculum teacher-loss|student-loss`` scores every sequence of the *pool* once, before training:

- ``teacher-loss``: the teacher's mean next-token NLL on the sequence (how surprising the text is, to the teacher);
- ``student-loss``: the initial student's mean forward KL(teacher || student) over the sequence's positions (how far
  the student starts from its target there).

The pool is exactly the set of sequences a plain run with the same budget would visit (``distill.rows_for_run``), so a
curriculum run and a plain run draw on the same data and differ only in the order and the repetitions.

Pacing (Hacohen & Weinshall 2019; Platanios et al. 2019): at optimizer step t of T the micro-batch is drawn
uniformly, without replacement and seeded by the micro-batch index, from the easiest ``g(t)`` share of the pool.
``g`` starts at ``start`` and reaches 1 at ``FULL_AT`` x T:

- ``linear``: ``g = start + (1 - start) p``;
- ``root``: ``g = sqrt(start^2 + (1 - start^2) p)`` (the competence curve of Platanios et al.: fast early growth);
- ``step``: ``g = start + (1 - start) floor(STEP_LEVELS p) / STEP_LEVELS`` (a staircase of STEP_LEVELS + 1 levels);

with ``p = min(1, t / (FULL_AT T))``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

CURRICULA = ("none", "teacher-loss", "student-loss")
PACINGS = ("linear", "root", "step")
# The whole pool is available for the last 20% of the steps: the hardest sequences are seen more than once or twice.
FULL_AT = 0.8
STEP_LEVELS = 4


def pacing_fraction(kind: str, step: int, total_steps: int, start: float) -> float:
    """The share of the pool (easiest first) available at optimizer step ``step`` (0-based) of ``total_steps``."""
    if kind not in PACINGS:
        raise ValueError(f"pacing: expected one of {', '.join(PACINGS)}, found {kind!r}")
    if not 0.0 < start <= 1.0:
        raise ValueError(f"pacing start: expected a share in (0, 1], found {start}")
    progress = min(1.0, step / max(1.0, FULL_AT * total_steps))
    if kind == "linear":
        g = start + (1.0 - start) * progress
    elif kind == "root":
        g = math.sqrt(start ** 2 + (1.0 - start ** 2) * progress)
    else:
        g = start + (1.0 - start) * math.floor(STEP_LEVELS * progress) / STEP_LEVELS
    return min(1.0, g)


def difficulty_order(pool: Tensor, scores: Tensor) -> Tensor:
    """The pool's sequence indices sorted easy -> hard.

    pool: [N] int64 sequence indices; scores: [N] difficulty (lower = easier). A stable sort: equal scores keep the
    pool's order, so the order is deterministic.
    """
    if pool.shape != scores.shape:
        raise ValueError(f"pool {tuple(pool.shape)} and scores {tuple(scores.shape)} differ in shape")
    return pool[torch.sort(scores.double(), stable=True).indices]


def curriculum_rows(order: Tensor, step: int, total_steps: int, micro_index: int, batch_size: int, pacing: str,
                    start: float, seed: int) -> Tensor:
    """The sequence indices of one micro-batch: [batch_size] drawn from the easiest ``g(step)`` share of ``order``.

    order: [N] easy -> hard. ``micro_index`` (the global micro-batch number, across processes) seeds the draw, so a
    resumed run and every process see a fixed, reproducible order. At least ``batch_size`` sequences are available.
    """
    n_total = len(order)
    n = min(n_total, max(batch_size, math.ceil(pacing_fraction(pacing, step, total_steps, start) * n_total)))
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * micro_index + 17)
    pick = torch.randperm(n, generator=g)[: min(batch_size, n)]
    return order[pick]


@torch.no_grad()
def score_sequences(kind: str, seqs: Tensor, teacher: nn.Module, student: nn.Module | None,
                    batch_size: int = 4) -> Tensor:
    """Per-sequence difficulty: [N] float64 for seqs [N, S] int64 (teacher-loss or student-loss, see module doc).

    Runs the teacher (and for ``student-loss`` the student) once over every sequence, ``batch_size`` at a time; each
    sequence's [S, V] distributions are reduced one sequence at a time so memory stays at one batch of logits.
    """
    if kind not in ("teacher-loss", "student-loss"):
        raise ValueError(f"curriculum: expected teacher-loss or student-loss, found {kind!r}")
    if kind == "student-loss" and student is None:
        raise ValueError("student-loss difficulty needs the student")
    device = next(teacher.parameters()).device
    out = torch.empty(len(seqs), dtype=torch.float64)
    for b in range(0, len(seqs), batch_size):
        ids = seqs[b:b + batch_size].to(device)
        t_logits = teacher(input_ids=ids, use_cache=False).logits
        s_logits = student(input_ids=ids, use_cache=False).logits if kind == "student-loss" else None  # type: ignore
        for j in range(len(ids)):
            lt = torch.log_softmax(t_logits[j].float(), -1)  # [S, V]
            if s_logits is None:
                value = -lt[:-1].gather(-1, ids[j, 1:, None]).mean()  # next-token NLL of the data under the teacher
            else:
                ls = torch.log_softmax(s_logits[j].float(), -1)
                value = (lt.exp() * (lt - ls)).sum(-1).mean()  # forward KL(teacher || student), mean over positions
            out[b + j] = float(value)
    return out



def curriculum_order(cfg: Any, teacher: nn.Module, student: nn.Module, train_seqs: Tensor,
                     pool: Tensor) -> tuple[Tensor, dict[str, Any]]:
    """The ``pool`` [N] of rows of ``train_seqs`` [n, S] sorted easy -> hard by ``cfg.curriculum`` (cfg:
    edgeforge.distill.config.DistillConfig), and what the record says about it."""
    from edgeforge.distill.prune import count_params

    t0 = time.perf_counter()
    student.eval()
    scores = score_sequences(cfg.curriculum, train_seqs[pool], teacher,
                             student if cfg.curriculum == "student-loss" else None, cfg.batch_size)
    order = difficulty_order(pool, scores)
    n_params = count_params(teacher) + (count_params(student) if cfg.curriculum == "student-loss" else 0)
    info = {"difficulty": cfg.curriculum, "pacing": cfg.curriculum_pacing, "start": cfg.curriculum_start,
            "full_at": FULL_AT, "pool_sequences": len(pool), "scoring_seconds": round(time.perf_counter() - t0, 2),
            "scoring_forward_passes": math.ceil(len(pool) / cfg.batch_size),
            "scoring_flops": 2.0 * n_params * float(train_seqs[pool].numel()),
            "difficulty_easiest": float(scores.min()), "difficulty_median": float(scores.median()),
            "difficulty_hardest": float(scores.max()),
            "available_share": {f"{p:.0%}": round(pacing_fraction(cfg.curriculum_pacing, int(p * cfg.steps),
                                                                  cfg.steps, cfg.curriculum_start), 3)
                                for p in (0.0, 0.25, 0.5, 0.75, 1.0)}}
    return order, info
