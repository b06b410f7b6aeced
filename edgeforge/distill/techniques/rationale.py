"""A task during distillation, answer-only or with the teacher's step-by-step rationales ("distilling step-by-step",
Hsieh et al. 2023).

``--task NAME|PATH`` brings a task's training examples into the run (the first ``--task-examples``) and measures the
student's task exact-match accuracy before and after. ``--task-loss``:

- ``none``: the examples (command -> answer, in the chat template) are only more distillation data;
- ``answer``: also a supervised term every step: cross-entropy on the gold answer of a task micro-batch whose user
  turn is ``"[answer] " + command`` (prompt positions masked);
- ``rationale``: also ``λ x`` cross-entropy on the teacher's rationale for the same examples, input
  ``"[rationale] " + command``. Objective ``KD + L_answer + λ L_rationale`` (``--rationale-weight`` λ). At inference
  only the ``[answer]`` prefix is used: the rationale costs nothing on the device.

``answer`` vs ``rationale`` on the same examples and budget is the paper's comparison (standard training vs
multi-task with rationales).

Rationales are generated once by the teacher and cached (distill.teacher_cache: llama.cpp from the teacher's GGUF
when it is one, else transformers; greedy). Simplification of the paper: the teacher is shown the gold answer and
asked to explain it (rationalisation, as in STaR, Zelikman et al. 2022) rather than to answer with few-shot
chain-of-thought, because a small teacher's own answers are mostly wrong; the answer labels are the task's gold
labels (the paper's "human-labelled" setting).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ANSWER_PREFIX = "[answer] "
RATIONALE_PREFIX = "[rationale] "
TASK_LOSSES = ("none", "answer", "rationale")
IGNORE_INDEX = -100

# One worked example steers a small teacher towards short, factual explanations of the JSON fields.
_EXAMPLE_COMMAND = "turn off the kitchen fan at 7am"
_EXAMPLE_ANSWER = '{"device": "fan", "room": "kitchen", "action": "turn_off", "time": "07:00"}'
_EXAMPLE_RATIONALE = ("The command is about the fan, in the kitchen, and asks to switch it off, so the action is "
                      "turn_off. There is no level. \"at 7am\" is the time 07:00.")


def rationale_prompt(command: str, answer: str) -> str:
    """The teacher's instruction for one example: explain why ``command`` gives ``answer`` (one worked example)."""
    return ("Explain step by step, in one or two short sentences, why the smart-home command gives the JSON. Name "
            "the device, the room, the action and any value or time.\n\n"
            f"Command: {_EXAMPLE_COMMAND}\nJSON: {_EXAMPLE_ANSWER}\nExplanation: {_EXAMPLE_RATIONALE}\n\n"
            f"Command: {command}\nJSON: {answer}\nExplanation:")


def clean_rationale(text: str) -> str:
    """The first paragraph of the teacher's reply, without a repeated 'Explanation:' label."""
    text = text.strip()
    if text.lower().startswith("explanation:"):
        text = text[len("explanation:"):].strip()
    return text.split("\n\n")[0].strip()


def with_prefix(example: dict[str, Any], prefix: str, content: str | None = None) -> dict[str, Any]:
    """The example with ``prefix`` before its last user turn, and (optionally) another assistant ``content``."""
    msgs = [dict(m) for m in example["messages"]]
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[last_user]["content"] = prefix + msgs[last_user]["content"]
    if content is not None:
        msgs[-1]["content"] = content
    return {"messages": msgs}


def command_of(example: dict[str, Any]) -> str:
    return [m for m in example["messages"] if m["role"] == "user"][-1]["content"]


def teacher_rationales(examples: list[dict[str, Any]], tokenizer: Any, cache_root: Path,
                       teacher_id: dict[str, Any], gguf: Path | None, load_model: Any,
                       max_new_tokens: int) -> tuple[list[str], dict[str, Any]]:
    """The teacher's rationale for each example (cached; see module doc), and how it was obtained."""
    from edgeforge.distill.teacher_cache import teacher_answers

    prompts = tuple(rationale_prompt(command_of(e), e["messages"][-1]["content"]) for e in examples)
    rows, info = teacher_answers(tokenizer, cache_root, teacher_id, gguf, load_model, prompts=prompts,
                                 max_new_tokens=max_new_tokens)
    return [clean_rationale(r["answer"]) for r in rows], info


def encode_multitask(tokenizer: Any, example: dict[str, Any], rationale: str | None,
                     max_len: int) -> dict[str, tuple[list[int], list[int]]]:
    """The two task inputs of one example: ``answer`` = ("[answer] " + command -> gold answer) and ``rationale`` =
    ("[rationale] " + command -> rationale), each (input_ids, labels) with labels -100 on every prompt position.
    Without a rationale (empty or not generated) the rationale entry has no supervised token."""
    from edgeforge.tasks.examples import encode_example

    out = {"answer": encode_example(tokenizer, with_prefix(example, ANSWER_PREFIX)["messages"], max_len)}
    if rationale:
        out["rationale"] = encode_example(tokenizer, with_prefix(example, RATIONALE_PREFIX, rationale)["messages"],
                                          max_len)
    else:
        ids, _ = encode_example(tokenizer, with_prefix(example, RATIONALE_PREFIX, "")["messages"], max_len)
        out["rationale"] = (ids, [IGNORE_INDEX] * len(ids))
    return out


