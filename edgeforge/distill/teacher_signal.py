"""The training signal of a distillation run: the teacher run inside the loop at its training precision (online), or
its top-k log-probabilities computed once into a cache (offline, edgeforge.distill.teacher_cache); plus the extra
teachers and their mixture weights."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgeforge.distill.context import RunContext
from edgeforge.distill.data import DistillData, rows_for_run
from edgeforge.distill.teacher import Teacher, teacher_train_dtype


@dataclass
class TrainingSignal:
    teacher: nn.Module | None  # the online teacher at the training precision; None with the offline cache
    teacher_params: int  # the teacher's parameter count (FLOPs accounting)
    extras: list[nn.Module]  # the extra teachers (--extra-teacher), at the training precision
    weights: tuple[float, ...]  # the mixture weights of all teachers, the main one first
    cache: Any  # the offline TopKCache, or None
    dtype: torch.dtype  # the teachers' training precision
    info: dict[str, Any]  # the record's ``teacher_signal``

    def release(self) -> None:
        """Drop the teacher models (training is over); the cache, weights and info stay."""
        self.teacher, self.extras = None, []


def training_signal(ctx: RunContext, teacher: Teacher, extras: list[Teacher], t_model: nn.Module,
                    teacher_params: int, data: DistillData) -> TrainingSignal:
    """The signal from the fp32 teacher ``t_model``, which is converted in place: the caller must drop its own
    reference afterwards (online, the signal holds it; offline, nothing does once the cache is filled)."""
    from edgeforge.distill.techniques.multi_teacher import normalised_weights

    cfg = ctx.cfg
    tdtype = teacher_train_dtype(cfg.teacher_dtype, ctx.device)
    info: dict[str, Any] = {"mode": "offline" if cfg.offline_teacher else "online", "top_k": cfg.top_k,
                            "teacher_dtype": str(tdtype).replace("torch.", "")}
    cache = None
    online = None
    if cfg.offline_teacher:
        cache = _offline_cache(ctx, teacher, t_model, tdtype, data, info)
    else:
        online = t_model.to(tdtype) if tdtype != torch.float32 else t_model
    del t_model
    extra_models = [x.load(tdtype, ctx.device) for x in extras]
    weights = normalised_weights(cfg.teacher_weights, 1 + len(extras))
    return TrainingSignal(online, teacher_params, extra_models, weights, cache, tdtype, info)


def _offline_cache(ctx: RunContext, teacher: Teacher, t_model: nn.Module, tdtype: torch.dtype, data: DistillData,
                   info: dict[str, Any]) -> Any:
    """The TopKCache holding every training sequence this run visits: the missing ones computed by the main process
    with the teacher at ``tdtype`` (converted in place; the fp32 teacher is reloaded for the final evaluation)."""
    from edgeforge.distill.parallel import barrier
    from edgeforge.distill.teacher_cache import TopKCache

    cfg, say = ctx.cfg, ctx.say
    cache = TopKCache(ctx.cache_root, teacher.identity, data.train, int(cfg.top_k or 64), info["teacher_dtype"])
    missing = cache.missing(rows_for_run(len(data.train), cfg, ctx.world))
    if ctx.main and missing:
        t0 = time.perf_counter()
        say(f"offline teacher: computing the top-{cache.k} of {len(missing)} sequences this run will visit")
        sig_model = t_model.to(tdtype)
        ctx.passes["training"] += cache.fill(
            missing, lambda ids: sig_model(input_ids=ids.to(ctx.device), use_cache=False).logits, cfg.batch_size)
        del sig_model
        info["cache_fill_seconds"] = round(time.perf_counter() - t0, 2)
    barrier()
    if not ctx.main:
        cache.refresh()  # the main process wrote the shards
    info.update(cache_dir=str(cache.dir), cache_hit=not missing, bytes_per_token=cache.bytes_per_token,
                cache_bytes=cache.disk_bytes(), sequences_computed=len(missing))
    if not missing:
        say("offline teacher: cache hit, 0 teacher forward passes")
    else:
        say(f"offline teacher: cache built ({cache.bytes_per_token} bytes per token, {cache.disk_bytes() / 1e6:.1f}"
            f" MB), {ctx.passes['training']} teacher forward passes")
    return cache
