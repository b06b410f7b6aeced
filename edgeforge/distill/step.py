"""The loss of one distillation micro-batch: the KD divergence (+ CE, + hidden alignment, + a task term), with the
teacher signal online (one teacher, or several mixed or routed), from the offline cache, or on the student's own
samples (on-policy micro-batches).

``make_step`` returns the ``step_fn`` (a DistillStep) that edgeforge.train.loop calls with each micro-batch:
``input_ids`` [B, S], ``rows`` [B] (sequence indices, for the offline cache), ``micro`` (the global micro-batch index,
for the on-policy schedule and seeded draws) and, with a task term, the ``task_*`` / ``rat_*`` tensors of
techniques.rationale.task_batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

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


StepFn = Callable[[dict[str, Tensor]], tuple[Tensor, dict[str, float]]]


def make_step(cfg: Any, kd_module: nn.Module, student: nn.Module, teachers: list[nn.Module], weights: tuple[float, ...],
              cache: Any, align_pairs: list[tuple[int, int]], counters: StepCounters) -> StepFn:
    """The step function of a distillation stage (see DistillStep)."""
    return DistillStep(cfg, kd_module, student, teachers, weights, cache, align_pairs, counters)


class DistillStep:
    """The loss of one micro-batch: ``step(batch) -> (loss, metrics)``.

    kd_module: the (possibly DDP/FSDP-wrapped) edgeforge.distill.student.StudentForKD the loop trains; ``student``:
    the unwrapped student inside it (sampling for on-policy batches, the task term). ``teachers``: the online signal
    teachers, the first one also the source of hidden states (empty with the offline ``cache``). ``weights``: their
    mixture weights (``--teacher-routing weights``).
    """

    def __init__(self, cfg: Any, kd_module: nn.Module, student: nn.Module, teachers: list[nn.Module],
                 weights: tuple[float, ...], cache: Any, align_pairs: list[tuple[int, int]],
                 counters: StepCounters) -> None:
        self.cfg, self.kd_module, self.student, self.teachers = cfg, kd_module, student, teachers
        self.weights, self.cache, self.align_pairs, self.counters = weights, cache, align_pairs, counters
        if len(teachers) > 1 and not counters.routed:
            counters.routed = [0] * len(teachers)

    def __call__(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        micro = int(batch["micro"]) if "micro" in batch else 0
        self.counters.micro_batches += 1
        # start: the first position whose prediction enters the KD loss (past the prompt of an on-policy batch)
        ids, start = self._on_policy_ids(batch["input_ids"], micro)
        metrics: dict[str, float] = {"on_policy": float(start > 0)}
        t_logits, t_topk, t_hidden = self._teacher_targets(batch, ids, start)
        s_logits, s_hidden = self.kd_module(ids)
        kd = self._kd_term(s_logits, t_logits, t_topk, start)
        metrics["kl"] = float(kd.detach())
        ce = None
        if cfg.alpha > 0:  # CE on data tokens only: on-policy batches keep their data prompt (positions < start)
            ce = next_token_ce(s_logits[:, : start + 1], ids[:, : start + 1], cfg.chunk_size) if start > 0 \
                else next_token_ce(s_logits, ids, cfg.chunk_size)
            metrics["ce"] = float(ce.detach())
        loss = mix_with_ce(kd, ce, cfg.alpha)
        if self.align_pairs:  # s_hidden comes projected to the teacher's width (StudentForKD)
            h = sum(hidden_alignment(s, t.detach(), cfg.hidden_loss)  # type: ignore[arg-type]
                    for s, t in zip(s_hidden, t_hidden, strict=True)) / len(self.align_pairs)
            loss = loss + cfg.hidden_weight * h
            metrics["hidden"] = float(h.detach())
        if "task_input_ids" in batch:
            loss = loss + self._task_term(batch, metrics)
        return loss, metrics

    def _on_policy_ids(self, ids: Tensor, micro: int) -> tuple[Tensor, int]:
        """(input ids [B, S'], start): the data batch as it is (start 0), or, on an on-policy micro-batch, its
        prompt continued by the student's own samples (start: the first sampled position's predecessor)."""
        cfg, counters = self.cfg, self.counters
        if not (cfg.on_policy_ratio > 0 and is_on_policy(micro, cfg.on_policy_ratio)):
            return ids, 0
        t0 = time.perf_counter()
        ids, start = on_policy_batch(self.student, ids, cfg.on_policy_tokens, cfg.seed, micro)
        counters.generation_seconds += time.perf_counter() - t0
        counters.on_policy_micro_batches += 1
        counters.generated_tokens += ids.shape[0] * cfg.on_policy_tokens
        return ids, start

    def _teacher_targets(self, batch: dict[str, Tensor], ids: Tensor,
                         start: int) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None, list[Tensor]]:
        """(full teacher logits [B, S, V] or None, top-k (log-probs [B, S, k], token ids [B, S, k]) or None, the
        teacher's hidden states): from the offline cache, or from the online teachers (reduced to their top-k under
        --top-k)."""
        if self.cache is not None:
            t_vals, t_ids = (t.to(ids.device) for t in self.cache.lookup(batch["rows"].cpu()))
            return None, (t_vals, t_ids), []
        t_logits, t_hidden = self._teacher_signal(ids, start)
        if self.cfg.top_k:
            return None, teacher_topk(t_logits, self.cfg.top_k), t_hidden  # type: ignore[arg-type]
        return t_logits, None, t_hidden

    def _teacher_signal(self, ids: Tensor, start: int) -> tuple[Tensor | None, list[Tensor]]:
        """The teachers' logits [B, S, V] as one target (mixed or routed), and the first teacher's hidden states."""
        counters = self.counters
        cap = capture_layers(self.teachers[0], [t for _, t in self.align_pairs])
        try:
            with torch.no_grad():
                logits = []
                for t in self.teachers:
                    logits.append(t(input_ids=ids, use_cache=False).logits)
                    counters.teacher_forwards += 1
        finally:
            cap.remove()
        if len(logits) == 1:
            return logits[0], cap.outputs
        with torch.no_grad():
            if self.cfg.teacher_routing == "weights":
                return mixture_logits(logits, self.weights, self.cfg.temperature), cap.outputs
            choice = route_lowest_loss(logits, ids, start)
            for k in choice.tolist():
                counters.routed[k] += 1
            return routed_logits(logits, choice), cap.outputs

    def _kd_term(self, s_logits: Tensor, t_logits: Tensor | None, t_topk: tuple[Tensor, Tensor] | None,
                 start: int) -> Tensor:
        """The KD divergence of the student's logits [B, S, V] from the teacher's (full or top-k)."""
        cfg = self.cfg
        # On-policy: only the positions that predict the student's sampled tokens (start .. S-2) are distilled.
        window = slice(start, -1) if start > 0 else slice(None)
        if t_logits is not None:
            return divergence(cfg.loss, s_logits[:, window], t_logits[:, window], cfg.temperature, cfg.jsd_beta,
                              cfg.chunk_size)
        t_vals, t_ids = t_topk  # type: ignore[misc]
        return topk_divergence(cfg.loss, s_logits[:, window], t_vals[:, window], t_ids[:, window],
                               cfg.temperature, cfg.jsd_beta, cfg.chunk_size)

    def _task_term(self, batch: dict[str, Tensor], metrics: dict[str, float]) -> Tensor:
        """The supervised task term (answer, + rationale) of techniques.rationale; adds its metrics."""
        cfg = self.cfg
        self.counters.task_tokens += int(batch["task_attention_mask"].sum()) \
            + int(batch["rat_attention_mask"].sum()) if cfg.task_loss == "rationale" \
            else int(batch["task_attention_mask"].sum())
        task, task_metrics = multitask_loss(self.student, batch, cfg.rationale_weight, cfg.task_loss == "rationale")
        metrics.update(task_metrics)
        return task
