"""Multi-teacher distillation: two or more teachers that share one vocabulary, combined into one target.

``--extra-teacher MODEL`` (repeatable) adds teachers beside ``--teacher``; every one is checked to have the main
teacher's vocabulary (size and tokens) before any model loads. ``--teacher-routing``:

- ``weights``: the target is the mixture ``p = sum_k w_k p_k`` of the teachers' distributions (each at the KD
  temperature T), with ``--teacher-weights`` w (normalised to sum to 1; default equal);
- ``lowest-loss``: per sample (sequence), the target is the one teacher with the lowest next-token NLL on that
  sample's own tokens: the teacher that knows this text best teaches it.

Both produce ordinary teacher *logits* for the unchanged KD losses: the mixture is returned as ``T * log p``, whose
``softmax(. / T)`` is exactly ``p``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

ROUTINGS = ("weights", "lowest-loss")


def normalised_weights(weights: Sequence[float], n_teachers: int) -> tuple[float, ...]:
    """``weights`` scaled to sum to 1 (empty: equal weights). Raises ValueError naming what is wrong."""
    if not weights:
        return tuple(1.0 / n_teachers for _ in range(n_teachers))
    if len(weights) != n_teachers:
        raise ValueError(f"expected one weight per teacher ({n_teachers}: --teacher first, then each "
                         f"--extra-teacher), found {len(weights)}")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"expected weights >= 0 with a positive sum, found {list(weights)}")
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


def mixture_logits(teacher_logits: Sequence[Tensor], weights: Sequence[float], temperature: float = 1.0) -> Tensor:
    """Logits z of the weighted mixture of the teachers' tempered distributions.

    teacher_logits: K tensors [..., V]; weights: K values summing to 1. Returns [..., V] float32 with
    ``softmax(z / T) = sum_k w_k softmax(z_k / T)`` (z = T log p). Accumulated one teacher at a time with
    ``logaddexp``, so memory holds two [..., V] tensors, not K.
    """
    if len(teacher_logits) != len(weights):
        raise ValueError(f"{len(teacher_logits)} teachers but {len(weights)} weights")
    mix: Tensor | None = None
    for z, w in zip(teacher_logits, weights, strict=True):
        if w <= 0:
            continue  # log 0: contributes nothing to the mixture
        term = torch.log_softmax(z.float() / temperature, -1) + math.log(w)
        mix = term if mix is None else torch.logaddexp(mix, term)
    if mix is None:
        raise ValueError("every teacher weight is 0")
    return mix * temperature


def sequence_nll(logits: Tensor, input_ids: Tensor, start: int = 0) -> Tensor:
    """Per-sample mean next-token NLL of the sample's own tokens: [B] float32.

    logits: [B, S, V]; input_ids: [B, S]. Position t predicts token t + 1; positions t >= ``start`` count.
    """
    lp = torch.log_softmax(logits[:, start:-1].float(), -1)  # [B, S - 1 - start, V]
    return -lp.gather(-1, input_ids[:, start + 1:, None]).squeeze(-1).mean(-1)


def route_lowest_loss(teacher_logits: Sequence[Tensor], input_ids: Tensor, start: int = 0) -> Tensor:
    """For each sample, the index of the teacher with the lowest NLL on it: [B] int64 (ties: the first teacher)."""
    nll = torch.stack([sequence_nll(z, input_ids, start) for z in teacher_logits])  # [K, B]
    return nll.argmin(0)


def routed_logits(teacher_logits: Sequence[Tensor], choice: Tensor) -> Tensor:
    """Sample b's target is teacher ``choice[b]``'s logits: K x [B, S, V] -> [B, S, V]."""
    out = torch.empty_like(teacher_logits[0])
    for b, k in enumerate(choice.tolist()):
        out[b] = teacher_logits[k][b]
    return out
