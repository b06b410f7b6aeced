"""Task scoring: greedy answers from a torch model or an exported artifact, exact match and valid-JSON rate.

One scoring function (``score_answers``) serves models and artifacts alike; it returns per-example correctness in
example order, so two scorings of the same examples can be compared pair by pair (``paired_comparison``), and the
accuracy with its 95% Wilson score interval.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from edgeforge.data.chat import prompt_ids, prompt_text
from edgeforge.progress import progress

#: The standard normal quantile of 0.975: two-sided 95% intervals.
Z_95 = 1.959963984540054


def _parse(text: str) -> Any:
    try:
        return json.loads(text.strip())
    except json.JSONDecodeError:
        return None


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, examples: list[dict], max_new_tokens: int = 48,
                   batch_size: int = 32) -> list[str]:
    """Batched greedy generation (left padding) of the answer to each example's prompt."""
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    with progress("task evaluation", total=len(examples), unit="example") as shown:
        try:
            for i in range(0, len(examples), batch_size):
                chunk = examples[i:i + batch_size]
                prompts = [prompt_text(tokenizer, e["messages"][:-1]) for e in chunk]
                enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                # Only what a decoder takes: a tokenizer may also return token_type_ids, which generate refuses.
                enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                                   else tokenizer.eos_token_id),
                                     eos_token_id=tokenizer.eos_token_id)
                for row in gen[:, enc["input_ids"].shape[1]:]:
                    out.append(tokenizer.decode(row, skip_special_tokens=True))
                shown.advance(len(chunk))
        finally:
            tokenizer.padding_side = old_side
    return out


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k / n (95% by default). Unlike k/n +- z*se it stays inside [0, 1]
    and keeps its coverage at k = 0 or k = n and for small n. n = 0 gives (0, 1): nothing is known."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: expected 0 <= k <= n, found k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def exact_mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test (a sign test on the discordant pairs): the probability, if both scorings were
    equally good, of a split of the discordant pairs at least this uneven. 1.0 when there are none."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_comparison(correct_a: list[bool], correct_b: list[bool], z: float = Z_95) -> dict[str, Any]:
    """Two scorings of the same examples, pair by pair: accuracy of each, the difference a - b with its 95%
    interval (Newcombe 1998, "Improved confidence intervals for the difference between binomial proportions based
    on paired data", method 10: the Wilson intervals of both accuracies combined through the correlation of the
    pairs) and the exact McNemar p-value on the discordant pairs. ``correct_a``, ``correct_b``: [n_examples]."""
    n = len(correct_a)
    if len(correct_b) != n:
        raise ValueError(f"paired_comparison: the scorings cover {n} and {len(correct_b)} examples; a paired "
                         "comparison needs the same examples in the same order")
    both = sum(a and b for a, b in zip(correct_a, correct_b, strict=True))
    only_a = sum(a and not b for a, b in zip(correct_a, correct_b, strict=True))
    only_b = sum(b and not a for a, b in zip(correct_a, correct_b, strict=True))
    neither = n - both - only_a - only_b
    p_a, p_b = (both + only_a) / max(1, n), (both + only_b) / max(1, n)
    (lo_a, hi_a), (lo_b, hi_b) = wilson_interval(both + only_a, n, z), wilson_interval(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    # Newcombe's correlation estimate: a positive cross-product is shrunk by n/2 (a continuity correction).
    cross = both * neither - only_a * only_b
    cross = cross - n / 2 if cross > n / 2 else min(cross, 0)
    phi = cross / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max(0.0, (p_a - lo_a) ** 2 - 2 * phi * (p_a - lo_a) * (hi_b - p_b) + (hi_b - p_b) ** 2))
    above = math.sqrt(max(0.0, (hi_a - p_a) ** 2 - 2 * phi * (hi_a - p_a) * (p_b - lo_b) + (p_b - lo_b) ** 2))
    diff = p_a - p_b
    return {"n_examples": n, "accuracy_a": p_a, "accuracy_b": p_b, "difference": diff,
            "difference_ci95": [max(-1.0, diff - below), min(1.0, diff + above)],
            "both_correct": both, "only_a_correct": only_a, "only_b_correct": only_b, "neither_correct": neither,
            "mcnemar_exact_p": exact_mcnemar_p(only_a, only_b)}


