"""The build's fixed task evaluation set: one list of held-out examples that the fine-tuning record (base, adapter,
merged model), every exported artifact and the source model of each export are scored on, in the same order, so
any two scores compare example by example (``edgeforge.tasks.metrics.paired_comparison``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeforge.build.stage import BuildContext, BuildState
from edgeforge.data.chat import conversation_text


def held_out_task_examples(ctx: BuildContext, every: bool = False) -> list[dict[str, Any]]:
    """The fixed set: the first ``verify.task_examples`` held-out examples (all by default; ``every``: all of them
    whatever the setting); none without a task.

    The held-out split is by content (edgeforge.data.text.split_by_content), with the build's seed, exactly as
    ``edgeforge finetune`` splits, so the fine-tuning record's examples are these (split once per build:
    ``BuildContext.held_out_task``)."""
    held = ctx.held_out_task()
    n = ctx.cfg.verify.task_examples
    return held if n is None or every else held[:n]


def task_text(tokenizer: Any, examples: list[dict[str, Any]]) -> str:
    """Held-out task examples as one text, each as the chat template renders prompt and answer: what a
    task-specialised artifact is verified on (KL, top-1; the first ``verify.tokens`` tokens of every held-out
    example, however few the scored set has), general prose being reported beside it."""
    return "\n".join(conversation_text(tokenizer, e["messages"]) for e in examples)


def source_task_scores(state: BuildState, examples: list[dict[str, Any]], log: Any) -> dict[str, Any]:
    """The export source's scores on the fixed set: those the stage that made it measured (the fine-tuning record's
    merged model; the student distilled from a fine-tuned teacher) when they cover exactly these examples, else
    measured now with transformers (greedy, the same scoring)."""
    scored = state.source_scores or {}
    correct = scored.get("correct")
    if isinstance(correct, list) and len(correct) == len(examples):
        return {"model": scored.get("model", "source model"), "correct": correct,
                "task_accuracy": scored.get("task_accuracy")}
    assert state.model_dir is not None
    metrics = score_model_dir(Path(state.model_dir), examples, log)
    return {"model": str(state.model_dir), "correct": metrics["correct"], "task_accuracy": metrics["task_accuracy"]}


def score_model_dir(model_dir: Path, examples: list[dict[str, Any]], log: Any) -> dict[str, Any]:
    """An HF model directory scored on ``examples`` with transformers (greedy; edgeforge.tasks.metrics): accuracy,
    its interval, valid-JSON rate, per-example ``correct``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeforge.tasks.metrics import SCORE_FIELDS, task_metrics

    log(f"scoring {model_dir.name} on the {len(examples)} fixed task examples")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    metrics = task_metrics(model, tok, examples)
    return {k: metrics[k] for k in SCORE_FIELDS}


#: Characters of rendered training task examples put before the built-in calibration text of a fitted mix, so
#: the first calibration tokens (a fit measures 384) are half the task's own text, half general prose.
TASK_CALIBRATION_CHARS = 3000


def fit_calibration_text(ctx: BuildContext, tokenizer: Any) -> str:
    """The calibration text of a fitted mix (and its importance matrix) in a build: with a task, its training
    examples as the chat template renders them (never the held-out ones the gate scores), then the built-in
    training prose; without one, the prose alone."""
    from edgeforge.data.builtin import calibration_text

    examples = ctx.training_task()
    if not examples:
        return calibration_text()
    task = task_text(tokenizer, examples)[:TASK_CALIBRATION_CHARS]
    return task + "\n\n" + calibration_text()