def task_batch(encoded: list[dict[str, tuple[list[int], list[int]]]], batch_size: int, seed: int, micro_index: int,
               pad_id: int) -> dict[str, Tensor]:
    """One task micro-batch, drawn with a generator seeded by the micro-batch index (reproducible on resume):
    ``task_input_ids`` / ``task_labels`` / ``task_attention_mask`` [B, L_a] and ``rat_*`` [B, L_r]."""
    from edgeforge.tasks.examples import collate

    rng = random.Random(seed * 1_000_003 + 31 * micro_index + 5)
    rows = rng.sample(encoded, min(batch_size, len(encoded)))
    ans, rat = collate([r["answer"] for r in rows], pad_id), collate([r["rationale"] for r in rows], pad_id)
    return {**{f"task_{k}": v for k, v in ans.items()}, **{f"rat_{k}": v for k, v in rat.items()}}


def supervised_loss(model: Any, input_ids: Tensor, labels: Tensor, attention_mask: Tensor) -> tuple[Tensor, int]:
    """Mean cross-entropy over the supervised (label != -100) tokens, and their count (0: the loss is 0).

    input_ids, labels, attention_mask: [B, L]; position t predicts token t + 1. The output projection runs only at
    the supervised positions (a 49k-token vocabulary makes the others the dominant cost).
    """
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph (and DDP's view of used parameters) intact
    logits = model.lm_head(hidden[:, :-1][keep])  # [n, V]
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep]), n


def multitask_loss(model: Any, batch: dict[str, Tensor], rationale_weight: float,
                   with_rationale: bool) -> tuple[Tensor, dict[str, float]]:
    """``L_answer + λ L_rationale`` on a task micro-batch (see ``task_batch``), with both terms as metrics."""
    ans, _ = supervised_loss(model, batch["task_input_ids"], batch["task_labels"], batch["task_attention_mask"])
    metrics = {"task_answer": float(ans.detach())}
    if not with_rationale:
        return ans, metrics
    rat, n = supervised_loss(model, batch["rat_input_ids"], batch["rat_labels"], batch["rat_attention_mask"])
    metrics["task_rationale"] = float(rat.detach())
    return ans + rationale_weight * rat if n else ans, metrics


# ---------------------------------------------------------------- the task in a distillation run
@dataclass
class DistillTask:
    """A task inside a distillation run: its examples as KD documents, the encoded multi-task inputs, the held-out
    examples in the run's prompt format, and what the record says about it."""

    train: list[dict[str, Any]]  # the task's first --task-examples training examples
    heldout: list[dict[str, Any]]  # held-out examples, formatted as the student is asked at evaluation
    kd_docs: tuple[str, ...]  # each training example in the chat template (distillation data)
    encoded: list[dict[str, tuple[list[int], list[int]]]]  # encode_multitask of each (empty for --task-loss none)
    info: dict[str, Any] = field(default_factory=dict)


def prepare_task(cfg: Any, tokenizer: Any, teacher: Any, cache_root: Path, log: Any,
                 max_len: int = 256) -> DistillTask:
    """The task of a distillation run (cfg: distill.config.DistillConfig; teacher: distill.teacher.Teacher).
    With ``--task-loss rationale`` the teacher's rationales are generated here once (cached)."""
    from edgeforge.tasks.examples import load_task_examples

    train, held, source = load_task_examples(cfg.task, None, cfg.seed)
    train, held = train[: cfg.task_examples], held[: cfg.task_eval_examples]
    prefixed = cfg.task_loss != "none"

    def fmt(e: dict[str, Any]) -> dict[str, Any]:
        return with_prefix(e, ANSWER_PREFIX) if prefixed else e

    kd_docs = tuple(tokenizer.apply_chat_template(fmt(e)["messages"], tokenize=False) for e in train)
    info: dict[str, Any] = {"source": source, "train_examples": len(train), "eval_examples": len(held),
                            "task_loss": cfg.task_loss, "prompt_prefix": ANSWER_PREFIX if prefixed else ""}
    rationales: list[str | None] = [None] * len(train)
    if cfg.task_loss == "rationale":
        got, gen = teacher_rationales(train, tokenizer, cache_root, teacher.identity, teacher.gguf,
                                      lambda: teacher.load(torch.float32, torch.device("cpu")),
                                      cfg.rationale_tokens)
        rationales = list(got)
        lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in got if r]
        info["rationales"] = {"prefix": RATIONALE_PREFIX, "weight": cfg.rationale_weight, "generated": len(got),
                              "non_empty": len(lengths), "mean_tokens": round(sum(lengths) / max(1, len(lengths)), 1),
                              "engine": gen["engine"], "cache_hit": gen["cache_hit"], "cache": gen["path"],
                              "seconds": gen["seconds"],
                              "samples": [{"command": command_of(e), "rationale": r} for e, r in
                                          list(zip(train, got, strict=True))[:3]]}
        log(f"task: teacher rationales for {len(got)} examples: "
            + ("cache hit" if gen["cache_hit"] else f"generated with {gen['engine']} in {gen['seconds']} s"))
    if prefixed:
        info["answer_prefix"] = ANSWER_PREFIX
    encoded = [encode_multitask(tokenizer, e, r, max_len) for e, r in zip(train, rationales, strict=True)] \
        if prefixed else []
    return DistillTask(train, [fmt(e) for e in held], kd_docs, encoded, info)
