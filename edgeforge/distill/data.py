"""The data of a distillation run: the training and held-out sequences (``--data`` files, or the built-in prose plus
the teacher's own answers to built-in prompts), and the stream of micro-batches the training loop reads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from edgeforge.distill.config import DistillConfig
from edgeforge.distill.context import Log
from edgeforge.distill.parallel import barrier
from edgeforge.distill.teacher import Teacher


@dataclass
class DistillData:
    train: Tensor  # [n_train, seq_len] int64
    heldout: Tensor  # [n_eval, eval_seq_len] int64
    info: dict[str, Any]


def prepare_data(cfg: DistillConfig, tokenizer: Any, teacher: Teacher, cache_root: Path, main: bool,
                 log: Log, task_docs: tuple[str, ...] = ()) -> DistillData:
    """Training sequences and held-out sequences; the teacher's answers are generated once (main process).

    ``--self-distill``: the built-in prose is left out, the teacher's own answers are the data. ``task_docs`` (the
    task's examples, --task) are packed into sequences of their own after the split, so none is held out and a
    sequence holds task text only (lowest-loss routing then sees whole task samples)."""
    from edgeforge.data.text import pack, tokenize_documents

    info: dict[str, Any] = {}
    if cfg.data:
        train, heldout = _file_sequences(cfg, tokenizer, info)
    else:
        train, heldout = _builtin_sequences(cfg, tokenizer, teacher, cache_root, main, log, info)
    if task_docs:
        task_seqs = pack(tokenize_documents(task_docs, tokenizer), cfg.seq_len)
        train = torch.cat([train, task_seqs])
        info.update(task_documents=len(task_docs), task_sequences=len(task_seqs))
    info.update(train_sequences=len(train), train_tokens=int(train.numel()), seq_len=cfg.seq_len,
                heldout_sequences=len(heldout), heldout_tokens=int(heldout.numel()))
    return DistillData(train, heldout, info)


def _file_sequences(cfg: DistillConfig, tokenizer: Any, info: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(train [n, seq_len], held-out [n_eval, seq_len]) from the ``--data`` files, held out by document content
    (edgeforge.data.text.split_documents: exact duplicates dropped first, counted in ``info``)."""
    from edgeforge.data.text import documents_from_file, split_documents

    docs: list[str] = []
    for p in cfg.data:
        docs += documents_from_file(p, tokenizer)
    split = split_documents(docs, tokenizer, cfg.seq_len)
    info.update(sources=[str(p) for p in cfg.data], documents=len(docs), **split.info)
    return split.train, split.heldout[: cfg.eval_sequences]


