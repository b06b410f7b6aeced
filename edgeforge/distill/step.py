"""The loss of one distillation micro-batch: the KD divergence (+ CE, + hidden alignment, + a task term), with the
teacher signal online (one teacher, or several mixed or routed), from the offline cache, or on the student's own
samples (on-policy micro-batches).

``make_step`` returns the ``step_fn`` edgeforge.train.loop calls with each micro-batch: ``input_ids`` [B, S], ``rows``
[B] (sequence indices, for the offline cache), ``micro`` (the global micro-batch index, for the on-policy schedule and
seeded draws) and, with a task term, the ``task_*`` / ``rat_*`` tensors of techniques.rationale.task_batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class StepCounters:
    """What the steps did, for the record: teacher forwards, on-policy micro-batches, routing choices."""

    teacher_forwards: int = 0
    micro_batches: int = 0
    on_policy_micro_batches: int = 0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    task_tokens: int = 0  # tokens of the supervised task micro-batches (answer + rationale inputs)
    routed: list[int] = field(default_factory=list)  # lowest-loss routing: samples per teacher


def make_step(cfg: Any, kd_module: nn.Module, student: nn.Module, teachers: list[nn.Module], weights: tuple[float, ...],
              cache: Any, align_pairs: list[tuple[int, int]],
              counters: StepCounters) -> Callable[[dict[str, Tensor]], tuple[Tensor, dict[str, float]]]:
    """The step function of a distillation stage.

    kd_module: the (possibly DDP/FSDP-wrapped) edgeforge.distill.run.StudentForKD the loop trains; ``student``: the
    unwrapped student inside it (sampling for on-policy batches, the task term). ``teachers``: the online signal
    teachers, the first one also the source of hidden states (empty with the offline ``cache``). ``weights``: their
    mixture weights (``--teacher-routing weights``).
    """
    import time

    from edgeforge.distill.losses import (
        divergence,
        hidden_alignment,
        mix_with_ce,
        next_token_ce,
        teacher_topk,
        topk_divergence,
    )
    from edgeforge.distill.student import capture_layers
    from edgeforge.distill.techniques.multi_teacher import mixture_logits, route_lowest_loss, routed_logits
    from edgeforge.distill.techniques.on_policy import is_on_policy, on_policy_batch
    from edgeforge.distill.techniques.rationale import multitask_loss

    kind = cfg.loss
    if len(teachers) > 1 and not counters.routed:
        counters.routed = [0] * len(teachers)

    def teacher_signal(ids: Tensor, start: int) -> tuple[Tensor | None, list[Tensor]]:
        """The teachers' logits [B, S, V] as one target (mixed or routed), and the first teacher's hidden states."""
        cap = capture_layers(teachers[0], [t for _, t in align_pairs])
        try:
            with torch.no_grad():
                logits = []
                for t in teachers:
                    logits.append(t(input_ids=ids, use_cache=False).logits)
                    counters.teacher_forwards += 1
        finally:
            cap.remove()
        if len(logits) == 1:
            return logits[0], cap.outputs
        with torch.no_grad():
            if cfg.teacher_routing == "weights":
                return mixture_logits(logits, weights, cfg.temperature), cap.outputs
            choice = route_lowest_loss(logits, ids, start)
            for k in choice.tolist():
                counters.routed[k] += 1
            return routed_logits(logits, choice), cap.outputs

    def step(batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        ids = batch["input_ids"]
        micro = int(batch["micro"]) if "micro" in batch else 0
        start = 0  # the first position whose prediction enters the KD loss
        metrics: dict[str, float] = {}
        counters.micro_batches += 1
        if cfg.on_policy_ratio > 0 and is_on_policy(micro, cfg.on_policy_ratio):
            t0 = time.perf_counter()
            ids, start = on_policy_batch(student, ids, cfg.on_policy_tokens, cfg.seed, micro)
            counters.generation_seconds += time.perf_counter() - t0
            counters.on_policy_micro_batches += 1
            counters.generated_tokens += ids.shape[0] * cfg.on_policy_tokens
        metrics["on_policy"] = float(start > 0)
        t_hidden: list[Tensor] = []
        t_logits = t_vals = t_ids = None
        if cache is not None:
            t_vals, t_ids = (t.to(ids.device) for t in cache.lookup(batch["rows"].cpu()))
        else:
            t_logits, t_hidden = teacher_signal(ids, start)
            if cfg.top_k:
                t_vals, t_ids = teacher_topk(t_logits, cfg.top_k)  # type: ignore[arg-type]
                t_logits = None
        s_logits, s_hidden = kd_module(ids)
        # On-policy: only the positions that predict the student's sampled tokens (start .. S-2) are distilled.
        window = slice(start, -1) if start > 0 else slice(None)
        if t_logits is not None:
            kd = divergence(kind, s_logits[:, window], t_logits[:, window], cfg.temperature, cfg.jsd_beta,
                            cfg.chunk_size)
        else:
            kd = topk_divergence(kind, s_logits[:, window], t_vals[:, window], t_ids[:, window],  # type: ignore
                                 cfg.temperature, cfg.jsd_beta, cfg.chunk_size)
        metrics["kl"] = float(kd.detach())
        ce = None
        if cfg.alpha > 0:  # CE on data tokens only: on-policy batches keep their data prompt (positions < start)
            ce = next_token_ce(s_logits[:, : start + 1], ids[:, : start + 1], cfg.chunk_size) if start > 0 \
                else next_token_ce(s_logits, ids, cfg.chunk_size)
            metrics["ce"] = float(ce.detach())
        loss = mix_with_ce(kd, ce, cfg.alpha)
        if align_pairs:  # s_hidden comes projected to the teacher's width (StudentForKD)
            h = sum(hidden_alignment(s, t.detach(), cfg.hidden_loss)  # type: ignore[arg-type]
                    for s, t in zip(s_hidden, t_hidden, strict=True)) / len(align_pairs)
            loss = loss + cfg.hidden_weight * h
            metrics["hidden"] = float(h.detach())
        if "task_input_ids" in batch:
            counters.task_tokens += int(batch["task_attention_mask"].sum()) + int(batch["rat_attention_mask"].sum()) \
                if cfg.task_loss == "rationale" else int(batch["task_attention_mask"].sum())
            task, task_metrics = multitask_loss(student, batch, cfg.rationale_weight, cfg.task_loss == "rationale")
            loss = loss + task
            metrics.update(task_metrics)
        return loss, metrics

    return step