def score_answer(want_text: str, got: str) -> tuple[bool, bool]:
    """(exact match, valid JSON) of one answer: parsed JSON equality when the reference is JSON, else stripped
    text equality."""
    want, parsed = _parse(want_text), _parse(got)
    exact = (parsed == want) if want is not None else (got.strip() == want_text.strip())
    return bool(exact), parsed is not None


#: The fields of a scoring (``score_answers``) that records carry: everything but the sample answers.
SCORE_FIELDS = ("task_accuracy", "task_accuracy_ci95", "valid_json_rate", "n_examples", "correct")


def score_answers(examples: list[dict], answers: list[str]) -> dict[str, Any]:
    """Task accuracy with its 95% Wilson interval, valid-JSON rate, and ``correct``: per-example exact match in
    example order (what ``paired_comparison`` takes)."""
    scores = [score_answer(ex["messages"][-1]["content"], got) for ex, got in zip(examples, answers, strict=True)]
    correct = [exact for exact, _ in scores]
    n = max(1, len(examples))
    return {"task_accuracy": sum(correct) / n, "task_accuracy_ci95": list(wilson_interval(sum(correct), len(correct))),
            "valid_json_rate": sum(valid for _, valid in scores) / n, "n_examples": len(examples), "correct": correct}


def task_metrics(model: Any, tokenizer: Any, examples: list[dict]) -> dict[str, Any]:
    """``score_answers`` of a torch model's greedy answers to ``examples``, plus the first few as samples."""
    was_training = model.training
    model.eval()
    answers = greedy_answers(model, tokenizer, examples)
    if was_training:
        model.train()
    return {**score_answers(examples, answers),
            "samples": [{"command": e["messages"][-2]["content"], "want": e["messages"][-1]["content"], "got": a}
                        for e, a in list(zip(examples, answers, strict=True))[:5]]}


def artifact_answers(artifact: Path, tokenizer: Any, examples: list[dict], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers of an exported artifact through its own engine (llama.cpp for .gguf, onnxruntime for an
    ONNX dir), with the prompts the chat template makes."""
    from edgeforge.verify.artifact import open_engine

    engine = open_engine(artifact, n_ctx=512)
    answers = []
    with progress(f"task evaluation of {artifact.name}", total=len(examples), unit="example") as shown:
        for ex in examples:
            ids = engine.greedy(prompt_ids(tokenizer, ex["messages"][:-1]), max_new_tokens, tokenizer.eos_token_id)
            answers.append(tokenizer.decode(ids, skip_special_tokens=True))
            shown.advance()
    return answers


def artifact_task_metrics(artifact: Path, tokenizer: Any, examples: list[dict],
                          max_new_tokens: int = 48) -> dict[str, Any]:
    """``score_answers`` of an exported artifact's greedy answers (``artifact_answers``)."""
    return score_answers(examples, artifact_answers(artifact, tokenizer, examples, max_new_tokens))


def task_gate(artifact_correct: list[bool], source_correct: list[bool], max_drop: float,
              alpha: float = 0.05) -> dict[str, Any]:
    """Does an artifact keep its source model's task skill? Both scorings cover the same examples in the same order.

    It fails when its exact match is significantly below the source's (two-sided exact McNemar p < ``alpha`` on the
    discordant pairs, with the artifact the worse one) or more than ``max_drop`` (a fraction: 0.05 is 5 points)
    below it whatever the test says. Returns :func:`paired_comparison` (a = artifact, b = source) with ``passed``,
    ``reason``, ``max_drop`` and ``alpha``.
    """
    cmp = paired_comparison(artifact_correct, source_correct)
    drop = -cmp["difference"]
    significant = drop > 0 and cmp["mcnemar_exact_p"] < alpha
    reasons = []
    if significant:
        reasons.append(f"task exact match {cmp['accuracy_a']:.1%} is significantly below its source's "
                       f"{cmp['accuracy_b']:.1%} (paired, McNemar p = {cmp['mcnemar_exact_p']:.3g} < {alpha:g}, "
                       f"{cmp['n_examples']} examples)")
    if drop > max_drop + 1e-12:
        reasons.append(f"task exact match {cmp['accuracy_a']:.1%} is {drop:.1%} below its source's "
                       f"{cmp['accuracy_b']:.1%} (at most {max_drop:.0%} allowed)")
    return {**cmp, "passed": not reasons, "reason": "; ".join(reasons), "max_drop": max_drop, "alpha": alpha}