def _builtin_sequences(cfg: DistillConfig, tokenizer: Any, teacher: Teacher, cache_root: Path, main: bool,
                       log: Log, info: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(train [n, seq_len], held-out [n_eval, eval_seq_len]) from the built-in prose (left out under
    --self-distill) and the teacher's answers; the held-out prose is never trained on."""
    from edgeforge.data.builtin import heldout_prose, training_prose
    from edgeforge.data.text import pack, tokenize_documents

    if cfg.self_distill == "none":
        docs = [d for d in training_prose().split("\n\n") if d.strip()]
        info.update(sources=["builtin: CPython documentation topics (pydoc_data)"], documents=len(docs))
    else:  # self-distillation: the teacher's own outputs only
        docs = []
        info.update(sources=[], documents=0)
    if cfg.generate_answers:
        docs += _teacher_answer_documents(tokenizer, teacher, cache_root, main, log, info)
    train = pack(tokenize_documents(docs, tokenizer), cfg.seq_len)
    held_stream = tokenize_documents([heldout_prose(max_chars=10**9)], tokenizer)
    heldout = pack(held_stream, min(cfg.eval_seq_len, len(held_stream)))[: cfg.eval_sequences]
    info["heldout_source"] = "builtin held-out CPython documentation topics (never trained on)"
    return train, heldout


def _teacher_answer_documents(tokenizer: Any, teacher: Teacher, cache_root: Path, main: bool, log: Log,
                              info: dict[str, Any]) -> list[str]:
    """The teacher's greedy answers to the built-in prompts as documents: generated (or found in the cache) by the
    main process, then read from the cache by the others."""
    from edgeforge.distill.teacher_cache import BUILTIN_PROMPTS, answer_documents, teacher_answers

    if main:
        rows, gen = teacher_answers(tokenizer, cache_root, teacher.identity, teacher.gguf,
                                    lambda: teacher.load(torch.float32, torch.device("cpu")))
        log(f"teacher answers to {len(BUILTIN_PROMPTS)} built-in prompts: "
            + ("cache hit" if gen["cache_hit"] else f"generated with {gen['engine']} in {gen['seconds']} s"))
    barrier()
    if not main:
        rows, gen = teacher_answers(tokenizer, cache_root, teacher.identity, teacher.gguf, lambda: None)
    answers = answer_documents(rows, tokenizer)
    info.update(sources=info["sources"] + ["builtin: the teacher's greedy answers to built-in prompts"],
                generated_answers=len(answers), answers_cache=gen["path"])
    return answers


def rows_for_run(n_rows: int, cfg: DistillConfig, world: int) -> set[int]:
    """Every training sequence index the run's batches will touch (all processes), for the offline cache."""
    from edgeforge.data.text import batch_iterator

    idx = torch.arange(n_rows)[:, None]
    rows: set[int] = set()
    for rank in range(world):
        it = batch_iterator(idx, cfg.batch_size, cfg.seed, 0, cfg.grad_accum, rank, world)
        for _ in range(cfg.steps * cfg.grad_accum):
            rows.update(next(it)["input_ids"][:, 0].tolist())
    return rows


def micro_batch_stream(train: Tensor, cfg: DistillConfig, rank: int, world: int, steps: int | None = None,
                       order: Tensor | None = None, task: Any = None, pad_id: int = 0,
                       step_offset: int = 0) -> Callable[[int], Iterator[dict[str, Tensor]]]:
    """The micro-batches of a run from optimizer step ``start_step`` on: ``input_ids`` [B, S], their sequence
    indices ``rows`` [B] and the global micro-batch index ``micro`` (a 0-d tensor: seeds on-policy sampling and
    the draws below, identically after a resume).

    ``step_offset``: the optimizer steps of the stages before this one (progressive distillation). A stage's step
    ``s`` takes the stream's step ``step_offset + s``, so each stage continues where the previous one stopped
    instead of replaying its batches; the curriculum's pacing runs over the whole run (``cfg.steps``).

    Plain: edgeforge.data.text.batch_iterator's exact order. With a curriculum ``order`` [N] (easy -> hard): the paced
    draws of techniques.curriculum over ``steps``. With a ``task`` (techniques.rationale.DistillTask) that has a
    supervised term: also a task micro-batch (``task_*``, ``rat_*``).
    """
    from edgeforge.data.text import batch_iterator
    from edgeforge.distill.techniques.curriculum import curriculum_rows
    from edgeforge.distill.techniques.rationale import task_batch

    idx = torch.arange(len(train))[:, None]
    per_step = cfg.grad_accum * world
    total = cfg.steps if step_offset or steps is None else steps

    def make(start_step: int) -> Iterator[dict[str, Tensor]]:
        step = step_offset + start_step
        micro = step * per_step + rank  # this process's micro-batches are every world-th one
        plain = None if order is not None else batch_iterator(idx, cfg.batch_size, cfg.seed, step,
                                                               cfg.grad_accum, rank, world)
        while True:
            if plain is not None:
                rows = next(plain)["input_ids"][:, 0]
            else:
                rows = curriculum_rows(order, micro // per_step, total, micro, cfg.batch_size,  # type: ignore[arg-type]
                                       cfg.curriculum_pacing, cfg.curriculum_start, cfg.seed)
            batch = {"input_ids": train[rows], "rows": rows, "micro": torch.tensor(micro)}
            if task is not None and task.encoded:
                batch.update(task_batch(task.encoded, cfg.batch_size, cfg.seed, micro, pad_id))
            yield batch
            micro += world

    return make
